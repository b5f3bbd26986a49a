"""`make bench`: the project's speed and storage claims, measured side by side and written down.

Five measurements, each a function that returns plain JSON data; `run` writes them to `results.json` and
renders BENCHMARKS.md (`report`):

1. `student`: images/s of the training loop (`pipeline.train.train`) from the cache, vs the same loop with
   no distillation (the cost floor, same data path) and with the teacher run online on the same views;
   plus the teacher-forward : student-step cost ratio of the pair, measured on pre-made batches.
2. `cache_stage`: views/s of stage 1 (`teacher_cache.run`) vs the teacher's forward alone on pre-made
   batches of the same shape, and where the stage's time goes. The phases are timed by wrapping the
   stage's own functions for the duration of the run (`PhaseTimer`); stage 1 itself is not changed.
3. `cache_read`: views/s of `cache.SlabReader`, the student's reader, in one process (and of `cache.read_slab`,
   which opens the arrays and checks the unit on every call).
4. `storage`: bytes per view on disk, per field, for several K, next to TinyViT's 4K+4, on synthetic caches
   written by `cache.create`/`cache.write_unit` (real view parameters, synthetic ImageNet-like logits);
   and every lossless codec candidate tried on every field, so the codec choice in `cache.py` is a
   measured one.
5. `view_replay`: decode and render per view (the student's data floor) on the digits and on ImageNet-like
   photos, with a profile of the render.

Each comparison interleaves its alternatives (A B A B ...), so a shared, noisy machine slows them alike;
the report gives medians and ratios of medians. The bench builds everything it measures (digits shards, a
randomly initialised teacher, caches) under `<out>/work`, which it wipes first.
"""

from __future__ import annotations

import cProfile
import dataclasses
import functools
import importlib.metadata
import inspect
import json
import os
import platform
import pstats
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image, ImageFilter
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from pipeline import cache, teacher_cache, views
from pipeline.distributed import World
from pipeline.losses import deit_loss, mixed_target, sparse_teacher_answers
from pipeline.manifest import Manifest, ViewsCfg
from pipeline.reader import read_shard
from pipeline.shards import build_shardlist, load_shardlist, write_digits, write_imagefolder
from pipeline.student import create_student
from pipeline.student_data import CACHED_FIELDS
from pipeline.teacher import create_model, load_teacher, normalize

SECTIONS = ("storage", "cache_read", "view_replay", "cache_stage", "student")
STORED_FIELDS = ("topk_logprobs", "topk_ids", "log_leftover", "view", "digest")  # per view, in the report's order
SHARD_SIZE = 100  # samples per digits shard the bench writes
VERSIONED = ("torch", "torchvision", "timm", "webdataset", "zarr", "numcodecs", "numpy", "pillow")


def tinyvit_bytes(top_k: int) -> int:
    """TinyViT's per-view record: K float16 probabilities, K int16 ids, a 4-byte seed."""
    return 4 * top_k + 4


@dataclass(frozen=True, slots=True)
class Settings:
    """How big each measurement is: FULL fits `make bench` in a few minutes on two cores, QUICK is the
    smoke run. FULL's pair is DeiT's (a RegNetY teacher, a distilled ViT student) scaled down to the 32 px
    digits: the demo's student, and a teacher whose forward costs about 4 student train steps, as
    RegNetY-16GF's does against DeiT-Ti's. The student step outweighs replaying a view, so with one loader
    worker on the second core the loop is bound by the step, not by the data."""

    reps: int  # interleaved repetitions of every comparison
    top_ks: tuple[int, ...]  # storage and cache read
    classes: int
    positions: int  # per synthetic shard
    shards: int
    shards_per_unit: int
    slab_reads: int  # read_slab calls per timed repetition
    replay_views: int  # digits views per repetition
    photos: int  # ImageNet-like photos per repetition
    photo_size: int  # their render size (DeiT's 224)
    train_shards: int  # digits shards of SHARD_SIZE samples for the cache stage and the student
    img_size: int
    teacher_model: str
    teacher_args: dict
    student_args: dict
    patch_size: int
    cache_batch: int
    student_batch: int
    student_workers: int  # loader workers of the student runs (1: the views render on the second core)
    model_batches: int  # batches per repetition of the pre-made-batch timings


FULL = Settings(reps=5, top_ks=(1, 5, 10, 100), classes=1000, positions=1000, shards=8, shards_per_unit=8,
                slab_reads=8, replay_views=100, photos=32, photo_size=224, train_shards=6, img_size=32,
                teacher_model="regnety_080", teacher_args={},
                student_args={"embed_dim": 64, "depth": 4, "num_heads": 2}, patch_size=4,
                cache_batch=64, student_batch=32, student_workers=1, model_batches=4)
QUICK = Settings(reps=2, top_ks=(1, 5, 10, 100), classes=1000, positions=64, shards=2, shards_per_unit=2,
                 slab_reads=4, replay_views=16, photos=2, photo_size=64, train_shards=1, img_size=16,
                 teacher_model="regnety_002",
                 teacher_args={"w0": 8, "wa": 13, "wm": 2.0, "group_size": 8, "depth": 4, "stem_width": 8},
                 student_args={"embed_dim": 16, "depth": 1, "num_heads": 2}, patch_size=4,
                 cache_batch=32, student_batch=16, student_workers=0, model_batches=2)


# --------------------------------------------------------------------------------------------- timing


