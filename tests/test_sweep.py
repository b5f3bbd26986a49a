"""Sweeps: strict sweep files, run names, checks before anything runs, and (as subprocesses) two sweeps on one
cache at once, a sweep killed half-way that finishes only its missing runs when re-run, and a failing run."""

import csv
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from terminal import Terminal
from pipeline.manifest import to_dict
from pipeline.manifest_loader import load
from pipeline.sweep import SweepError, describe_passes, expand, group_runs, load_sweep, plan, run_name, sweep

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "manifests" / "sweeps" / "tiny.yaml"


def _write(path, text):
    path.write_text(text)
    return path


def _common(tiny_cache):
    return [o for o in tiny_cache.manifest_overrides() if not o.startswith("student.run_dir")]


# --------------------------------------------------------------------------------------------- the sweep file


def test_shipped_sweeps_expand_to_named_runs():
    demo = load_sweep(REPO / "manifests" / "sweeps" / "demo.yaml")
    names = [run_name(o) for o in expand(demo)]
    assert names == ["distillation=soft,alpha=0.5", "distillation=soft,alpha=0.9", "distillation=hard,alpha=0.5",
                     "distillation=hard,alpha=0.9", "distillation=none"]
    runs = plan(REPO / "manifests" / "demo.yaml", demo, Path("runs/sweeps/demo"))
    assert [r.manifest.student.distillation for r in runs] == ["soft", "soft", "hard", "hard", "none"]
    assert runs[3].manifest.student.alpha == 0.9 and runs[3].manifest.student.epochs == 4
    assert runs[3].manifest.student.run_dir == "runs/sweeps/demo/distillation=hard,alpha=0.9"
    # a --set of every run beats the sweep's base, but not a run's own override
    runs = plan(REPO / "manifests" / "demo.yaml", demo, Path("x"), ("student.epochs=1", "student.alpha=0.1"))
    assert [(r.manifest.student.epochs, r.manifest.student.alpha) for r in runs] == \
        [(1, 0.5), (1, 0.9), (1, 0.5), (1, 0.9), (1, 0.1)]
    tiny = load_sweep(TINY_SWEEP)
    assert tiny.name == "tiny" and len(expand(tiny)) == 3


def test_runs_are_grouped_into_data_passes_by_what_decides_their_batches(tmp_path):
    spec = load_sweep(_write(tmp_path / "s.yaml", """name: s
base: {student.data_seed: 0}
grid:
  student.distillation: [soft, hard]
  student.seed: [0, 1]
runs:
  - {student.batch_size: 32, student.optim.lr: 0.002}
  - {student.batch_size: 32, student.model_args: {embed_dim: 32, depth: 2, num_heads: 2}}
  - {student.data_seed: 5}
"""))
    runs = plan(REPO / "manifests" / "demo.yaml", spec, tmp_path / "out")
    passes = group_runs([r.manifest for r in runs])
    assert [[runs[i].name for i in group] for group in passes] == [
        ["distillation=soft,seed=0", "distillation=soft,seed=1", "distillation=hard,seed=0", "distillation=hard,seed=1"],
        ["batch_size=32,lr=0.002", "batch_size=32,model_args.embed_dim=32,model_args.depth=2,model_args.num_heads=2"],
        ["data_seed=5"]]
    lines = describe_passes(runs, passes)
    assert lines[0] == ("  pass 1 (batch_size=64, data_seed=0): 4 students: distillation=soft,seed=0, "
                        "distillation=soft,seed=1, distillation=hard,seed=0, distillation=hard,seed=1")
    assert lines[1].startswith("  pass 2 (batch_size=32, data_seed=0): 2 students: batch_size=32,lr=0.002, ")
    assert lines[2] == "  pass 3 (batch_size=64, data_seed=5): 1 student: data_seed=5"
    # without a fixed data seed, each init seed shuffles its own data: no shared pass across seeds
    seeds = load_sweep(_write(tmp_path / "t.yaml", "grid: {student.seed: [0, 1]}\n"))
    assert len(group_runs([r.manifest for r in plan(REPO / "manifests" / "demo.yaml", seeds, tmp_path)])) == 2


def test_run_names():
    assert run_name({"student.optim.lr": 0.001, "student.sched.warmup_epochs": 2}) == "lr=0.001,warmup_epochs=2"
    assert run_name({"student.optim.name": "adamw", "student.model": "x/y"}) == "name=adamw,model=x_y"
    assert run_name({"student.optim.lr": 0.1, "student.sched.lr": 0.2}) == "optim.lr=0.1,sched.lr=0.2"
    assert run_name({"student.model_args": {"embed_dim": 32, "depth": 2}, "student.ema": None}) == \
        "model_args.embed_dim=32,model_args.depth=2,ema=null"
    assert run_name({}) == "base"


