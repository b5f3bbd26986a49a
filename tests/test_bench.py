"""`distill bench`: the quick run writes every section's numbers and the report; the pieces it is built from
(interleaving, phase timers, the codec rule, the loop rate, the storage accounting) do what they say.
No timed assertions: timings are only checked to be finite and positive."""

import json
import math
import os
import time
import types

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline import bench
from pipeline.cli import main
from pipeline.views import PARAM_BYTES

torch.set_num_threads(1)  # two busy cores: a second intra-op thread only spins


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `distill bench --quick` run, shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(out), "--markdown", str(out / "REPORT.md")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, json.loads((out / "results.json").read_text())


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_quick_run_writes_every_section_with_finite_positive_numbers(quick):
    out, results = quick
    assert set(results["sections"]) == set(bench.SECTIONS)
    for path, value in _numbers(results["sections"]):
        assert math.isfinite(value), path
        assert value >= 0, path
    sec = results["sections"]
    positive = [sec["student"]["cached_vs_floor"], sec["student"]["share_of_ideal"], sec["student"]["ideal_speedup"],
                sec["student"]["teacher_to_student"], sec["cache_stage"]["efficiency"]]
    for mode in ("no_distillation", "cached", "online", "student_step_s", "teacher_forward_s"):
        positive.append(sec["student"][mode]["median"])
    for name in ("stage", "teacher_alone"):
        positive.append(sec["cache_stage"][name]["median"])
    for entry in sec["cache_read"].values():
        positive += [entry[name]["median"] for name in ("read_slab", "opened_slab", "opened_unit")]
    for entry in sec["storage"]["by_k"].values():
        positive += [entry["total"], *entry["bytes_per_view"].values()]
    for name in ("digits", "photos"):
        positive += [sec["view_replay"][name][f"{what}_ms"]["median"] for what in ("decode", "render", "render_unmixed")]
    assert all(v > 0 for v in positive)
    assert len(sec["student"]["cached"]["runs"]) == results["settings"]["reps"]
    shares = sec["cache_stage"]["phase_shares"]
    assert set(shares) == set(bench.STAGE_PHASES) | {"other"}
    assert shares["teacher"] > 0 and shares["decode"] > 0 and shares["write"] > 0


def test_quick_run_report_and_json_agree(quick):
    out, results = quick
    text = (out / "REPORT.md").read_text()
    assert not (out / "BENCHMARKS.md").exists()  # --markdown was given
    for heading in ("## Goals", "## 1. Student speedup", "## 2. Cache stage efficiency", "## 3. Cache read",
                    "## 4. Storage", "## 5. View replay"):
        assert heading in text
    assert results["command"] in text and "quick smoke run" in text
    assert results["machine"]["versions"]["zarr"] in text
    k10 = results["sections"]["storage"]["by_k"]["10"]
    assert f"K=10 (TinyViT {bench.tinyvit_bytes(10)})" in text
    assert f"| {bench._num(k10['total'])} | <= 44 |" in text


def test_storage_accounts_bytes_per_field_from_the_chunk_files(quick):
    """Independent computation: walk each array's chunk files of the K=100 cache the bench wrote."""
    out, results = quick
    entry = results["sections"]["storage"]["by_k"]["100"]
    views = results["sections"]["storage"]["views"]
    for name in bench.STORED_FIELDS:
        chunk_dir = out / "work" / "storage" / "k100" / "train" / name / "c"
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(chunk_dir) for f in files)
        assert entry["bytes_per_view"][name] == pytest.approx(size / views)
    assert entry["raw_bytes_per_view"] == {"topk_logprobs": 200, "topk_ids": 200, "log_leftover": 2,
                                           "view": PARAM_BYTES, "digest": 4}
    assert entry["tinyvit"] == 404
    assert entry["total"] == pytest.approx(sum(entry["bytes_per_view"].values()))
    root = zarr.open_group(str(out / "work" / "storage" / "k100"), mode="r")
    assert root["train"]["topk_ids"].dtype == np.uint16 and root["train"]["topk_logprobs"].shape[-1] == 100