def interleave(alternatives: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Each alternative once per repetition, in turn (A B A B ...); every alternative's values."""
    values: dict[str, list[float]] = {name: [] for name in alternatives}
    for _ in range(reps):
        for name, measure in alternatives.items():
            values[name].append(measure())
    return values


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wall time per phase, from wrappers put around module functions for the duration of `timing()`.
    Wrapped generators are charged only for the time spent producing each item."""

    def __init__(self, plan: dict[str, list[tuple[object, str]]]):
        self.plan = plan  # phase -> [(module, function name)]
        self.seconds: dict[str, float] = defaultdict(float)

    def _call(self, fn, phase):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
        return timed

    def _iterate(self, fn, phase):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            items = fn(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self.seconds[phase] += time.perf_counter() - start
                yield item
        return timed

    @contextmanager
    def timing(self):
        originals = []
        try:
            for phase, targets in self.plan.items():
                for module, name in targets:
                    fn = getattr(module, name)
                    originals.append((module, name, fn))
                    wrap = self._iterate if inspect.isgeneratorfunction(fn) else self._call
                    setattr(module, name, wrap(fn, phase))
            yield self
        finally:
            for module, name, fn in reversed(originals):
                setattr(module, name, fn)


# --------------------------------------------------------------------------------------------- the machine


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
        "ram_gib": None if ram is None else round(ram / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {name: importlib.metadata.version(name) for name in VERSIONED},
    }


# --------------------------------------------------------------------------------------------- inputs


def synthetic_logits(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """float32 [n, classes] logits shaped like an ImageNet teacher's on DeiT's mixed views: a Gaussian bulk
    N(0, 1.5^2) over all classes plus a heavy head. The view's own class gets +4 + Gamma(2, 2.5), its mix
    partner's class +2 + Gamma(2, 1.5), and five classes from the own class's block of 50 (ImageNet's
    class ids group related classes) +Exp(3) each."""
    z = rng.normal(0.0, 1.5, (n, classes)).astype(np.float32)
    rows = np.arange(n)
    own = rng.integers(classes, size=n)
    z[rows, own] += 4 + rng.gamma(2.0, 2.5, n)
    z[rows, rng.integers(classes, size=n)] += 2 + rng.gamma(2.0, 1.5, n)
    block = min(50, classes)
    for _ in range(5):
        near = np.minimum(own // block * block + rng.integers(block, size=n), classes - 1)
        z[rows, near] += rng.exponential(3.0, n)
    return z


def imagenet_like_params(rng: np.random.Generator, shards: int, positions: int) -> np.ndarray:
    """Real view parameters [shards, positions, N] from DeiT's recipe (`ViewsCfg()` defaults) for sources
    whose long side is uniform in 300..640 px and aspect in 0.6..1.8, as ImageNet's photos vary."""
    cfg = ViewsCfg()
    out = np.zeros((shards, positions, views.N_PARAMS), np.float32)
    for s in range(shards):
        for p in range(positions):
            long, aspect = int(rng.integers(300, 641)), rng.uniform(0.6, 1.8)
            size = (long, max(1, round(long / aspect))) if aspect >= 1 else (max(1, round(long * aspect)), long)
            out[s, p] = views.sample_params(cfg, 0, s, p, positions, size, size=224)  # DeiT's teacher size
    return out


def write_photos(root: Path, count: int, seed: int = 0) -> Path:
    """`count` ImageNet-like JPEGs (smooth random colour fields with texture, 400-520 x 330-400 px, quality
    90, about 50 KB) sharded with `write_imagefolder`; returns the shard list."""
    rng = np.random.default_rng(seed)
    src = root / "src" / "photo"
    src.mkdir(parents=True)
    for i in range(count):
        w, h = int(rng.integers(400, 521)), int(rng.integers(330, 401))
        coarse = rng.normal(0.0, 1.0, (h // 8 + 1, w // 8 + 1, 3))
        field = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w]
        pixels = np.clip(128 + 60 * field + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2)).save(src / f"{i:04d}.jpg", quality=90)
    return write_imagefolder(root / "src", root / "shards", shard_size=count)


def write_digit_shards(root: Path, train_shards: int) -> tuple[str, str]:
    """The digits as shards of SHARD_SIZE samples; shard lists over the first `train_shards` train shards and
    the first val shard."""
    lists = []
    for full, count in zip(write_digits(root, shard_size=SHARD_SIZE), (train_shards, 1)):
        whole = load_shardlist(full)
        subset = root / f"bench-{full.parent.name}.json"
        build_shardlist([s.url for s in whole.shards[:count]], subset, classes=whole.classes)
        lists.append(str(subset))
    return lists[0], lists[1]


def bench_manifest(base: Manifest, work: Path, s: Settings, device: str) -> Manifest:
    """The base manifest's view recipe with the bench's data, teacher/student pair and paths."""
    train, val = write_digit_shards(work / "digits", s.train_shards)
    teacher = replace(base.teacher, model=s.teacher_model, model_args=dict(s.teacher_args), pretrained=False,
                      checkpoint=str(work / "teacher.pt"), img_size=s.img_size)
    torch.manual_seed(0)
    num_classes = len(load_shardlist(train).classes)
    torch.save(create_model(teacher, num_classes).state_dict(), teacher.checkpoint)
    return replace(
        base,
        data=replace(base.data, train=train, val=val, builtin="none", on_error="raise"),
        teacher=teacher,
        cache=replace(base.cache, path=str(work / "cache"), epochs=1, top_k=min(10, num_classes),
                      batch_size=s.cache_batch, workers=0, shards_per_unit=1, device=device),
        student=replace(base.student, model="deit_tiny_distilled_patch16_224", model_args=dict(s.student_args),
                        img_size=s.img_size, patch_size=s.patch_size, epochs=1, batch_size=s.student_batch,
                        workers=s.student_workers, ema=None, verify_sample=0.0, ckpt_every=0, eval_every=1,
                        device=device, compile=False, run_dir=str(work / "runs" / "student")),
    ).check()


# --------------------------------------------------------------------------------------------- 4. storage


REFERENCE_CODEC = "blosc-zstd5-shuffle"  # the project's first choice; candidates must keep half its speed
PER_VIEW_VECTORS = ("topk_logprobs", "topk_ids", "view")  # fields with a trailing axis per view


def codec_candidates(name: str, dtype: str, ndim: int) -> dict[str, tuple[list, list]]:
    """codec name -> (filters, compressors), all lossless, each followed by the crc32c checksum. For fields
    with a vector per view, `transpose` swaps the last two axes inside a chunk, so that one rank's (or one
    parameter field's) values lie together."""
    size = np.dtype(dtype).itemsize

    def blosc(level, shuffle):
        return [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=size), Crc32cCodec()]

    out = {
        "blosc-zstd5-shuffle": ([], blosc(5, "shuffle")),
        "blosc-zstd9-shuffle": ([], blosc(9, "shuffle")),
        "blosc-zstd5-bitshuffle": ([], blosc(5, "bitshuffle")),
        "blosc-zstd9-bitshuffle": ([], blosc(9, "bitshuffle")),
        "blosc-zstd5-noshuffle": ([], blosc(5, "noshuffle")),
        "zstd5": ([], [ZstdCodec(level=5), Crc32cCodec()]),
    }
    if name in PER_VIEW_VECTORS:
        order = (*range(ndim - 2), ndim - 1, ndim - 2)
        out["transpose+blosc-zstd5-shuffle"] = ([TransposeCodec(order=order)], blosc(5, "shuffle"))
        out["transpose+blosc-zstd5-bitshuffle"] = ([TransposeCodec(order=order)], blosc(5, "bitshuffle"))
    return out


