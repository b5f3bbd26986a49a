"""`make bench-gpu`: the project's GPU numbers on one CUDA device, in a few minutes, with data it makes itself.

    PYTHONPATH=. python3 -m benchmarks.bench_gpu --out bench/gpu.json [--compile] [--quick]

Measures, each on its own so that one failure still reports the others:

- `teacher_forward`: views/s of RegNetY-16GF (`regnety_160`, random weights, 1000 classes) at 224 px on a
  uint8 batch already on the device: normalise, channels_last, bf16 autocast, inference mode (optionally
  `torch.compile`d): the ceiling of stage 1. Also `teacher.forward` (the stage's own forward, from a
  CPU batch, logits back to the host) on the same batch.
- `teacher_cache`: views/s of stage 1 (`teacher_cache.run`) over generated ImageNet-like JPEG shards with
  DeiT's recipe and the same teacher, against the two forwards above.
- `student`: images/s of DeiT-Ti (`deit_tiny_distilled_patch16_224`, hard distillation, batch 128) trained
  from that cache by `pipeline.train.train` (the real data path: decode, replay, cache read, collate), against
  the same training step on a synthetic batch (`Learner.step`, no data path) and a plain timm/torch step.
- `student_timm_input`: the same DeiT-Ti step (two heads on the mixed ground truth, no distillation) fed by
  timm's own input path over the same shards with as many loader workers: webdataset, DeiT's `create_transform`
  in the workers, `Mixup` on the device batch. `b_over_a_224` = `student` / this (goal of issue #13: >= 1).
- `student_sweep`: four DeiT-Ti students (hard, soft, none, hard at twice the lr) trained from that cache on
  one shared data pass (`pipeline.train.train_shared`) against the same four one after another;
  `student_sweep_demo_student`: the same with the demo's student (embed 64, depth 4) at 224/16, issue #14's
  setting (goal: shared / separate <= 0.4).
- `nccl`: an all-reduce over NCCL (a one-rank group on a single GPU, the torchrun group under torchrun),
  checked for the right sum, with its bus bandwidth.

Writes JSON to `--out` and prints a summary; `--record NAME` also keeps it as `gpu_runs/NAME.json` and rewrites
BENCHMARKS.md's GPU table from every kept run (`--record NAME --from FILE`: keep a run made elsewhere, e.g. the
`--out` brought back from a lent GPU machine, without running anything). Without CUDA it prints why and writes {"skipped": ...}.
Needs only the project's dependencies (torch, timm, numpy, Pillow, zarr, webdataset); sample photos from
scikit-learn/matplotlib are used when installed, synthetic colour fields otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

TEACHER = "regnety_160"
STUDENT = "deit_tiny_distilled_patch16_224"
CLASSES = 1000
SIZE = 224


@dataclasses.dataclass(frozen=True)
class Settings:
    images: int  # train photos (val: one shard of `shard_size`)
    shard_size: int
    teacher_batch: int
    student_batch: int
    student_epochs: int  # over the one cached epoch (the student cycles it)
    forward_iters: int
    step_iters: int
    workers: int
    compile: bool
    device: str = "cuda"  # "cpu": a smoke run of every code path (`--device cpu`), numbers meaningless


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn, iters: int, warmup: int = 3) -> float:
    """Seconds per call of `fn` (the GPU synchronised before reading the clock), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - start) / iters


def machine(device: str) -> dict:
    out = {"device": device, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "timm": __import__("timm").__version__}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpus=torch.cuda.device_count())
    return out


# --------------------------------------------------------------------------------------------- measurements


