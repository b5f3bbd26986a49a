"""The Makefile is a dependency graph: each target first runs the idempotent CLI steps it needs (shards ->
teacher -> teacher-cache), so a target works on a fresh clone, and what it suggests keeps the user's MANIFEST=.
Make runs for real here, with the CLI of this tree (`python -m pipeline.cli`) and the install step skipped."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import cache

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(*args, check=False):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(["make", "-C", str(ROOT), "-o", f"{VENV}/.installed", f"VENV={VENV}",
                           f"DISTILL={sys.executable} -m pipeline.cli", *args],
                          env=env, capture_output=True, text=True, check=check)


def _commands(target, *variables):
    """The `distill` subcommands `make -n TARGET` would run, in order."""
    out = _make("-n", target, *variables, check=True).stdout
    return [re.search(r"-m pipeline\.cli (\S+)", line)[1] for line in out.splitlines() if "-m pipeline.cli" in line]


@pytest.mark.parametrize("target, steps", [
    ("teacher", ["shards", "teacher"]),
    ("teacher-cache", ["shards", "teacher", "teacher-cache"]),
    ("train-student", ["shards", "teacher", "teacher-cache", "train-student"]),
    ("sweep", ["shards", "teacher", "teacher-cache", "sweep"]),
    ("stats", ["shards", "teacher", "teacher-cache", "stats"]),
    ("inspect-view", ["shards", "teacher", "teacher-cache", "inspect-view"]),
    ("verify-cache", ["shards", "teacher", "teacher-cache", "verify-cache"]),
])
def test_each_target_builds_its_prerequisites_first(target, steps):
    assert _commands(target) == steps


def test_a_given_cache_needs_no_cache_step_and_args_go_to_the_target_alone():
    assert _commands("stats", "CACHE=somewhere") == ["stats"]
    assert _commands("inspect-view", "CACHE=somewhere") == ["shards", "inspect-view"]
    out = _make("-n", "train-student", "MANIFEST=manifests/tiny.yaml", "SET=student.alpha=0.9 cache.epochs=1",
                "ARGS=--no-progress", check=True).stdout.splitlines()
    lines = [line for line in out if "-m pipeline.cli" in line]
    assert all("--manifest manifests/tiny.yaml --set student.alpha=0.9 --set cache.epochs=1" in line for line in lines)
    assert [("--no-progress" in line) for line in lines] == [False, False, False, True]
    assert "--if-missing" in lines[0]


def test_missing_data_names_the_fix_with_the_same_manifest(tmp_path):
    manifest = tmp_path / "mine.yaml"
    manifest.write_text(f"data: {{train: {tmp_path}/t/shardlist.json, val: {tmp_path}/v/shardlist.json, "
                        f"builtin: none}}\n")
    result = _make("teacher-cache", f"MANIFEST={manifest}")
    assert result.returncode != 0
    assert f"data.train={tmp_path}/t/shardlist.json and data.val={tmp_path}/v/shardlist.json do not exist" \
        in result.stderr
    assert f"`make shardlist SHARDS='dir/*.tar' MANIFEST={manifest}`" in result.stderr
    assert "pipeline.cli teacher " not in result.stdout  # stopped at the first step


@pytest.mark.slow
def test_train_student_on_a_fresh_cache_fills_it_first(tiny_cache, tmp_path):
    """Shards and teacher exist (the tiny fixture's); the cache and the run do not: one `make train-student`
    fills the cache, then trains, and the cache it made equals (epoch 0 of) the fixture's, filled by the library."""
    sets = [o for o in tiny_cache.manifest_overrides(run_dir=tmp_path / "run") if not o.startswith("cache.path")]
    sets += [f"cache.path={tmp_path / 'cache'}", "cache.epochs=1"]  # one epoch of the fixture's two: quicker
    result = _make("train-student", "MANIFEST=manifests/tiny.yaml", f"SET={' '.join(sets)}",
                   "ARGS=--no-progress --set student.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{tiny_cache.train} and {tiny_cache.val} exist" in result.stdout
    assert f"teacher: {tiny_cache.checkpoint} exists" in result.stdout
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] > 0
    made, direct = zarr.open_group(str(tmp_path / "cache"), mode="r"), tiny_cache.open()
    assert made["train"]["done"][...].all()
    for name in ("digest", "view"):  # the views are bit-identical
        assert (made["train"][name][...] == direct["train"][name][:1]).all(), name
    answers = [cache.decode_answers(g["train"]["topk_logratios"][:1], g["train"]["leftover_logit"][:1]) for g in (made, direct)]
    for a, b in zip(*answers):  # the teacher's float sums may round differently with another thread count
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-3)