def describe_codecs(arr: zarr.Array) -> str:
    parts = [f"transpose{tuple(c.order)}" for c in arr.filters if isinstance(c, TransposeCodec)]
    for c in arr.compressors:
        if isinstance(c, BloscCodec):
            parts.append(f"blosc-{c.cname.value}{c.clevel}-{c.shuffle.value}")
        elif isinstance(c, ZstdCodec):
            parts.append(f"zstd{c.level}")
        elif isinstance(c, Crc32cCodec):
            parts.append("crc32c")
        else:
            parts.append(type(c).__name__)
    return "+".join(parts)


def chunk_bytes(array_dir: Path) -> int:
    """Bytes of an array's chunk files (its metadata excluded)."""
    return sum(f.stat().st_size for f in (array_dir / "c").rglob("*") if f.is_file())


def compare_codecs(root: Path, name: str, values: np.ndarray, chunks: tuple) -> dict[str, dict]:
    """Write `values` under every codec candidate: bytes per view, encode and decode rates (views/s, write
    and read of the whole array, median of 3), and a check that it reads back bit-identical."""
    views_count = int(np.prod(values.shape[:-1] if name in PER_VIEW_VECTORS else values.shape))
    group = zarr.open_group(str(root), mode="a")
    out = {}
    for codec, (filters, compressors) in codec_candidates(name, values.dtype.name, values.ndim).items():
        arr = group.create_array(f"{name}-{codec}", shape=values.shape, chunks=chunks, dtype=values.dtype,
                                 fill_value=0, filters=filters, compressors=compressors)
        encode, decode = [], []
        for _ in range(3):
            start = time.perf_counter()
            arr[...] = values
            encode.append(time.perf_counter() - start)
            start = time.perf_counter()
            back = arr[...]
            decode.append(time.perf_counter() - start)
        if not np.array_equal(back, values):
            raise AssertionError(f"codec {codec} did not give {name} back unchanged: it is not lossless")
        out[codec] = {"bytes_per_view": chunk_bytes(root / f"{name}-{codec}") / views_count,
                      "encode_views_per_s": views_count / statistics.median(encode),
                      "decode_views_per_s": views_count / statistics.median(decode)}
    return out


def storage(work: Path, s: Settings) -> dict:
    """Bytes per view per field at each K, written through `cache.create`/`cache.write_unit` (so with the
    codecs `cache.py` uses), and every codec candidate per field."""
    rng = np.random.default_rng(0)
    n = s.shards * s.positions
    logits = synthetic_logits(rng, n, s.classes)
    order = np.argsort(-logits, axis=1, kind="stable")
    lse = torch.logsumexp(torch.from_numpy(logits), dim=1).numpy().reshape(s.shards, s.positions)
    params = imagenet_like_params(rng, s.shards, s.positions)
    digests = rng.integers(1, 2**32 - 1, size=(s.shards, s.positions), dtype=np.uint32, endpoint=True)
    labels = rng.integers(s.classes, size=(s.shards, s.positions)).astype(np.int32)
    top1 = np.exp(logits.max(1) - lse.reshape(-1))
    result = {"views": n, "classes": s.classes, "positions_per_shard": s.positions,
              "chunk_views": s.shards_per_unit * s.positions, "mean_top1_probability": float(top1.mean()),
              "by_k": {}}
    for k in s.top_ks:
        shape = (s.shards, s.positions, k)
        answers = sparse_teacher_answers(torch.from_numpy(logits), k)
        fields = {"topk_logprobs": answers["topk_logprobs"].numpy().reshape(shape),
                  "topk_ids": answers["topk_ids"].numpy().astype(np.uint16 if s.classes <= 65535 else np.int32).reshape(shape),
                  "log_leftover": answers["log_leftover"].numpy().reshape(shape[:2]), "view": params, "digest": digests}
        stored = {name: cache.CODECS[name][0](v) if name in cache.CODECS else v for name, v in fields.items()}
        layout = cache.CacheLayout(shards=s.shards, positions=s.positions, top_k=k, num_classes=s.classes,
                                   n_params=views.N_PARAMS, shards_per_unit=s.shards_per_unit, epochs=1)
        path = work / "storage" / f"k{k}"
        root = cache.create(str(path), {"train": layout},
                            {"classes": [str(c) for c in range(s.classes)], "top_k": k, "synthetic": True})
        for group in range(layout.groups):
            shards = layout.group_shards(group)
            unit = {name: values[shards.start:shards.stop] for name, values in fields.items()}
            cache.write_unit(root, "train", 0, group, {**unit, "labels": labels[shards.start:shards.stop]})
        for shard in range(s.shards):  # the student's reader gives back exactly what was written
            slab = cache.read_slab(root, "train", 0, shard, STORED_FIELDS)
            for name in STORED_FIELDS:
                if not np.array_equal(slab[name], fields[name][shard]):
                    raise AssertionError(f"{path}: field {name} of shard {shard} did not read back unchanged")
        per_field = {name: chunk_bytes(path / "train" / name) / n for name in STORED_FIELDS}
        total = sum(per_field.values())
        metadata = sum(f.stat().st_size for f in path.rglob("zarr.json"))
        candidates = {}
        for name in STORED_FIELDS:
            if name in ("topk_logprobs", "topk_ids") or k == s.top_ks[0]:  # the others do not depend on K
                chunks = (s.shards_per_unit,) + stored[name].shape[1:]
                candidates[name] = compare_codecs(work / "codecs" / f"k{k}", name, stored[name], chunks)
        result["by_k"][str(k)] = {
            "bytes_per_view": per_field, "total": total, "tinyvit": tinyvit_bytes(k),
            "topk_only": per_field["topk_logprobs"] + per_field["topk_ids"],
            "raw_bytes_per_view": {name: stored[name][0, 0].nbytes for name in STORED_FIELDS},
            "labels_per_sample": chunk_bytes(path / "train" / "labels") / n,
            "metadata_bytes": metadata,
            "in_use": {name: describe_codecs(root["train"][name]) for name in STORED_FIELDS},
            "candidates": candidates,
        }
    result["best"] = best_codecs(result)
    return result


