"""`distill bench` (the `benchmarks/` package): the quick run writes every section's numbers, the headline keys
and the report; the pieces it is built from (interleaving, phase timers, the loop rate, the generated photos,
timm's side of the 224 px race, `make bench-gpu`'s skip and all-reduce) do what they say.
No timed assertions: timings are only checked to be finite and positive."""

import json
import math
import time
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from benchmarks import bench_gpu, deit224, photos, run as bench, stage, student, timing
from benchmarks.markdown import num
from pipeline.cli import main
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist

torch.set_num_threads(1)  # two busy cores: a second intra-op thread only spins


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `distill bench --quick` run, shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("bench")
    # every section but sweep_pass (minutes even when quick; its equality with separate runs is test_shared_pass.py's)
    only = [a for name in ("deit_224", "storage", "cache_read", "view_replay", "cache_stage", "student")
            for a in ("--only", name)]
    result = CliRunner().invoke(main, ["bench", "--quick", "--out", str(out), "--markdown", str(out / "REPORT.md"),
                                       *only])
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
    assert set(results["sections"]) == set(bench.SECTIONS) - {"sweep_pass"}
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
        positive += [entry[name]["median"] for name in ("slab_reader", "slab_reader_student_order", "read_slab",
                                                          "opened_slab", "opened_unit")]
    for entry in sec["storage"]["storage"]["by_k"].values():
        positive += [entry["total_disk"], entry["total_apparent"], *(a["disk"] for a in entry["arrays"].values())]
    for k in (10, 100):  # the storage keys, at the top level of results.json too
        assert results[f"bytes_per_view_k{k}_disk"] == sec["storage"][f"bytes_per_view_k{k}_disk"] > 0
    for name in ("digits", "photos"):
        positive += [sec["view_replay"][name][f"{what}_ms"]["median"] for what in ("decode", "render", "render_unmixed")]
    d = sec["deit_224"]
    for key in bench.HEADLINE_KEYS:  # the stable keys, at the top level of results.json too
        assert results[key] == d[key] and results[key] > 0, key
    positive += [d[name]["median"] for name in ("a_timm", "b_cache", "c_online", "student_step_s", "teacher_forward_s")]
    positive += [d["per_view"]["timm_ms"]["median"], d["per_view"]["replay_ms"]["median"]]
    assert d["c_time_over_b_time"] == pytest.approx(d["b_cache"]["median"] / d["c_online"]["median"])
    assert d["online_share_of_ideal_224"] == pytest.approx(d["c_time_over_b_time"] / d["ideal_c_over_b"])
    assert d["photos"]["mean_jpeg_bytes"] > 50_000  # photo-like JPEGs, not flat colour
    assert all(v > 0 for v in positive)
    assert len(sec["student"]["cached"]["runs"]) == results["settings"]["reps"]
    shares = sec["cache_stage"]["phase_shares"]
    assert set(shares) == set(stage.STAGE_PHASES) | {"other"}
    assert shares["teacher"] > 0 and shares["decode"] > 0 and shares["write"] > 0
    assert sorted(sec["cache_read"]["10"]["student_order"]) == list(range(sec["cache_read"]["10"]["shards"]))


def test_quick_run_report_and_json_agree(quick):
    out, results = quick
    text = (out / "REPORT.md").read_text()
    assert not (out / "BENCHMARKS.md").exists()  # --markdown was given
    headings = ("## Goals", "## The real setting: 224 px", "## 1. Student speedup", "## 2. Cache stage efficiency",
                "## 3. Cache read", "## 4. Storage", "## 5. View replay")
    positions = [text.index(heading) for heading in headings]
    assert positions == sorted(positions)  # the 224 px section comes first
    assert results["command"] in text and "quick smoke run" in text
    assert results["machine"]["versions"]["zarr"] in text
    d = results["sections"]["deit_224"]
    assert "| 224a | B / A" in text and f"| {num(d['b_over_a_224'])} | >= 1.0 |" in text
    assert f"| {num(d['first_batch_over_steady'])} | <= 2 |" in text