@pytest.mark.parametrize("text, message", [
    ("grid: {student.alpha: [0.1]}\nbogus: 1\n",
     r"unknown key 'bogus': valid keys are \['name', 'base', 'grid', 'runs'\]"),
    ("grid: {cache.top_k: [5]}\n", r"grid: key 'cache.top_k' is not a student.\* key. A sweep varies the student only"),
    ("runs: [{student.run_dir: x}]\n", r"runs\[0\]: student.run_dir is set by the sweep"),
    ("grid: {student.alpha: []}\n", r"grid.student.alpha must be a non-empty list of values"),
    ("grid: {student.alpha: 0.5}\n", r"grid.student.alpha must be a non-empty list of values, got 0.5"),
    ("name: sweep\n", r"no runs: give a grid \(key: \[values\]\) and/or runs"),
    ("name: a/b\nruns: [{}]\n", r"name 'a/b' must be a plain directory name"),
    ("runs: {student.alpha: 1}\n", r"runs must be a list of mappings of overrides"),
    ("runs: [[1]]\n", r"runs\[0\]: expected a mapping of student.\* keys to values"),
    ("grid: [1\n", r"not valid YAML"),
])
def test_malformed_sweep_files_are_refused(tmp_path, text, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(_write(tmp_path / "s.yaml", text))


def test_missing_sweep_file(tmp_path):
    with pytest.raises(SweepError, match=r"sweep file .*nope.yaml does not exist: pass a YAML file"):
        load_sweep(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, message", [
    ("grid: {student.alpha: [0.5, 2.0]}\n",
     r"sweep s, run alpha=2.0: .*student.alpha=2.0 must lie in \[0, 1\]"),
    ("runs: [{student.alpah: 0.5}]\n", r"sweep s, run alpah=0.5: .*unknown key student.alpah: valid keys here are"),
    ("runs: [{student.distillation: soft}, {student.distillation: soft}]\n",
     r"runs 0 and 1 have the same overrides \(distillation=soft\): remove one"),
])
def test_wrong_overrides_stop_the_sweep_before_anything_runs(tmp_path, text, message):
    with pytest.raises(SweepError, match=message):
        sweep("manifests/tiny.yaml", _write(tmp_path / "s.yaml", text), sweep_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _finished(run, config, fingerprint):
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "result.json").write_text(json.dumps({"cache_fingerprint": fingerprint, "config": config}))


def test_finished_runs_must_match_the_sweep(tiny_cache, tmp_path):
    spec = load_sweep(TINY_SWEEP)
    run = plan("manifests/tiny.yaml", spec, tmp_path / "a", tuple(_common(tiny_cache)))[0]
    config = to_dict(run.manifest)
    config["student"]["alpha"] = 0.25
    _finished(run, config, tiny_cache.open().attrs["fingerprint"])
    with pytest.raises(SweepError, match=r"distillation=soft finished with student.alpha=0.25, but the sweep now "
                                         r"asks for 0.5: remove the run directory to retrain it"):
        sweep("manifests/tiny.yaml", TINY_SWEEP, sweep_dir=tmp_path / "a", common=tuple(_common(tiny_cache)))
    run = plan("manifests/tiny.yaml", spec, tmp_path / "b", tuple(_common(tiny_cache)))[0]
    _finished(run, to_dict(run.manifest), "0123456789abcdef")
    with pytest.raises(SweepError, match=r"finished from a cache with fingerprint 0123456789abcdef, not [0-9a-f]{16}"):
        sweep("manifests/tiny.yaml", TINY_SWEEP, sweep_dir=tmp_path / "b", common=tuple(_common(tiny_cache)))
    with pytest.raises(SweepError, match=r"--jobs 0 must be at least 1"):
        sweep("manifests/tiny.yaml", TINY_SWEEP, jobs=0)


def test_a_run_another_process_trains_is_skipped_and_reported(tiny_cache, tmp_path, monkeypatch):
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)  # the sweep's overall bar shows on a terminal
    one = _write(tmp_path / "one.yaml", "runs: [{student.seed: 3}]\n")
    run_dir = tmp_path / "out" / "seed=3"
    run_dir.mkdir(parents=True)
    fd = os.open(run_dir / "sweep.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a trainer of another sweep would
    lines = []
    try:
        with pytest.raises(SweepError, match=r"sweep one: 1 of 1 runs did not finish: seed=3 \(busy: another process "
                                             r"is training it, log .*train.log, pass log .*pass-1.log\)\. Re-run the sweep to retry them"):
            sweep("manifests/tiny.yaml", one, sweep_dir=tmp_path / "out", common=tuple(_common(tiny_cache)),
                  echo=lines.append)
    finally:
        os.close(fd)
    assert "  seed=3: another process is training it; skipped" in lines
    assert "| seed=3 | busy: another process is training it |" in lines[-1]
    assert not (run_dir / "train.log").exists()
    assert "sweep: 100%" in err.getvalue() and "1/1" in err.getvalue()


# --------------------------------------------------------------------------------------------- running


def _start(tiny_cache, sweep_file, out, *extra):
    args = ["--manifest", "manifests/tiny.yaml", "--sweep", str(sweep_file), "--out", str(out), *extra]
    for override in _common(tiny_cache):
        args += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", "from stages.sweep import sweep; sweep()", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _lock_is_free(run_dir):
    if not (run_dir / "sweep.lock").exists():
        return True
    fd = os.open(run_dir / "sweep.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


KILL_SWEEP = """name: kill
base: {student.epochs: 2, student.ckpt_every: 5, student.verify_sample: 0.0, student.data_seed: 0}
runs:
  - {student.distillation: soft, student.alpha: 0.7, student.tau: 2.0}
  - {student.distillation: hard, student.seed: 1, student.ema: 0.9}
  - {student.distillation: none, student.optim.lr: 0.002, student.optim.clip_grad: 1.0}
"""


def _steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["epoch"], r["loss"], r["base"], r["distill"], r["lr"])
            for r in map(json.loads, lines) if r["event"] == "step"]