def best_codecs(result: dict) -> dict[str, dict]:
    """Per field, the candidate with the fewest bytes summed over the measured K (fields that do not depend
    on K: their one measurement) among those that encode and decode at least half as fast as
    REFERENCE_CODEC (summed time over K), so stage 1's writes and the student's reads do not slow down for a
    few bytes; the reference itself unless the winner saves at least 1%. Also what `cache.py` writes now."""
    best = {}
    for name in STORED_FIELDS:
        size: dict[str, float] = defaultdict(float)
        seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        in_use = 0.0
        for entry in result["by_k"].values():
            if name in entry["candidates"]:
                for codec, numbers in entry["candidates"][name].items():
                    size[codec] += numbers["bytes_per_view"]
                    seconds[codec][0] += 1.0 / numbers["encode_views_per_s"]
                    seconds[codec][1] += 1.0 / numbers["decode_views_per_s"]
                in_use += entry["bytes_per_view"][name]
        if not size:
            continue
        ref = seconds[REFERENCE_CODEC]
        fast = [c for c in size if seconds[c][0] <= 2 * ref[0] and seconds[c][1] <= 2 * ref[1]]
        winner = min(fast, key=size.get)
        if size[REFERENCE_CODEC] <= 1.01 * size[winner]:
            winner = REFERENCE_CODEC
        best[name] = {"codec": winner, "bytes_per_view_summed": size[winner], "in_use_summed": in_use,
                      "smallest_overall": min(size, key=size.get),
                      "smallest_overall_bytes": min(size.values())}
    return best


# --------------------------------------------------------------------------------------------- 3. cache read