def test_interleave_alternates_the_alternatives():
    calls = []
    values = timing.interleave({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert values == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert timing.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}


def test_phase_timer_charges_each_phase_and_restores_the_functions():
    def slow(x):
        time.sleep(0.02)
        return x + 1

    def items(n):
        for i in range(n):
            time.sleep(0.01)
            yield i

    module = types.SimpleNamespace(slow=slow, items=items)
    timer = timing.PhaseTimer({"compute": [(module, "slow")], "read": [(module, "items")]})
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
    assert student._loop_rate(tmp_path) == (50.0 + 100.0) / 2
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(RuntimeError, match="fewer than two steps"):
        student._loop_rate(tmp_path)


def test_the_cli_lists_the_benchmarks_sections_without_importing_them():
    import stages.bench

    assert stages.bench.SECTIONS == bench.SECTIONS


def test_unknown_section_is_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown bench section 'speed': valid sections are deit_224, storage, cache_read"):
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


# --------------------------------------------------------------------------------------------- photos, 224 px


def test_photos_are_imagenet_like_jpegs_independent_of_the_process_count(tmp_path):
    one = photos.write_photo_shards(tmp_path / "one", 6, 3, classes=4, seed=5, prefix="p")
    two = photos.write_photo_shards(tmp_path / "two", 6, 3, classes=4, seed=5, prefix="p", processes=2)
    lists = load_shardlist(one), load_shardlist(two)
    assert [s.samples for s in lists[0].shards] == [3, 3] and list(lists[0].classes) == ["0", "1", "2", "3"]
    raw = [[x.image for i in range(2) for x in read_shard(sl, i, decode=False)] for sl in lists]
    assert raw[0] == raw[1]  # the same bytes, whatever the number of processes
    decoded = [x for i in range(2) for x in read_shard(lists[0], i)]
    assert [x.label for x in decoded] == [0, 1, 2, 3, 0, 1]  # i mod classes
    for x in decoded:
        height, width = x.image.shape[:2]
        assert 375 <= max(width, height) <= 500 and 0.7 <= width / height <= 1.4
        assert np.asarray(x.image).std() > 10  # content, not a flat colour
    stamp = (tmp_path / "one" / "made-with.json").stat().st_mtime_ns
    photos.write_photo_shards(tmp_path / "one", 6, 3, classes=4, seed=5, prefix="p")
    assert (tmp_path / "one" / "made-with.json").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_timm_side_reads_the_same_shards_with_deits_transform(tmp_path):
    """A's loader (webdataset + create_transform) yields normalised 224 px batches of the shards' own labels."""
    path = photos.write_photo_shards(tmp_path, 8, 8, classes=1000, seed=1, prefix="t")
    shardlist = load_shardlist(path)
    loader = deit224.timm_loader([shardlist.shards[0].url], batch=4, workers=0, shuffle=8)
    batches = list(loader)
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert -3 < float(x.mean()) < 3  # normalised, not 0..255
    labels = sorted(int(v) for _, y in batches for v in y)
    assert labels == sorted(s.label for s in read_shard(shardlist, 0))
    names = [type(t).__name__ for t in deit224.timm_transform().transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert names[-1] == "RandomErasing"


# --------------------------------------------------------------------------------------------- make bench-gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip where there is no GPU")
def test_bench_gpu_skips_cleanly_without_cuda(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--out", str(out)]) == 0
    assert "no CUDA device is visible" in capsys.readouterr().out
    assert "skipped" in json.loads(out.read_text())


def test_bench_gpu_sweep_trains_four_students_on_one_pass_and_one_after_another(tiny_cache, tmp_path,
                                                                               one_torch_thread):
    """The sweep section's code path on the CPU (CI never has the GPU it is run on): the demo student's size,
    four finished runs on each side, and (on the CPU) the same result for each student either way."""
    m = tiny_cache.manifest("student.epochs=1", "student.verify_sample=0")
    s = bench_gpu.Settings(images=0, shard_size=0, teacher_batch=0, student_batch=8, student_epochs=1,
                           forward_iters=0, step_iters=0, workers=0, compile=False, device="cpu")
    out = bench_gpu.student_sweep(s, tmp_path, m, bench_gpu.DEMO_STUDENT)
    assert out["students"] == 4 and out["model_args"] == bench_gpu.DEMO_STUDENT and out["steps"] > 0
    dirs = {side: [tmp_path / "sweep" / "demo-student" / side / f"student-{i}" for i in range(4)]
            for side in ("shared", "separate")}
    sides = {side: [json.loads((d / "result.json").read_text()) for d in ds] for side, ds in dirs.items()}
    for side, results in sides.items():
        assert [r["config"]["student"]["distillation"] for r in results] == ["hard", "soft", "none", "hard"]
        assert all(r["config"]["student"]["model_args"] == bench_gpu.DEMO_STUDENT for r in results)
        assert [r["pass_runs"] for r in results] == ([4] * 4 if side == "shared" else [1] * 4)
    for shared, separate in zip(dirs["shared"], dirs["separate"]):  # bit-identical on the CPU
        a, b = load_file(shared / "model.safetensors"), load_file(separate / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sides["shared"][3]["config"]["student"]["optim"]["lr"] == 2 * m.student.optim.lr


def test_bench_gpu_all_reduce_sums_over_a_one_rank_group():
    """The all-reduce check on the CPU's gloo backend (NCCL where there is a GPU): one rank, the sum is 1."""
    result = bench_gpu.nccl_all_reduce("cpu")
    assert result["ok"] and result["world_size"] == 1 and result["sum"] == 1.0 and result["all_reduce_ms"] > 0
    assert not torch.distributed.is_initialized()  # its own group is torn down


def test_bench_gpu_reports_every_measurement_and_each_failure():
    results = {"date": "d", "machine": {"gpu": "H200"}, "errors": {"student_plain": "RuntimeError: boom"},
               "measurements": {"teacher_forward": {"views_per_s": 4321.5, "eager_views_per_s": 4000.0},
                                "teacher_cache": {"views_per_s": 3000.0, "share_of_teacher_forward": 0.694},
                                "nccl": {"ok": True, "world_size": 1, "payload_mib": 256.0, "all_reduce_ms": 0.5},
                                "student_sweep_demo_student": {"students": 4, "shared_s": 3.1, "separate_s": 10.0,
                                                               "shared_over_separate": 0.31}}}
    text = bench_gpu.summary(results)
    assert "4,322 views/s" in text and "3,000 views/s = 0.69 of the forward alone" in text
    assert "FAILED student_plain: RuntimeError: boom" in text and "nccl all-reduce: ok" in text
    assert "4 demo-student (issue #14) students: one shared pass 3.1 s, one after another 10.0 s" in text
    assert "DeiT-Ti students" not in text  # only what was measured
    table = bench_gpu.markdown([("run.json", results | {"command": "c"})])
    row = next(line for line in table if line.startswith("| `run.json` |"))
    assert "| n/a (0.31) |" in row  # the DeiT-Ti sweep was not measured, the demo students' was


def test_bench_gpu_record_keeps_the_run_and_rewrites_only_the_gpu_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_gpu, "RECORDED", tmp_path / "gpu_runs")
    monkeypatch.setattr(bench_gpu, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    bench_gpu.RECORDED.mkdir()
    old = {"date": "d0", "machine": {"gpu": "H200", "torch": "2.11"}, "errors": {},
           "measurements": {"student_sweep": {"shared_over_separate": 0.42}}, "command": "old", "code": "abc"}
    (bench_gpu.RECORDED / "2026-12-04-h200.json").write_text(json.dumps(old))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Goals\n\ngoals table\n\n" + "\n".join(bench_gpu.markdown(bench_gpu.recorded()))
                  + "\n\n## The real setting\n\nstays\n")
    new = {"date": "d1", "machine": {"gpu": "H100", "torch": "2.14"}, "errors": {}, "command": "python -m x",
           "code": "unknown (not a git checkout)",  # a copy of the tree on a lent machine
           "measurements": {"student_sweep_demo_student": {"shared_over_separate": 0.3}}}
    (tmp_path / "gpu.json").write_text(json.dumps(new))
    assert bench_gpu.main(["--record", "2026-12-07-h100", "--from", str(tmp_path / "gpu.json")]) == 0
    kept = bench_gpu.RECORDED / "2026-12-07-h100.json"
    saved = json.loads(kept.read_text())
    assert saved["command"] == "python -m x" and saved["date"] == "d1"
    assert saved["code"] == f"{bench_gpu._code()} (the checkout that recorded the run)"
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\n## Goals\n\ngoals table\n\n## GPU") and text.endswith("## The real setting\n\nstays\n")
    rows = [line for line in text.splitlines() if line.startswith("| `2026-12-")]
    assert len(rows) == 2 and "| 0.42 (n/a) |" in rows[0] and "| H100, torch 2.14 |" in rows[1] and "| n/a (0.30) |" in rows[1]
    with pytest.raises(FileExistsError, match="recorded already"):
        bench_gpu.record(new, "2026-12-07-h100", md)
    with pytest.raises(ValueError, match="plain file name"):
        bench_gpu.record(new, "../elsewhere", md)
    (tmp_path / "skipped.json").write_text(json.dumps({"skipped": "no CUDA device is visible"}))
    with pytest.raises(SystemExit) as stop:  # a clear line, no traceback, nothing written
        bench_gpu.main(["--record", "2026-12-08", "--from", str(tmp_path / "skipped.json")])
    assert stop.value.code == 2 and "measured nothing (no CUDA device is visible)" in capsys.readouterr().err
    assert sorted(p.name for p in bench_gpu.RECORDED.iterdir()) == ["2026-12-04-h200.json", "2026-12-07-h100.json"]


def test_timms_posterize_at_magnitude_ten_gives_black_as_on_older_pillow():
    """timm's rand-m9 draws PosterizeIncreasing down to 0 bits; Pillow >= 13 refuses 0 bits, so A's transform
    patches the op to what older Pillow (and the project's renderer) gives: black."""
    from PIL import Image
    from timm.data import auto_augment

    ops = [op for t in deit224.timm_transform().transforms if isinstance(t, auto_augment.RandAugment) for op in t.ops]
    patched = [op.name for op in ops if op.aug_fn is deit224._posterize_as_older_pillow]
    assert patched == [op.name for op in ops if op.name.startswith("Posterize")] and patched
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert deit224._posterize_as_older_pillow(img, 0).getpixel((0, 0)) == (0, 0, 0)
    assert deit224._posterize_as_older_pillow(img, 4).getpixel((0, 0)) == (192, 96, 48)  # Pillow's own below


def test_recorded_gpu_runs_are_tabled_with_their_own_numbers():
    runs = bench_gpu.recorded()
    assert runs, "benchmarks/gpu_runs/ holds the runs BENCHMARKS.md quotes"
    text = "\n".join(bench_gpu.markdown(runs))
    for name, r in runs:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        forward = r["measurements"]["teacher_forward"]["eager_views_per_s"]
        assert f"| {forward:,.0f} (" in row and r["command"] in text