def test_codec_candidates_read_back_unchanged_and_report_sizes(tmp_path):
    values = np.random.default_rng(0).normal(size=(2, 50, 7)).astype(np.float32)
    found = bench.compare_codecs(tmp_path, "view", values, (2, 50, 7))
    assert "transpose+blosc-zstd5-shuffle" in found and bench.REFERENCE_CODEC in found
    for numbers in found.values():
        assert 0 < numbers["bytes_per_view"] < 2 * 7 * 4  # about the raw 28 bytes, plus headers
    lse = bench.compare_codecs(tmp_path, "log_leftover", values[..., 0], (2, 50))
    assert not any(name.startswith("transpose") for name in lse)  # one number per view: nothing to transpose


def _entry(sizes: dict, encode: dict, decode: dict) -> dict:
    return {"bytes_per_view": {"view": sizes[bench.REFERENCE_CODEC]},
            "candidates": {"view": {c: {"bytes_per_view": sizes[c], "encode_views_per_s": encode[c],
                                        "decode_views_per_s": decode[c]} for c in sizes}}}


def test_codec_choice_is_the_smallest_that_keeps_half_the_speed():
    ref = bench.REFERENCE_CODEC
    sizes = {ref: 40.0, "small-but-slow": 30.0, "smaller": 35.0, "tiny-gain": 39.9}
    encode = {ref: 100.0, "small-but-slow": 10.0, "smaller": 60.0, "tiny-gain": 500.0}
    decode = {c: 100.0 for c in sizes}
    best = bench.best_codecs({"by_k": {"10": _entry(sizes, encode, decode)}})["view"]
    assert best["codec"] == "smaller" and best["bytes_per_view_summed"] == 35.0
    assert best["smallest_overall"] == "small-but-slow" and best["in_use_summed"] == 40.0
    sizes["smaller"] = 39.9  # saves less than 1%: the reference stays
    assert bench.best_codecs({"by_k": {"10": _entry(sizes, encode, decode)}})["view"]["codec"] == ref


def test_interleave_alternates_the_alternatives():
    calls = []
    values = bench.interleave({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert values == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert bench.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}


def test_phase_timer_charges_each_phase_and_restores_the_functions():
    def slow(x):
        time.sleep(0.02)
        return x + 1

    def items(n):
        for i in range(n):
            time.sleep(0.01)
            yield i

    module = types.SimpleNamespace(slow=slow, items=items)
    timer = bench.PhaseTimer({"compute": [(module, "slow")], "read": [(module, "items")]})
    with pytest.raises(KeyError):
        with timer.timing():
            assert [module.slow(i) for i in module.items(3)] == [1, 2, 3]
            time.sleep(0.05)  # neither phase
            raise KeyError("leaving the block on an error still restores the functions")
    assert module.slow is slow and module.items is items
    assert 0.06 <= timer.seconds["compute"] < 0.06 + 0.05
    assert 0.03 <= timer.seconds["read"] < 0.03 + 0.05


def test_loop_rate_is_the_median_step_rate_without_the_first_step(tmp_path):
    rates = [5.0, 100.0, 50.0, 25.0, 1000.0]
    lines = [json.dumps({"event": "step", "step": i + 1, "images_per_s": r}) for i, r in enumerate(rates)]
    lines.insert(2, json.dumps({"event": "eval", "step": 2, "epoch": 0}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert bench._loop_rate(tmp_path) == (50.0 + 100.0) / 2
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(RuntimeError, match="fewer than two steps"):
        bench._loop_rate(tmp_path)


def test_unknown_section_is_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown bench section 'speed': valid sections are storage, cache_read"):
        bench.run(tmp_path, quick=True, only=("speed",))
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(tmp_path), "--only", "speed"])
    assert result.exit_code == 2 and "'speed' is not one of" in result.output


def test_missing_manifest_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(tmp_path), "--manifest", str(tmp_path / "no.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(tmp_path), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device is visible" in result.output
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        bench.run(tmp_path, quick=True, device="cuda")