def cache_read(work: Path, s: Settings) -> dict:
    """views/s of the student's reader (`cache.SlabReader`, a new one per repetition, opened before the clock
    starts: it checks each unit once and decodes each unit's chunks once for a run of its shards) and of
    `cache.read_slab` (one shard's slab of the student's fields per call) over the storage caches; of the same
    slab read through array handles opened once; and of a whole unit (a chunk: shards_per_unit shards) read
    through them, the floor of a reader that keeps its handles and decodes each chunk once."""
    out = {}
    for k in [k for k in s.top_ks if k in (10, 100)] or s.top_ks:
        root = cache.open_cache(str(work / "storage" / f"k{k}"))
        arrays = {name: root["train"][name] for name in CACHED_FIELDS if name in root["train"]}

        def rate(read_one, views_per_read, opened=lambda: None):
            def measure():
                state = opened()  # outside the clock, like the open handles: a reader lives for an epoch
                start = time.perf_counter()
                for i in range(s.slab_reads):
                    read_one(i, state)
                return s.slab_reads * views_per_read / (time.perf_counter() - start)
            return measure

        def reader(i, slab_reader):
            slab_reader.read(0, i % s.shards, CACHED_FIELDS)

        def slab(i, _, root=root):
            cache.read_slab(root, "train", 0, i % s.shards, CACHED_FIELDS)

        def opened_slab(i, _, arrays=arrays):
            {name: arr[0, i % s.shards] for name, arr in arrays.items()}

        def opened_unit(i, _, arrays=arrays):
            first = i % (s.shards // s.shards_per_unit) * s.shards_per_unit
            {name: arr[0, first:first + s.shards_per_unit] for name, arr in arrays.items()}

        runs = interleave({"slab_reader": rate(reader, s.positions, lambda root=root: cache.SlabReader(root, "train")),
                           "read_slab": rate(slab, s.positions), "opened_slab": rate(opened_slab, s.positions),
                           "opened_unit": rate(opened_unit, s.positions * s.shards_per_unit)}, s.reps)
        out[str(k)] = {name: summary(values) for name, values in runs.items()} | {
            "views_per_slab": s.positions, "views_per_unit": s.positions * s.shards_per_unit}
    return out


# --------------------------------------------------------------------------------------------- 5. view replay


def _replay_set(shardlist_path: str, count: int, size: int, cfg: ViewsCfg, reps: int) -> dict:
    """ms per view of decoding (the shard reader), of the student's render (`views.ShardViews`: each unmixed
    view once, then the mix), of `views.render` per view (which renders the mix partner's unmixed view again),
    and of the unmixed render alone; plus a profile of the student's render."""
    shardlist = load_shardlist(shardlist_path)
    n = shardlist.shards[0].samples
    window = cfg.mix.window
    count = n if count >= n else min(n, max(window, count // window * window))  # whole mix windows
    samples = list(read_shard(shardlist, 0, stop=count))
    # drawn as if the shard ended at `count`, so every mix partner is among the samples read
    params = [views.sample_params(cfg, 0, 0, x.pos, count, x.image.size, size=size) for x in samples]
    partners = [views.mix_target(p)[0] for p in params]

    def decode():
        start = time.perf_counter()
        for _ in read_shard(shardlist, 0, stop=count):
            pass
        return (time.perf_counter() - start) * 1e3 / count

    def render():
        start = time.perf_counter()
        shard_views = views.ShardViews({x.pos: x.image for x in samples}, params, size, cfg)
        for x in samples:
            shard_views.view(x.pos)
        return (time.perf_counter() - start) * 1e3 / count

    def render_each():
        start = time.perf_counter()
        for x, p, q in zip(samples, params, partners):
            views.render(x.image, p, size, cfg, partner_image=samples[q].image, partner_params=params[q])
        return (time.perf_counter() - start) * 1e3 / count

    def render_unmixed():
        start = time.perf_counter()
        for x, p in zip(samples, params):
            views.render_unmixed(x.image, p, size, cfg)
        return (time.perf_counter() - start) * 1e3 / count

    runs = interleave({"decode_ms": decode, "render_ms": render, "render_each_ms": render_each,
                       "render_unmixed_ms": render_unmixed}, reps)
    profile = cProfile.Profile()
    profile.runcall(render)
    stats = pstats.Stats(profile)
    total = stats.total_tt
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    hot = [{"function": func if file == "~" else f"{Path(file).name}:{line}({func})", "calls": calls,
            "share": tottime / total}
           for (file, line, func), (_, calls, tottime, _, _) in top]
    mixed = sum(1 for x, q in zip(samples, partners) if q != x.pos)
    return {name: summary(values) for name, values in runs.items()} | {
        "views": count, "size": size, "mixed_share": mixed / count, "profile_top_tottime": hot,
        "source_size": list(samples[0].image.size)}


def view_replay(work: Path, m: Manifest, s: Settings) -> dict:
    photos = write_photos(work / "photos", s.photos)
    return {
        "digits": _replay_set(m.data.train, s.replay_views, m.student.img_size, m.views, s.reps),
        "photos": _replay_set(str(photos), s.photos, s.photo_size, ViewsCfg(), s.reps),
    }


# --------------------------------------------------------------------------------------------- 2. cache stage


STAGE_PHASES = {
    "decode": [(teacher_cache, "read_shard")],
    "view_params": [(views, "sample_params")],
    "render": [(views, "render_unmixed"), (views, "mix"), (views, "eval_view")],
    "digest": [(views, "view_digest")],
    "teacher": [(teacher_cache, "forward")],
    "write": [(cache, "write_unit")],
}


def teacher_alone(teacher, views_u8: torch.Tensor, count: int, device: torch.device) -> float:
    """views/s of the teacher's forward on a pre-made uint8 batch, over about `count` views."""
    batches = max(1, -(-count // len(views_u8)))
    teacher_cache.forward(teacher, views_u8, device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        teacher_cache.forward(teacher, views_u8, device)
    _sync(device)
    return batches * len(views_u8) / (time.perf_counter() - start)


def cache_stage(work: Path, m: Manifest, s: Settings) -> dict:
    """Stage 1 into a fresh cache per repetition, against the teacher's forward alone on the same number of
    views in batches of cache.batch_size. Leaves the first repetition's cache at m.cache.path."""
    device = teacher_cache.pick_device(m.cache.device)
    train, val = load_shardlist(m.data.train), load_shardlist(m.data.val)
    teacher = load_teacher(m.teacher, len(train.classes), device)
    total = m.cache.epochs * train.num_samples + val.num_samples
    batch = torch.randint(0, 256, (m.cache.batch_size, m.teacher.img_size, m.teacher.img_size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    phases: list[dict] = []

    def stage():
        path = m.cache.path if not phases else f"{m.cache.path}-rep{len(phases)}"
        timer = PhaseTimer(STAGE_PHASES)
        with timer.timing():
            result = teacher_cache.run(replace(m, cache=replace(m.cache, path=path)), progress=False)
        if result["views"] != total:
            raise RuntimeError(f"the bench's stage run filled {result['views']} views, expected {total}")
        shares = {name: timer.seconds[name] / result["seconds"] for name in STAGE_PHASES}
        phases.append(shares | {"other": max(0.0, 1.0 - sum(shares.values()))})
        return result["views_per_s"]

    runs = interleave({"stage": stage, "teacher_alone": lambda: teacher_alone(teacher, batch, total, device)}, s.reps)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {name: summary(values) for name, values in runs.items()} | {
        "efficiency": medians["stage"] / medians["teacher_alone"],
        "phase_shares": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
        "views_per_run": total, "batch_size": m.cache.batch_size, "workers": m.cache.workers, "device": str(device),
        "teacher": {"model": m.teacher.model, "model_args": m.teacher.model_args, "img_size": m.teacher.img_size},
    }


# --------------------------------------------------------------------------------------------- 1. student


def model_steps(m: Manifest, s: Settings, device: torch.device) -> dict[str, Callable[[], float]]:
    """Measures of the seconds per image of one student train step (forward, DeiT hard loss, backward,
    AdamW) and of one teacher forward, on pre-made batches of student.batch_size (no data path)."""
    from timm.optim import create_optimizer_v2

    num_classes = len(load_shardlist(m.data.train).classes)
    gen = torch.Generator().manual_seed(0)
    b = m.student.batch_size
    student_model = create_student(m.student, num_classes)
    model = student_model.model.to(device)
    optimizer = create_optimizer_v2(model, opt=m.student.optim.name, lr=m.student.optim.lr,
                                    weight_decay=m.student.optim.weight_decay)
    teacher = load_teacher(m.teacher, num_classes, device)
    student_u8 = torch.randint(0, 256, (b, m.student.img_size, m.student.img_size, 3), dtype=torch.uint8, generator=gen)
    teacher_u8 = torch.randint(0, 256, (b, m.teacher.img_size, m.teacher.img_size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(num_classes, (b,), generator=gen).to(device)
    k = m.cache.top_k
    answers = {name: value.to(device) for name, value in
               sparse_teacher_answers(torch.randn(b, num_classes, generator=gen) * 3, k).items()}
    target = mixed_target(labels, labels.roll(1), torch.full((b,), 0.7, device=device), num_classes,
                          m.student.smoothing)

    def step():
        x = normalize(student_u8.to(device), student_model.mean, student_model.std)
        cls_logits, dist_logits = model(x)
        loss = deit_loss(cls_logits, dist_logits, target, answers, "hard", m.student.alpha, m.student.tau)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def per_image(fn):
        def measure():
            fn()
            _sync(device)
            start = time.perf_counter()
            for _ in range(s.model_batches):
                fn()
            _sync(device)
            return (time.perf_counter() - start) / (s.model_batches * b)
        return measure

    return {"student_step_s": per_image(step),
            "teacher_forward_s": per_image(lambda: teacher_cache.forward(teacher, teacher_u8, device))}


def _loop_rate(run_dir: Path) -> float:
    """The median of a run's logged per-step images/s, the first (warm-up) step left out: a step that a
    neighbouring process slowed down does not move it."""
    rates = [json.loads(line)["images_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"][1:]
    if not rates:
        raise RuntimeError(f"{run_dir}: the bench's student run logged fewer than two steps; give it more data")
    return statistics.median(rates)


def student(work: Path, m: Manifest, s: Settings) -> dict:
    """The training loop (`pipeline.train.train`) three ways, each in a fresh run directory: from the cache
    (the manifest's distillation mode), with no distillation (mode `none`, same data path: the floor), and
    with the teacher online on the same views; interleaved with the student step and the teacher forward
    on pre-made batches, so the ideal speedup (t_s + t_t) / t_s comes from the same moments. Ratios are
    ratios of the medians over the repetitions."""
    from pipeline.train import train

    device = teacher_cache.pick_device(m.student.device)
    modes = {"no_distillation": ("none", "cache"), "cached": (m.student.distillation, "cache"),
             "online": (m.student.distillation, "online")}
    counter = iter(range(10**6))

    def loop(mode: str) -> Callable[[], float]:
        distillation, answers = modes[mode]

        def measure():
            run_dir = work / "runs" / f"{mode}-{next(counter)}"
            spec = replace(m, student=replace(m.student, distillation=distillation, run_dir=str(run_dir)))
            train(spec, World(0, 1, None), answers=answers, progress=False)
            return _loop_rate(run_dir)
        return measure

    runs = interleave({mode: loop(mode) for mode in modes} | model_steps(m, s, device), s.reps)
    med = {name: statistics.median(values) for name, values in runs.items()}
    speedup = med["cached"] / med["online"]
    ideal = 1.0 + med["teacher_forward_s"] * med["cached"]  # (t_s + t_t) / t_s with t_s = 1 / cached rate
    return {name: summary(values) for name, values in runs.items()} | {
        "cached_vs_floor": med["cached"] / med["no_distillation"],
        "online_speedup": speedup, "ideal_speedup": ideal, "share_of_ideal": speedup / ideal,
        "teacher_to_student": med["teacher_forward_s"] / med["student_step_s"],
        "distillation": m.student.distillation, "batch_size": m.student.batch_size, "device": str(device),
        "workers": m.student.workers,
        "student": {"model": m.student.model, "model_args": m.student.model_args, "img_size": m.student.img_size,
                    "patch_size": m.student.patch_size},
        "teacher": {"model": m.teacher.model, "model_args": m.teacher.model_args, "img_size": m.teacher.img_size},
    }


# --------------------------------------------------------------------------------------------- the run


def run(out: str | Path, quick: bool = False, markdown: str | Path | None = None, only: tuple[str, ...] = (),
        device: str = "cpu", manifest: Manifest | None = None, command: str = "distill bench",
        threads: int = 1) -> dict:
    """Run the sections (all, or `only`), write `<out>/results.json` and the markdown report; returns the
    results. `threads`: torch's intra-op threads in this process (1 gives per-core rates, which a shared
    machine disturbs least: two spinning threads on two busy cores collapse). `manifest` supplies the view
    recipe of the digits runs (the CLI passes manifests/demo.yaml's; default `Manifest()`, DeiT's recipe);
    `command` is recorded as the way to reproduce the numbers."""
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section {unknown[0]!r}: valid sections are {', '.join(SECTIONS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible: use --device cpu or auto")
    if threads < 1:
        raise ValueError(f"--threads {threads} must be at least 1")
    torch.set_num_threads(threads)
    chosen = [name for name in SECTIONS if not only or name in only]
    settings = QUICK if quick else FULL
    out = Path(out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch_device = teacher_cache.pick_device(device)
    results = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "quick": quick, "machine": machine(torch_device), "settings": dataclasses.asdict(settings),
               "sections": {}, "seconds": {}}
    m = bench_manifest(manifest or Manifest(), work, settings, device)
    steps = {
        "storage": lambda: storage(work, settings),
        "cache_read": lambda: cache_read(work, settings),
        "view_replay": lambda: view_replay(work, m, settings),
        "cache_stage": lambda: cache_stage(work, m, settings),
        "student": lambda: student(work, m, settings),
    }
    # what a section reads, when the section that writes it is not chosen
    needs = {"cache_read": ("storage", steps["storage"]),
             "student": ("cache_stage", lambda: teacher_cache.run(m, progress=False))}
    for name in chosen:
        if name in needs and needs[name][0] not in chosen:
            needs[name][1]()
        start = time.perf_counter()
        results["sections"][name] = steps[name]()
        results["seconds"][name] = round(time.perf_counter() - start, 1)
    results["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = Path(markdown) if markdown is not None else (out / "BENCHMARKS.md" if quick else Path("BENCHMARKS.md"))
    markdown.write_text(report(results))
    return results


# --------------------------------------------------------------------------------------------- the report


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "**no**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(row) + " |" for row in rows]


def report(results: dict) -> str:
    """BENCHMARKS.md from the results: machine, versions, command, date, the goals table, then one table per
    measurement with a sentence of interpretation per row."""
    mach, sec = results["machine"], results["sections"]
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`distill bench`, `pipeline/bench.py`); do not edit by hand. Every "
             "comparison interleaves its alternatives (A B A B ...) and reports medians over the repetitions; "
             "the raw runs are in `bench/results.json`.", "",
             f"- Command: `{results['command']}`"
             + (" (quick smoke run: tiny settings, not for quoting)" if results["quick"] else ""),
             f"- Date: {results['date']}",
             f"- Machine: {mach['cpu']}, {mach['usable_cores']} usable cores of {mach['cores']}, "
             f"{mach['ram_gib']} GiB RAM, {mach['device']}{' (' + mach['gpu'] + ')' if mach['gpu'] else ''}; "
             f"torch threads {mach['torch_threads']}; load average {_load(mach.get('load_average'))} before, "
             f"{_load(mach.get('load_average_after'))} after",
             f"- Versions: Python {mach['python']}, " + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()),
             f"- Repetitions: {results['settings']['reps']}; seconds per section: "
             + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()), ""]
    lines += _goals(sec) + [""]
    for name, render in (("student", _student_md), ("cache_stage", _stage_md), ("cache_read", _read_md),
                         ("storage", _storage_md), ("view_replay", _replay_md)):
        if name in sec:
            lines += render(sec[name]) + [""]
    return "\n".join(lines)


def _load(values) -> str:
    return "n/a" if not values else "/".join(f"{v:.2f}" for v in values)


def _goals(sec: dict) -> list[str]:
    rows = []
    if "student" in sec:
        st = sec["student"]
        rows.append(["1a", "student loop from the cache / without distillation (images/s ratio)",
                     _num(st["cached_vs_floor"]), ">= 0.95", _met(st["cached_vs_floor"] >= 0.95)])
        rows.append(["1b", "online-teacher time / cached time, as a share of the ideal (t_s + t_t) / t_s",
                     f"{_num(st['online_speedup'])} of {_num(st['ideal_speedup'])} = {_num(st['share_of_ideal'])}",
                     ">= 0.9", _met(st["share_of_ideal"] >= 0.9)])
    if "cache_stage" in sec:
        cs = sec["cache_stage"]
        rows.append(["2", f"teacher-cache views/s / teacher forward alone ({cs['device']})", _num(cs["efficiency"]),
                     ">= 0.9 on a GPU with loader workers",
                     _met(None if cs["device"] == "cpu" else cs["efficiency"] >= 0.9)])
    if "cache_read" in sec:
        k, rd = _main_k(sec["cache_read"])
        value = rd["slab_reader"]["median"]
        rows.append(["3", f"cache.SlabReader (the student's reader) views/s per process (K={k})", _num(value),
                     ">= 1e6", _met(value >= 1e6)])
    if "storage" in sec:
        for k in ("10", "100"):
            entry = sec["storage"]["by_k"].get(k)
            if entry:
                rows.append(["4", f"bytes per view on disk, all fields, K={k} (TinyViT {entry['tinyvit']})",
                             _num(entry["total"]), f"<= {entry['tinyvit']}", _met(entry["total"] <= entry["tinyvit"])])
    if "view_replay" in sec:
        ph = sec["view_replay"]["photos"]
        rows.append(["5", f"decode + render per view, ImageNet-like photo to {ph['size']} px (ms, one core)",
                     _num(ph["decode_ms"]["median"] + ph["render_ms"]["median"]), "not data-bound", "see 5"])
    return ["## Goals", ""] + _table(["#", "measure", "result", "goal", "met"], rows)


def _main_k(by_k: dict) -> tuple[str, dict]:
    k = "10" if "10" in by_k else next(iter(by_k))
    return k, by_k[k]


def _student_md(st: dict) -> list[str]:
    floor, share = st["cached_vs_floor"], st["share_of_ideal"]
    rows = [
        ["no distillation (floor)", _num(st["no_distillation"]["median"]), "1",
         "Both heads learn the ground truth; the data path still reads the cache: the fastest the loop can go."],
        [f"from the cache ({st['distillation']})", _num(st["cached"]["median"]), _num(floor),
         f"Reading the teacher's top-K answers and the distillation loss cost {_num(max(0.0, 1 - floor) * 100, 2)}% "
         f"of the floor's rate" + (" (within noise)." if floor >= 0.98 else ".")],
        ["teacher online (same views)", _num(st["online"]["median"]),
         _num(st["online"]["median"] / st["no_distillation"]["median"]),
         f"The online teacher makes the loop {_num(st['online_speedup'])}x slower than the cached one; the teacher's "
         f"forward alone predicts {_num(st['ideal_speedup'])}x, so the cache delivers {_num(share * 100, 3)}% of the "
         f"ideal saving" + (" (the online loop loses more than the teacher's forward)." if share > 1.02 else ".")],
    ]
    return (["## 1. Student speedup", "",
             f"Student `{st['student']['model']}` {st['student']['model_args']} at {st['student']['img_size']} px, patch "
             f"{st['student']['patch_size']}; teacher `{st['teacher']['model']}` {st['teacher']['model_args']} at "
             f"{st['teacher']['img_size']} px, randomly initialised (timing only); batch {st['batch_size']}, loader "
             f"workers {st['workers']}, device {st['device']}. On pre-made batches, in the same interleaved "
             f"repetitions: student train step {_num(st['student_step_s']['median'] * 1e3)} ms/image, teacher forward "
             f"{_num(st['teacher_forward_s']['median'] * 1e3)} ms/image: a teacher forward costs "
             f"{_num(st['teacher_to_student'])} student steps (RegNetY-16GF vs DeiT-Ti: about 4). Loop rates are "
             f"the median per-step images/s of `pipeline.train.train` (warm-up step left out), then the median over "
             f"the repetitions; ratios are ratios of those medians.", ""]
            + _table(["loop", "images/s", "vs floor", "interpretation"], rows))


def _stage_md(cs: dict) -> list[str]:
    shares = cs["phase_shares"]
    explain = {
        "decode": "reading the tar and decoding the image (`read_shard`)",
        "view_params": "drawing the view parameters (`views.sample_params`)",
        "render": "rendering the views from them (`views.render_unmixed` and `views.mix`, `views.eval_view` for val)",
        "digest": "hashing each uint8 view (`views.view_digest`)",
        "teacher": "the teacher's forward (`teacher_cache.forward`)",
        "write": "writing and fsyncing the unit (`cache.write_unit`)",
        "other": "the rest: top-K, collation, buffers, loop",
    }
    rows = [[name, f"{shares[name] * 100:.1f}%", explain[name]] for name in explain]
    eff = cs["efficiency"]
    return (["## 2. Cache stage efficiency", "",
             f"`teacher_cache.run` ({cs['views_per_run']} views per run: one train epoch and the val split, batch "
             f"{cs['batch_size']}, loader workers {cs['workers']}, {cs['device']}) against `teacher_cache.forward` "
             f"alone on a pre-made uint8 batch of the same shape.", ""]
            + _table(["run", "views/s", "interpretation"], [
                ["teacher-cache", _num(cs["stage"]["median"]),
                 f"The whole stage runs at {_num(eff * 100, 3)}% of the teacher's own speed."],
                ["teacher forward alone", _num(cs["teacher_alone"]["median"]),
                 "The ceiling: what the stage would reach if decoding, rendering and writing cost nothing or "
                 "overlapped with it."]])
            + ["", "Where the stage's time goes (median shares of the loop's wall time; with loader workers 0 on the "
               "CPU every phase is serial, so everything that is not the teacher is what workers would hide):", ""]
            + _table(["phase", "share", "what"], rows))


def _read_md(rd: dict) -> list[str]:
    rows = []
    for k, entry in rd.items():
        reader, slab, opened, unit = (entry[n]["median"] for n in ("slab_reader", "read_slab", "opened_slab",
                                                                    "opened_unit"))
        rows.append([k, _num(reader), _num(slab), _num(opened), _num(unit),
                     f"The student's reader gives {_num(reader / unit, 2)}x the whole-chunk read (field after field) "
                     f"and {_num(reader / slab, 2)}x read_slab, which runs at {_num(slab / opened * 100, 2)}% of the "
                     f"same slab through open handles and decodes each {entry['views_per_unit']}-view chunk once per "
                     f"shard."])
    return ["## 3. Cache read", "",
            "views/s in one process over the storage caches of section 4 (a chunk holds shards_per_unit shards, as "
            "in the ImageNet manifest), reading the shards in order with `student_data.CACHED_FIELDS`: "
            "`SlabReader` is the student's reader (`cache.SlabReader(root, 'train').read(epoch, shard, fields)`, a "
            "new reader per repetition, opened before the clock starts as a worker opens it once per epoch: it "
            "checks each unit once and decodes each unit's chunks once, together, for a run of its shards); "
            "`read_slab` opens the arrays and checks the unit on every call; `open handles` reads the same slab "
            "through arrays opened once; `whole chunk` reads a whole unit through them, field after field (the "
            "floor for a reader that keeps its handles and decodes each chunk once, one field at a time).",
            ""] + _table(["K", "SlabReader", "read_slab", "open handles, one slab", "open handles, whole chunk",
                          "interpretation"], rows)


def _storage_md(sg: dict) -> list[str]:
    rows = []
    for k, e in sg["by_k"].items():
        b = e["bytes_per_view"]
        verdict = "within" if e["total"] <= e["tinyvit"] else "above"
        rows.append([k] + [_num(b[f]) for f in STORED_FIELDS] + [_num(e["total"]), str(e["tinyvit"]),
                     f"{verdict} TinyViT's record; top-K alone (logits + ids) {_num(e['topk_only'])} B vs its "
                     f"{4 * int(k)} B, plus {_num(b['view'] + b['digest'])} B of explicit view parameters and digest "
                     f"that TinyViT's seed replaces."])
    first = next(iter(sg["by_k"].values()))
    lines = ["## 4. Storage", "",
             f"Bytes per view on disk (chunk files, crc32c included; metadata excluded: {first['metadata_bytes']} B "
             f"per cache) of synthetic caches written by `cache.create`/`cache.write_unit`: {sg['views']} views in "
             f"chunks of {sg['chunk_views']}, {sg['classes']} classes. Logits: `synthetic_logits`, a Gaussian bulk "
             f"N(0, 1.5^2) with a heavy head (own class, mix partner, five neighbours; mean top-1 probability "
             f"{_num(sg['mean_top1_probability'], 2)}); view parameters: real `views.sample_params` under DeiT's "
             f"recipe for ImageNet-like source sizes; digests: uniform 64-bit. Labels (stored once per sample, "
             f"not per view) are left out. Codecs in use: "
             + ", ".join(f"{f} `{c}`" for f, c in first["in_use"].items()) + ".", ""]
    lines += _table(["K", *STORED_FIELDS, "total", "TinyViT 4K+4", "interpretation"], rows)
    lines += ["", "Lossless codec candidates: bytes per view, and encode / decode rates in thousands of views/s "
              "(whole-array write and read, median of 3). Every candidate reads back bit-identical.", ""]
    names = list(next(iter(first["candidates"].values())))
    cand_rows = []
    for field in STORED_FIELDS:
        for k, e in sg["by_k"].items():
            if field not in e["candidates"]:
                continue
            c = e["candidates"][field]
            cand_rows.append([field, k if field in ("topk_logprobs", "topk_ids") else "any"] + [
                f"{_num(c[n]['bytes_per_view'])} ({c[n]['encode_views_per_s'] / 1e3:.0f} / "
                f"{c[n]['decode_views_per_s'] / 1e3:.0f})" if n in c else "-" for n in names])
    lines += _table(["field", "K", *names], cand_rows)
    lines += ["", f"Choice per field: the fewest bytes (summed over the K measured) among the candidates that encode "
              f"and decode at least half as fast as `{REFERENCE_CODEC}` (which is kept unless the choice saves 1%), "
              f"against what `cache.py` writes now:", ""]
    lines += _table(["field", "chosen", "bytes (summed over K)", "cache.py now (summed over K)",
                     "smallest at any speed"],
                    [[f, f"`{b['codec']}`", _num(b["bytes_per_view_summed"]), _num(b["in_use_summed"]),
                      f"`{b['smallest_overall']}` {_num(b['smallest_overall_bytes'])}"]
                     for f, b in sg["best"].items()])
    return lines


def _replay_md(vr: dict) -> list[str]:
    rows = []
    for name, label in (("digits", "digits (PNG, 32 px source)"), ("photos", "ImageNet-like photos (JPEG)")):
        r = vr[name]
        dec, ren, un = r["decode_ms"]["median"], r["render_ms"]["median"], r["render_unmixed_ms"]["median"]
        each = r["render_each_ms"]["median"]
        floor = dec + ren
        rows.append([label, f"{r['size']}", _num(dec), _num(ren), _num(each), _num(un), _num(floor),
                     _num(1e3 / floor),
                     f"One core replays {_num(1e3 / floor)} views/s; rendering each unmixed view once per window "
                     f"takes {_num(max(0.0, 1 - ren / each) * 100, 2)}% off `views.render` per view, and the mix "
                     f"costs {_num(max(0.0, ren / un - 1) * 100, 2)}% on top of the unmixed render."])
    prof = vr["photos"]["profile_top_tottime"]
    return (["## 5. View replay", "",
             "Milliseconds per view on one core: decode (`read_shard`, tar + image decode), the student's render "
             "(`views.ShardViews`, as stage 1 and the student's reader use it: each unmixed view once per mix "
             "window, then the mix), `views.render` per view (which renders the mix partner's unmixed view again) "
             "and the unmixed render alone.", ""]
            + _table(["set", "size", "decode", "render", "views.render each", "unmixed", "decode + render",
                      "views/s/core", "interpretation"], rows)
            + ["", "Profile of the photo render (share of its time, own time per function):", ""]
            + _table(["function", "calls", "share"], [[p["function"], str(p["calls"]), f"{p['share'] * 100:.1f}%"]
                                                      for p in prof]))
