"""`distill plan`: what a manifest will cost before anything is computed.

Views to cache (train: epochs x samples, val: samples), bytes on disk at the v3 layout per array and in all,
the teacher's forwards and teacher-hours, and the student's epochs per cached epoch.

Bytes come from measured per-field costs: one unit of the manifest's layout (its K, classes, tail draws,
shards per unit and shard sizes, capped at 1,000 positions) is written through `cache.write_unit` with
ImageNet-like teacher outputs and real view parameters, and each array's compressed bytes per view are
read off it. Every chunk of the real cache is then charged its compressed size rounded up to the
filesystem's block (`du` counts blocks), so small caches, whose chunks are smaller than a block, are not
underestimated. The teacher's cost per view is a short timed forward on the manifest's device with the
teacher's architecture (random weights: the weights do not change the cost).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pipeline import cache, views
from pipeline.cache import layouts_for
from pipeline.losses import sparse_teacher_answers
from pipeline.manifest import Manifest, TeacherCfg
from pipeline.reader import ShardList
from pipeline.shards import load_shardlist
from pipeline.teacher import Teacher, create_model, forward, pick_device

MEASURED_POSITIONS = 1000  # positions per shard of the measured unit, at most
TIMED_BATCH = 8  # views per timed teacher forward (the device's batch cost is extrapolated per view)
MAX_BLOCK_WASTE = 0.2  # share of the disk lost to chunks smaller than a filesystem block before plan says so


@dataclass(slots=True)
class Plan:
    train_views: int
    val_views: int
    cache_epochs: int
    student_epochs: int
    bytes_by_array: dict[str, int] = field(default_factory=dict)  # "train/view" -> bytes on disk
    teacher_forwards: int = 0
    seconds_per_view: float | None = None
    device: str = "cpu"
    compressed_bytes: int = 0  # the same chunks without block rounding
    better_shards_per_unit: int | None = None  # the fewest shards per unit that waste under MAX_BLOCK_WASTE

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_array.values())

    @property
    def teacher_hours(self) -> float | None:
        return None if self.seconds_per_view is None else self.teacher_forwards * self.seconds_per_view / 3600


def make_plan(m: Manifest, time_teacher: bool = True) -> Plan:
    lists = {"train": load_shardlist(m.data.train), "val": load_shardlist(m.data.val)}
    layouts = layouts_for(m, lists["train"], lists["val"])
    train_views = m.cache.epochs * sum(s.samples for s in lists["train"].shards)
    val_views = sum(s.samples for s in lists["val"].shards)
    plan = Plan(train_views, val_views, m.cache.epochs, m.student.epochs, teacher_forwards=train_views + val_views)
    block = _block_size(m.cache.path)
    costs = {split: measured_bytes_per_view(layout, m.views, m.teacher.img_size) for split, layout in layouts.items()}
    for split, layout in layouts.items():
        for name, nbytes in _split_bytes(layout, lists[split], costs[split], block).items():
            plan.bytes_by_array[f"{split}/{name}"] = nbytes
        plan.compressed_bytes += sum(_split_bytes(layout, lists[split], costs[split], 1).values())
    if 1 - plan.compressed_bytes / plan.total_bytes > MAX_BLOCK_WASTE:
        plan.better_shards_per_unit = _fewest_shards_per_unit(layouts, lists, costs, block)
    if time_teacher:
        device = pick_device(m.cache.device)
        plan.device = str(device)
        plan.seconds_per_view = time_teacher_forward(m.teacher, len(lists["train"].classes), device)
    return plan


def _fewest_shards_per_unit(layouts, lists, costs, block: int) -> int | None:
    """The smallest cache.shards_per_unit whose chunks waste under MAX_BLOCK_WASTE of the disk to block rounding."""
    most = max(layout.shards for layout in layouts.values())
    for spu in range(1, most + 1):
        grouped = {split: replace(layout, shards_per_unit=min(spu, layout.shards)) for split, layout in layouts.items()}
        disk = sum(sum(_split_bytes(grouped[s], lists[s], costs[s], block).values()) for s in grouped)
        packed = sum(sum(_split_bytes(grouped[s], lists[s], costs[s], 1).values()) for s in grouped)
        if 1 - packed / disk <= MAX_BLOCK_WASTE:
            return spu
    return None


def measured_bytes_per_view(layout: cache.CacheLayout, recipe, size: int) -> dict[str, float]:
    """Compressed bytes per view of each per-view array, from one unit written with the split's layout."""
    positions = min(layout.positions, MEASURED_POSITIONS)
    shards = min(layout.shards_per_unit, layout.shards)
    unit = replace(layout, shards=shards, positions=positions, epochs=None if layout.epochs is None else 1)
    rng = np.random.default_rng(0)
    n = shards * positions
    z = rng.normal(0.0, 1.5, (n, layout.num_classes))
    z[np.arange(n), rng.integers(layout.num_classes, size=n)] += 4 + rng.gamma(2.0, 2.5, n)
    tail = torch.from_numpy(rng.random((n, layout.tail_samples))) if layout.tail_samples else None
    answers = sparse_teacher_answers(torch.from_numpy(z).float(), layout.top_k, tail, stored=True)
    data = {name: value.numpy().reshape((shards, positions) + value.shape[1:]) for name, value in answers.items()
            if name not in cache.STORED_AS}  # the answers in their stored form, as stage 1 writes them
    for name in ("topk_ids", "tail_ids"):
        if name in data:
            data[name] = data[name].astype(layout.id_dtype)
    data["digest"] = rng.integers(1, 2**24, size=(shards, positions)).astype(np.uint32)
    data["labels"] = rng.integers(layout.num_classes, size=(shards, positions)).astype(np.int32)
    if layout.epochs is not None:
        data["view"] = np.stack([[views.sample_params(recipe, 0, s, p, positions, (500, 375), size=size) for p in range(positions)]
                                 for s in range(shards)])
    work = Path(tempfile.mkdtemp(prefix="distill-plan-"))
    try:
        split = "val" if layout.epochs is None else "train"
        layouts = {split: unit}
        if split == "val":  # a cache always has a train split; a minimal one here
            layouts["train"] = replace(unit, shards=1, positions=1, epochs=1, n_params=views.N_PARAMS)
        root = cache.create(str(work), layouts, {"classes": [str(c) for c in range(layout.num_classes)]})
        cache.write_unit(root, split, None if layout.epochs is None else 0, 0, data)
        return {name: _chunk_bytes(work / split / name) / n for name in data if name in root[split]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _split_bytes(layout: cache.CacheLayout, shardlist: ShardList, per_view: dict[str, float],
                 block: int) -> dict[str, int]:
    """Bytes on disk per array of one split: each unit's chunk charged its compressed size in whole blocks."""
    epochs = layout.epochs or 1
    out = {}
    for name, cost in per_view.items():
        total = 0
        for group in range(layout.groups):
            views_in_unit = sum(shardlist.shards[s].samples for s in layout.group_shards(group))
            chunk = _blocks(cost * views_in_unit, block)
            total += chunk * (1 if name == "labels" else epochs)
        out[name] = total
    out["done"] = layout.groups * epochs * block  # one tiny chunk per unit
    return out


def _blocks(nbytes: float, block: int) -> int:
    return max(1, math.ceil(nbytes / block)) * block


def _chunk_bytes(array_dir: Path) -> int:
    return sum(f.stat().st_size for f in (array_dir / "c").rglob("*") if f.is_file())


def _block_size(path: str) -> int:
    """The allocation unit of the filesystem the cache will live on (4096 where it cannot be asked)."""
    where = cache.local_dir(path)
    while where is not None and not where.exists() and where != where.parent:
        where = where.parent
    try:
        return os.statvfs(where).f_frsize if where is not None else 4096
    except OSError:
        return 4096


def time_teacher_forward(cfg: TeacherCfg, num_classes: int, device: torch.device, batches: int = 2) -> float:
    """Seconds per view of the teacher's forward: the architecture with random weights, TIMED_BATCH views at
    the teacher's size, one warm-up batch, the median of `batches`."""
    model = create_model(cfg, num_classes).to(device).eval()
    teacher = Teacher(model=model, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.875, identity={})
    x = torch.randint(0, 256, (TIMED_BATCH, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8)
    forward(teacher, x, device)
    times = []
    for _ in range(batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        forward(teacher, x, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / TIMED_BATCH


def format_plan(m: Manifest, plan: Plan) -> str:
    lines = [f"plan for {m.cache.path} (schema {cache.SCHEMA}, K={m.cache.top_k}, "
             f"tail samples {m.cache.tail_samples}, {m.cache.shards_per_unit} shard(s) per unit)",
             f"  views to cache: {plan.train_views:,} train ({plan.cache_epochs} epoch(s)), {plan.val_views:,} val",
             "  bytes on disk at the v3 layout:"]
    width = max(len(name) for name in plan.bytes_by_array)
    for name, nbytes in plan.bytes_by_array.items():
        lines.append(f"    {name.ljust(width)}  {_human(nbytes):>10}")
    per_view = plan.total_bytes / max(plan.train_views + plan.val_views, 1)
    lines.append(f"    {'total'.ljust(width)}  {_human(plan.total_bytes):>10}  ({per_view:.1f} B per cached view)")
    waste = 1 - plan.compressed_bytes / plan.total_bytes
    if waste > MAX_BLOCK_WASTE:
        fix = (f"set cache.shards_per_unit={plan.better_shards_per_unit} (bigger units, fewer and fuller chunks)"
               if plan.better_shards_per_unit else "use bigger shards: even one unit per epoch leaves chunks small")
        lines.append(f"    {waste:.0%} of that is filesystem blocks left empty by chunks smaller than a block "
                     f"({_human(plan.compressed_bytes)} compressed): {fix}")
    lines.append(f"  teacher forwards: {plan.teacher_forwards:,}")
    if plan.seconds_per_view is not None:
        lines.append(f"  teacher time: {plan.seconds_per_view * 1e3:.2f} ms per view on {plan.device} (measured, "
                     f"batch of {TIMED_BATCH}): {plan.teacher_hours:.2f} teacher-hours")
    ratio = plan.student_epochs / plan.cache_epochs
    lines.append(f"  student: {plan.student_epochs} epoch(s) over {plan.cache_epochs} cached: {ratio:.2f} student "
                 f"epochs per cached epoch" + (" (the cached epochs cycle)" if ratio > 1 else ""))
    return "\n".join(lines)


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"