def _evals(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "eval"]


@pytest.mark.slow
def test_a_killed_shared_pass_resumes_every_student_with_identical_losses(tiny_cache, tmp_path):
    """Three students on one data pass, the sweep SIGKILLed mid-pass: re-run, every student resumes from its own
    last.pth and ends with the per-step losses, evaluations and weights of the same student trained alone."""
    from safetensors.torch import load_file

    from pipeline.train import train

    spec = _write(tmp_path / "kill.yaml", KILL_SWEEP)
    out = tmp_path / "kill"
    killed = _start(tiny_cache, spec, out)
    runs = [out / name for name in ("distillation=soft,alpha=0.7,tau=2.0", "distillation=hard,seed=1,ema=0.9",
                                    "distillation=none,lr=0.002,clip_grad=1.0")]
    _wait_for(lambda: all((r / "last.pth").exists() for r in runs) or killed.poll() is not None, 180,
              "every student's first checkpoint")
    killed.send_signal(signal.SIGKILL)
    output = killed.communicate()[0]
    assert killed.returncode == -signal.SIGKILL, output
    assert "3 runs in" in output and "1 data pass" in output and "pass 1: 3 students" in output
    _wait_for(lambda: all(_lock_is_free(r) for r in runs), 10, "the killed sweep's trainer to die")
    assert not any((r / "result.json").exists() for r in runs)
    done = [torch.load(r / "last.pth", weights_only=True)["position"]["step"] for r in runs]
    assert all(5 <= d < 24 for d in done), done

    rerun = _start(tiny_cache, spec, out)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert "training 3 students on one data pass" in output and "(resuming 3 from their checkpoints)" in output
    for run_dir in runs:  # the same student alone
        sets = [o for o in json.loads((out / "sweep.json").read_text())["runs"][run_dir.name]
                if not o.startswith("student.run_dir=")]
        alone = load("manifests/tiny.yaml", sets + [f"student.run_dir={tmp_path / 'alone' / run_dir.name}"])
        expected = train(alone, progress=False)
        assert _steps(run_dir) == _steps(tmp_path / "alone" / run_dir.name)
        assert len(_steps(run_dir)) == 24
        assert _evals(run_dir) == _evals(tmp_path / "alone" / run_dir.name)
        got, want = load_file(run_dir / "model.safetensors"), load_file(tmp_path / "alone" / run_dir.name /
                                                                         "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        result = json.loads((run_dir / "result.json").read_text())
        assert result["top1_joint"] == expected["top1_joint"] and result["pass_runs"] == 3

    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["done"] * 3 and {row["pass"] for row in rows} == {"1"}
    joint = [float(row["top1_joint"]) for row in rows]
    assert joint == sorted(joint, reverse=True)
    assert (out / "summary.md").read_text().splitlines()[2].endswith("| seconds | pass |")

    # finished runs are left alone: nothing rewritten, the training time kept
    before = {p: p.stat().st_mtime_ns for r in runs for p in r.iterdir() if p.name != "sweep.lock"}
    again = _start(tiny_cache, spec, out)
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "3 finished already" in output, output
    assert {p: p.stat().st_mtime_ns for r in runs for p in r.iterdir() if p.name != "sweep.lock"} == before


@pytest.mark.slow
def test_a_failing_run_is_reported_with_its_log(tiny_cache, tmp_path):
    broken = _write(tmp_path / "broken.yaml", "base: {student.epochs: 1, student.verify_sample: 0.0}\n"
                                              "runs: [{student.model: vit_tiny_patch16_224}]\n")
    proc = _start(tiny_cache, broken, tmp_path / "out")
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1
    log = tmp_path / "out" / "model=vit_tiny_patch16_224" / "train.log"
    assert re.search(r"sweep broken: 1 of 1 runs did not finish: model=vit_tiny_patch16_224 \(failed: ManifestError, "
                     r"log .*train.log, pass log .*pass-1.log\)\. Re-run the sweep to retry them", output), output
    assert "| failed: ManifestError |" in output
    assert "has no distillation head" in log.read_text()