def teacher_forward(s: Settings, work: Path) -> dict:
    import timm

    from pipeline.teacher import normalize

    device = torch.device(s.device)
    torch.manual_seed(0)
    model = timm.create_model(TEACHER, num_classes=CLASSES).eval().requires_grad_(False)
    torch.save(model.state_dict(), work / "teacher.pt")  # stage 1 loads these weights
    model = model.to(device, memory_format=torch.channels_last)
    pcfg = model.pretrained_cfg
    views_u8 = torch.randint(0, 256, (s.teacher_batch, SIZE, SIZE, 3), dtype=torch.uint8, device=device)

    def run(net):
        @torch.inference_mode()
        def forward():
            x = normalize(views_u8, pcfg["mean"], pcfg["std"], channels_last=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return net(x)
        return forward

    out = {"model": TEACHER, "batch": s.teacher_batch, "img_size": SIZE,
           "eager_views_per_s": s.teacher_batch / _timed(run(model), s.forward_iters)}
    if s.compile:
        compiled = torch.compile(model)
        start = time.perf_counter()
        run(compiled)()
        _sync()
        out["compile_s"] = round(time.perf_counter() - start, 1)
        out["compiled_views_per_s"] = s.teacher_batch / _timed(run(compiled), s.forward_iters)
    out["views_per_s"] = max(out["eager_views_per_s"], out.get("compiled_views_per_s", 0.0))
    try:  # the stage's own forward: from a CPU uint8 batch, logits back on the host
        from pipeline.manifest import TeacherCfg
        from pipeline.teacher import forward, load_teacher

        teacher = load_teacher(TeacherCfg(model=TEACHER, checkpoint=str(work / "teacher.pt"), img_size=SIZE),
                               CLASSES, device)
        cpu_views = views_u8.cpu().pin_memory() if device.type == "cuda" else views_u8
        out["stage_forward_views_per_s"] = s.teacher_batch / _timed(
            lambda: forward(teacher, cpu_views, device), s.forward_iters)
    except Exception as e:
        out["stage_forward_error"] = f"{type(e).__name__}: {e}"
    return out


def _photos(s: Settings, work: Path) -> dict:
    from benchmarks import photos

    processes = max(1, min(16, (os.cpu_count() or 1)))
    start = time.perf_counter()
    train = photos.write_photo_shards(work / "photos" / "train", s.images, s.shard_size, CLASSES, seed=0,
                                      prefix="train", processes=processes)
    val = photos.write_photo_shards(work / "photos" / "val", s.shard_size, s.shard_size, CLASSES, seed=1,
                                    prefix="val", processes=processes)
    return {"train": str(train), "val": str(val), "train_images": s.images, "val_images": s.shard_size, "sources": photos.source_names() or "synthetic",
            "mean_jpeg_bytes": round(photos.mean_file_bytes(train)), "seconds": round(time.perf_counter() - start, 1)}


def _manifest(s: Settings, work: Path, train: str, val: str):
    from pipeline.manifest import Manifest

    m = Manifest()
    teacher = dataclasses.replace(m.teacher, model=TEACHER, checkpoint=str(work / "teacher.pt"), pretrained=False,
                                  img_size=SIZE)
    cache = dataclasses.replace(m.cache, path=str(work / "cache"), epochs=1, top_k=10, batch_size=s.teacher_batch,
                                workers=s.workers, shards_per_unit=1, device=s.device)
    student = dataclasses.replace(m.student, model=STUDENT, img_size=SIZE, patch_size=16, distillation="hard",
                                  epochs=s.student_epochs, batch_size=s.student_batch, workers=s.workers,
                                  shuffle_buffer=min(1024, s.images), run_dir=str(work / "runs" / "student"), ckpt_every=0,
                                  eval_every=0, verify_sample=0.0, device=s.device, compile=s.compile,
                                  log=dataclasses.replace(m.student.log, every=8))
    for cfg_name, cfg in (("teacher", teacher), ("cache", cache)):  # a stage-1 compile switch, where there is one
        if s.compile and "compile" in {f.name for f in dataclasses.fields(cfg)}:
            if cfg_name == "teacher":
                teacher = dataclasses.replace(teacher, compile=True)
            else:
                cache = dataclasses.replace(cache, compile=True)
    data = dataclasses.replace(m.data, train=train, val=val, builtin="none", on_error="raise")
    m = dataclasses.replace(m, data=data, teacher=teacher, cache=cache, student=student)
    return m.check() if hasattr(m, "check") else m


def teacher_cache_stage(s: Settings, work: Path, m, forward: dict | None) -> dict:
    from pipeline import teacher_cache

    result = teacher_cache.run(m, progress=False)
    out = {"views": result["views"], "seconds": round(result["seconds"], 2), "views_per_s": result["views_per_s"],
           "batch": m.cache.batch_size, "workers": m.cache.workers}
    if forward:
        out["share_of_teacher_forward"] = result["views_per_s"] / forward["views_per_s"]
        if "stage_forward_views_per_s" in forward:
            out["share_of_stage_forward"] = result["views_per_s"] / forward["stage_forward_views_per_s"]
    return out


def _step_rates(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["images_per_s"] for r in rows if r.get("event") == "step"]


def student_from_cache(s: Settings, work: Path, m) -> dict:
    from pipeline.distributed import World
    from pipeline.train import train

    started = time.perf_counter()
    result = train(m, World(0, 1, None), answers="cache", progress=False)
    wall = time.perf_counter() - started
    rates = _step_rates(Path(m.student.run_dir))
    steady = rates[max(1, len(rates) // 4):]  # the first steps: compile, worker start-up
    return {"steps": len(rates), "batch": m.student.batch_size, "workers": m.student.workers,
            "images_per_s": statistics.median(steady) if steady else None,
            "first_step_images_per_s": rates[0] if rates else None,
            "run_images_per_s": result["steps"] * m.student.batch_size / wall}


DEMO_STUDENT = {"embed_dim": 64, "depth": 4, "num_heads": 2}  # manifests/demo.yaml's student, here at 224/16


def student_sweep(s: Settings, work: Path, m, model_args: dict | None = None) -> dict:
    """Four students of a sweep (hard, soft, none, hard at twice the lr) from the cache: one shared data pass
    (`train_shared`) against the same four trained one after another (`train`), wall time, warm process.
    `model_args`: the students' size (DeiT-Ti without; `DEMO_STUDENT` is issue #14's setting)."""
    from pipeline.distributed import World
    from pipeline.train import train, train_shared

    variants = (("hard", 1.0), ("soft", 1.0), ("none", 1.0), ("hard", 2.0))
    tag = "demo-student" if model_args else "deit-tiny"
    model_args = model_args or m.student.model_args

    def students(side: str) -> list:
        return [dataclasses.replace(m, student=dataclasses.replace(
            m.student, distillation=mode, optim=dataclasses.replace(m.student.optim, lr=m.student.optim.lr * scale),
            model_args=model_args, run_dir=str(work / "sweep" / tag / side / f"student-{i}")))
            for i, (mode, scale) in enumerate(variants)]

    started = time.perf_counter()
    results = train_shared(students("shared"), World(0, 1, None), progress=False)
    shared = time.perf_counter() - started
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise failed[0]
    started = time.perf_counter()
    for one in students("separate"):
        train(one, World(0, 1, None), progress=False)
    separate = time.perf_counter() - started
    return {"students": len(variants), "model_args": model_args, "epochs": m.student.epochs,
            "batch": m.student.batch_size, "steps": results[0]["steps"], "shared_s": round(shared, 2),
            "separate_s": round(separate, 2), "shared_over_separate": shared / separate}


def _synthetic_batch(b: int, pin: bool, k: int = 10) -> dict:
    gen = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (b, SIZE, SIZE, 3), dtype=torch.uint8, generator=gen)
    return {"views": views.pin_memory() if pin else views,
            "labels": torch.randint(CLASSES, (b,), generator=gen), "partner_labels": torch.randint(CLASSES, (b,), generator=gen),
            "lam": torch.full((b,), 0.7), "topk_logprobs": (torch.randn(b, k, generator=gen).sort(1, descending=True).values - 3).half(),
            "topk_ids": torch.stack([torch.randperm(CLASSES, generator=gen)[:k] for _ in range(b)]),
            "log_leftover": torch.full((b,), -2.0), "shard": torch.zeros(b, dtype=torch.int64),
            "pos": torch.arange(b)}


def student_synthetic(s: Settings, m) -> dict:
    """The project's training step (`Learner.step`) on one pre-made batch, repeated: no data path."""
    from pipeline.distributed import World
    from pipeline.train import build_learner, cached_answers

    device = torch.device(s.device)
    world = World(0, 1, None)
    learner = build_learner(m.student, 100, CLASSES, cached_answers(device), device, world)
    learner.wrap(world)
    batch = _synthetic_batch(m.student.batch_size, pin=device.type == "cuda")
    step = iter(range(1, 10**9))
    seconds = _timed(lambda: learner.step(batch, next(step), 0), s.step_iters, warmup=3 + 10 * s.compile)
    return {"batch": m.student.batch_size, "images_per_s": m.student.batch_size / seconds}


def _deit_step(s: Settings):
    """(`deit224.deit_step` of DeiT-Ti on the device, the device)."""
    from benchmarks.deit224 import deit_step

    device = torch.device(s.device)
    return deit_step(device, compile=s.compile), device


def student_plain(s: Settings) -> dict:
    """A plain timm/torch DeiT-Ti step (`_deit_step`, hard loss) on a batch already on the device: the ceiling
    of any data path."""
    step, device = _deit_step(s)
    b = s.student_batch
    x = torch.randn(b, 3, SIZE, SIZE, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.softmax(torch.randn(b, CLASSES, device=device), 1)
    teacher = torch.randint(CLASSES, (b,), device=device)
    return {"batch": b, "images_per_s": b / _timed(lambda: step(x, target, teacher), s.step_iters,
                                                    warmup=3 + 10 * s.compile)}


def student_timm_input(s: Settings, m) -> dict:
    """A of issue #13 on the GPU: `_deit_step` without distillation, fed by timm's own input path over the shards
    `student_from_cache` reads, with its number of loader workers and its epochs (per-step images/s, the same
    steady share of the steps as `student_from_cache`)."""
    from benchmarks.deit224 import timm_loader, timm_mixup
    from pipeline.shards import load_shardlist

    step, device = _deit_step(s)
    urls = [entry.url for entry in load_shardlist(m.data.train).shards]
    loader = timm_loader(urls, s.student_batch, s.workers, m.student.shuffle_buffer, persistent=True,
                         pin=device.type == "cuda")
    mixup, rates = timm_mixup(), []
    tick = time.perf_counter()
    for _ in range(s.student_epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, target = mixup(x, y)
            step(x.contiguous(memory_format=torch.channels_last), target, None)
            _sync()
            now = time.perf_counter()
            rates.append(s.student_batch / (now - tick))
            tick = now
    steady = rates[max(1, len(rates) // 4):]
    return {"steps": len(rates), "batch": s.student_batch, "workers": s.workers,
            "images_per_s": statistics.median(steady) if steady else None}


def nccl_all_reduce(device_type: str = "cuda") -> dict:
    """All-reduce over NCCL: the torchrun group when there is one, else a one-rank group on this GPU (gloo on
    the CPU smoke run)."""
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    own_group = not dist.is_initialized()
    if own_group:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend)
        else:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        value = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(value)
        want = world * (world + 1) / 2
        if not torch.allclose(value, torch.full_like(value, want)):
            raise RuntimeError(f"all_reduce gave {value.tolist()}, expected {want} on every element")
        payload = torch.ones(64 * 2**20 if backend == "nccl" else 2**16, dtype=torch.float32, device=device)
        seconds = _timed(lambda: dist.all_reduce(payload), iters=10, warmup=2)
        bus = 2 * (world - 1) / world * payload.numel() * 4 / seconds if world > 1 else None
        return {"ok": True, "backend": backend, "world_size": world, "rank": rank, "sum": value[0].item(),
                "payload_mib": payload.numel() * 4 / 2**20, "all_reduce_ms": seconds * 1e3, "bus_gb_per_s": None if bus is None else bus / 1e9,
                "nccl_version": str(torch.cuda.nccl.version()) if backend == "nccl" else None}
    finally:
        if own_group:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- the run


def _attempt(results: dict, name: str, fn):
    start = time.perf_counter()
    print(f"bench-gpu: {name} ...", flush=True)
    try:
        value = fn()
    except Exception as e:
        results["errors"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()
        results["tracebacks"][name] = traceback.format_exc()
        print(f"bench-gpu: {name} FAILED: {results['errors'][name]}", flush=True)
        return None
    results["measurements"][name] = value
    results["seconds"][name] = round(time.perf_counter() - start, 1)
    print(f"bench-gpu: {name}: {json.dumps(value, default=str)}", flush=True)
    return value


def run(s: Settings, out: Path, work: Path, command: str = "") -> dict:
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command, "code": _code(),
               "machine": machine(s.device), "settings": dataclasses.asdict(s), "measurements": {}, "errors": {},
               "tracebacks": {}, "seconds": {}}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        torch.backends.cudnn.benchmark = True
        data = _attempt(results, "photos", lambda: _photos(s, work))  # before CUDA starts: it forks
        forward = _attempt(results, "teacher_forward", lambda: teacher_forward(s, work))
        m = None
        if data is not None and (work / "teacher.pt").is_file():
            try:
                m = _manifest(s, work, data["train"], data["val"])
            except Exception as e:
                results["errors"]["manifest"] = f"{type(e).__name__}: {e}"
                results["tracebacks"]["manifest"] = traceback.format_exc()
        if m is not None:
            stage = _attempt(results, "teacher_cache", lambda: teacher_cache_stage(s, work, m, forward))
            if stage is not None:
                _attempt(results, "student_from_cache", lambda: student_from_cache(s, work, m))
                _attempt(results, "student_timm_input", lambda: student_timm_input(s, m))
                _attempt(results, "student_sweep", lambda: student_sweep(s, work, m))
                _attempt(results, "student_sweep_demo_student", lambda: student_sweep(s, work, m, DEMO_STUDENT))
            _attempt(results, "student_synthetic", lambda: student_synthetic(s, m))
        _attempt(results, "student_plain", lambda: student_plain(s))
    _attempt(results, "nccl", lambda: nccl_all_reduce(s.device))
    meas = results["measurements"]
    if "student_from_cache" in meas and "student_synthetic" in meas and meas["student_from_cache"]["images_per_s"]:
        results["student_data_share"] = meas["student_from_cache"]["images_per_s"] / meas["student_synthetic"]["images_per_s"]
    if meas.get("student_from_cache", {}).get("images_per_s") and meas.get("student_timm_input", {}).get("images_per_s"):
        results["b_over_a_224"] = meas["student_from_cache"]["images_per_s"] / meas["student_timm_input"]["images_per_s"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def summary(results: dict) -> str:
    where = results["machine"].get("gpu") or "cpu (smoke run: numbers meaningless)"
    meas, lines = results["measurements"], [f"bench-gpu on {where} ({results['date']}):"]

    def get(section, key):
        value = meas.get(section, {}).get(key)
        if isinstance(value, float):
            return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
        return "n/a" if value is None else str(value)

    lines.append(f"  teacher {TEACHER} forward alone: {get('teacher_forward', 'views_per_s')} views/s "
                 f"(eager {get('teacher_forward', 'eager_views_per_s')}, compiled "
                 f"{get('teacher_forward', 'compiled_views_per_s')}, stage forward "
                 f"{get('teacher_forward', 'stage_forward_views_per_s')})")
    tc = meas.get("teacher_cache", {})
    lines.append(f"  teacher-cache stage: {get('teacher_cache', 'views_per_s')} views/s"
                 + (f" = {tc['share_of_teacher_forward']:.2f} of the forward alone" if "share_of_teacher_forward" in tc else ""))
    lines.append(f"  student {STUDENT} from the cache: {get('student_from_cache', 'images_per_s')} images/s; "
                 f"synthetic batch (Learner.step): {get('student_synthetic', 'images_per_s')}; plain step: "
                 f"{get('student_plain', 'images_per_s')}")
    if "b_over_a_224" in results:
        lines.append(f"  timm's input path, same step without distillation (A): {get('student_timm_input', 'images_per_s')} "
                     f"images/s; from the cache / A = {results['b_over_a_224']:.2f}")
    if "student_data_share" in results:
        lines.append(f"  data path share of the synthetic step rate: {results['student_data_share']:.2f}")
    for name, what in (("student_sweep", "DeiT-Ti"), ("student_sweep_demo_student", "demo-student (issue #14)")):
        if name in meas:
            sw = meas[name]
            lines.append(f"  sweep of {sw['students']} {what} students: one shared pass {sw['shared_s']} s, one after "
                         f"another {sw['separate_s']} s: shared / separate = {sw['shared_over_separate']:.2f}")
    lines.append(f"  nccl all-reduce: {'ok' if meas.get('nccl', {}).get('ok') else 'n/a'} "
                 f"(world {get('nccl', 'world_size')}, {get('nccl', 'payload_mib')} MiB in {get('nccl', 'all_reduce_ms')} ms)")
    for name, error in results["errors"].items():
        lines.append(f"  FAILED {name}: {error}")
    return "\n".join(lines)


RECORDED = Path(__file__).with_name("gpu_runs")  # bench-gpu results from lent GPUs, shown in BENCHMARKS.md


def recorded() -> list[tuple[str, dict]]:
    """(file name, results) of the recorded runs, oldest first."""
    return [(path.name, json.loads(path.read_text())) for path in sorted(RECORDED.glob("*.json"))]


GPU_HEADING = "## GPU (`make bench-gpu`, recorded runs)"
BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def _code() -> str:
    """The commit the run measured (`-dirty`: with uncommitted changes), for the recorded file."""
    from pipeline.demo import commit

    return commit(Path(__file__).resolve().parents[1]) or "unknown (not a git checkout)"


def record(results: dict, name: str, benchmarks_md: Path) -> Path:
    """Keep a run: its JSON as `gpu_runs/<name>.json`, and the GPU section of `benchmarks_md` rewritten from
    every recorded run (the rest of the file is left as it is). A run made where the commit could not be read
    (a copy of the tree without .git, as on a lent machine) gets this checkout's, marked as such."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--record {name!r}: give a plain file name such as 2026-12-07-h100")
    if "skipped" in results or "measurements" not in results:
        raise ValueError(f"--record {name}: the run measured nothing ({results.get('skipped', 'no measurements')})")
    path = RECORDED / f"{name.removesuffix('.json')}.json"
    if path.exists():
        raise FileExistsError(f"{path} is recorded already: choose another --record name")
    code = results.get("code") or "unknown"
    if code.startswith("unknown"):
        code = f"{_code()} (the checkout that recorded the run)"
    path.write_text(json.dumps({**results, "code": code}, indent=2, default=str) + "\n")
    text = benchmarks_md.read_text()
    section = "\n".join(markdown(recorded())) + "\n"
    if GPU_HEADING in text:
        start = text.index(GPU_HEADING)
        end = text.find("\n## ", start + len(GPU_HEADING))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    benchmarks_md.write_text(text)
    return path


def markdown(runs: list[tuple[str, dict]]) -> list[str]:
    """BENCHMARKS.md's GPU section: one row per recorded `make bench-gpu` run (`benchmarks/gpu_runs/`)."""
    if not runs:
        return []

    def n(value, digits: str = ",.0f") -> str:
        return "n/a" if value is None else format(value, digits)

    lines = [GPU_HEADING, "",
             "Each row is one `benchmarks/bench_gpu.py` run on a lent GPU, its JSON kept in `benchmarks/gpu_runs/` "
             "(the command and the code it ran are in the file). Stage 1 is `regnety_160` (random weights, 224 px, "
             "bf16, channels_last) over generated ImageNet-like JPEG shards with DeiT's recipe; the student is "
             "DeiT-Ti from that cache (hard distillation, batch 128).", "",
             "| run | GPU, torch | teacher forward views/s (compiled) | stage 1 views/s (share of forward) | "
             "student from cache img/s (B) | timm's input path img/s (A) | B / A | synthetic step img/s | "
             "plain timm step img/s | 4-student sweep shared / separate: DeiT-Ti (demo student) | NCCL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs:
        meas, mach = r.get("measurements", {}), r.get("machine", {})
        fwd, tc = meas.get("teacher_forward", {}), meas.get("teacher_cache", {})
        sweep, small = meas.get("student_sweep", {}), meas.get("student_sweep_demo_student", {})
        lines.append(
            f"| `{name}` | {mach.get('gpu')}, torch {mach.get('torch')} | {n(fwd.get('eager_views_per_s'))} "
            f"({n(fwd.get('compiled_views_per_s'))}) | {n(tc.get('views_per_s'))} "
            f"({n(tc.get('share_of_teacher_forward'), '.2f')}) | "
            f"{n(meas.get('student_from_cache', {}).get('images_per_s'))} | "
            f"{n(meas.get('student_timm_input', {}).get('images_per_s'))} | {n(r.get('b_over_a_224'), '.2f')} | "
            f"{n(meas.get('student_synthetic', {}).get('images_per_s'))} | "
            f"{n(meas.get('student_plain', {}).get('images_per_s'))} | "
            f"{n(sweep.get('shared_over_separate'), '.2f')} ({n(small.get('shared_over_separate'), '.2f')}) | "
            f"{'ok' if meas.get('nccl', {}).get('ok') else 'n/a'} |")
    lines += ["", "Code and command of each run: " + "; ".join(f"`{name}`: {r.get('code', 'n/a')}, "
                                                             f"`{r.get('command', 'n/a')}`" for name, r in runs) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/gpu.json", help="JSON results file [bench/gpu.json]")
    parser.add_argument("--work", default=None, help="scratch directory, wiped first [<out dir>/gpu-work]")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the teacher and the student")
    parser.add_argument("--quick", action="store_true", help="fewer images and iterations (a smoke run)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers of stage 1 and the student [cores - 2, at most 12]")
    parser.add_argument("--images", type=int, default=None, help="train photos to generate [(2 x workers + 2) x 128; quick (workers + 2) x 128]")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of every code path with tiny batches (numbers meaningless) [cuda]")
    parser.add_argument("--record", metavar="NAME", default=None,
                        help="keep the run as benchmarks/gpu_runs/NAME.json and rewrite BENCHMARKS.md's GPU table")
    parser.add_argument("--from", dest="source", metavar="FILE", default=None,
                        help="with --record: keep the run already in FILE (a --out of a GPU machine) instead of running")
    args = parser.parse_args(argv)
    if args.source:
        if not args.record:
            parser.error("--from FILE needs --record NAME")
        try:
            kept = record(json.loads(Path(args.source).read_text()), args.record, BENCHMARKS_MD)
        except (OSError, ValueError) as e:  # FileExistsError, JSONDecodeError too
            parser.exit(2, f"bench-gpu: cannot record {args.source}: {e}\n")
        print(f"bench-gpu: recorded {args.source} as {kept} and rewrote BENCHMARKS.md's GPU table")
        return 0
    out = Path(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device is visible (torch.cuda.is_available() is False): bench-gpu skipped"
        print(f"bench-gpu: {reason}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"skipped": reason}, indent=2) + "\n")
        return 0
    smoke = args.device == "cpu"
    default_workers = 0 if smoke else max(1, min(12, (os.cpu_count() or 4) - 2))
    workers = args.workers if args.workers is not None else default_workers
    batch, shard_size = (4, 16) if smoke else (128, 128)
    # every loader worker batches its own share: two batches per worker per epoch (one when quick or smoke)
    images = args.images or (1 if args.quick or smoke else 2) * max(1, workers) * batch + 2 * shard_size
    s = Settings(images=images, shard_size=shard_size, teacher_batch=batch, student_batch=batch,
                 student_epochs=2, forward_iters=2 if smoke else 5 if args.quick else 20,
                 step_iters=2 if smoke else 5 if args.quick else 30, workers=workers, compile=args.compile,
                 device=args.device)
    if args.record and smoke:
        parser.error("--record keeps GPU runs only; a --device cpu run's numbers are meaningless")
    command = "python -m benchmarks.bench_gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(s, out, Path(args.work) if args.work else out.parent / "gpu-work", command.strip())
    print(summary(results))
    print(f"bench-gpu: wrote {out}")
    if args.record:
        try:
            kept = record(results, args.record, BENCHMARKS_MD)
        except (OSError, ValueError) as e:
            parser.exit(2, f"bench-gpu: the run is in {out} but was not recorded: {e}\n")
        print(f"bench-gpu: recorded {kept} and rewrote BENCHMARKS.md's GPU table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
