"""Stage 1: run the teacher over the shards under the fixed view recipe and fill the cache unit by unit.

Work is split into units (epoch, group of shards) - see `pipeline.cache`. Units are dealt to ranks by their
index alone (unit i goes to rank i mod world size), then to loader workers the same way, so a restarted or
re-scaled run redoes exactly the units that are not done and never shares a chunk between writers.
Teacher batches are runs of consecutive positions of one shard, so every view meets the teacher in the same
batch whatever the rank or worker count: the cache is bit-identical across topologies.

On a GPU the stage keeps the device busy: loader workers render the next batches while the teacher runs
(prefetch), batches come in pinned memory and are copied without blocking, the top-K, log-softmax, leftover
and tail draws are computed on the device so only K values per view cross back, unit writes (compression,
fsync, done flag) run on a background thread, and `cache.compile: true` compiles the teacher. On the CPU the
same code runs with the CUDA-only parts (pinning, autocast, channels-last) off.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from pipeline import cache, storage, views
from pipeline.cache import cache_attrs, layouts_for
from pipeline.lock import writer_lock
from pipeline.losses import sparse_teacher_answers
from pipeline.manifest import Manifest, ManifestError
from pipeline.reader import ShardList, read_shard, scan_shard
from pipeline.shards import data_shardlist, warn_if_class_ordered
from pipeline.teacher import Teacher, forward, load_teacher, pick_device


@dataclass(frozen=True, slots=True)
class Unit:
    split: str  # "train" or "val"
    epoch: int | None  # None for val
    group: int


def all_units(layouts: dict[str, cache.CacheLayout]) -> list[Unit]:
    """Every unit of the cache in a fixed order: val first (small, and what the statistics need), then train
    epoch by epoch."""
    units = [Unit("val", None, g) for g in range(layouts["val"].groups)]
    train = layouts["train"]
    units += [Unit("train", e, g) for e in range(train.epochs) for g in range(train.groups)]
    return units


class UnitViews(IterableDataset):
    """Yields teacher batches: consecutive views of one shard, rendered from their stored parameters.

    Each item: unit, shard, start position, views uint8 [b, H, W, 3], params float32 [b, N], digests
    int64 [b] (32-bit values), labels int32 [b], valid bool [b] (False where on_error=skip dropped a sample)."""

    def __init__(self, m: Manifest, lists: dict[str, ShardList], units: list[Unit], eval_crop_pct: float):
        self.m, self.lists, self.units, self.eval_crop_pct = m, lists, units, eval_crop_pct

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[worker::workers]:
            layout_spu = self.m.cache.shards_per_unit
            shardlist = self.lists[unit.split]
            first = unit.group * layout_spu
            for shard in range(first, min(first + layout_spu, len(shardlist.shards))):
                yield from self._shard_batches(unit, shardlist, shard)

    def _shard_batches(self, unit: Unit, shardlist: ShardList, shard: int):
        size, batch = self.m.teacher.img_size, self.m.cache.batch_size
        pending = []
        for record in self._shard_views(unit, shardlist, shard):
            pending.append(record)
            if len(pending) == batch:
                yield self._collate(unit, shard, pending, size)
                pending = []
        if pending:
            yield self._collate(unit, shard, pending, size)

    def _shard_views(self, unit: Unit, shardlist: ShardList, shard: int):
        """(pos, view, params, label) for every position, block by block so a mix partner is always at hand."""
        n = shardlist.shards[shard].samples
        window = self.m.views.mix.window
        samples = read_shard(shardlist, shard, on_error=self.m.data.on_error)
        pending = next(samples, None)
        blocks = ([(a, min(a + window, n)) for a in range(0, n, window)] if unit.split == "val"
                  else views.mix_windows(self.m.views, unit.epoch, shard, n))  # this epoch's mix windows
        for block_start, block_stop in blocks:
            block = {}
            while pending is not None and pending.pos < block_stop:
                block[pending.pos] = pending
                pending = next(samples, None)
            yield from self._render_block(unit, shard, n, block_start, block_stop, block)

    def _render_block(self, unit, shard, n, start, stop, block):
        size = self.m.teacher.img_size
        if unit.split == "val":
            for pos in range(start, stop):
                sample = block.get(pos)
                view = None if sample is None else views.eval_view(sample.image, size, self.eval_crop_pct)
                yield pos, view, None, -1 if sample is None else sample.label
            return
        params = {pos: views.sample_params(self.m.views, unit.epoch, shard, pos, n, views.image_size(s.image),
                                           size=size)
                  for pos, s in block.items()}
        # each unmixed view once, mixed into its own view and its partners' (a skipped partner: itself)
        rendered = views.ShardViews({pos: s.image for pos, s in block.items()}, params, size, self.m.views)
        for pos in range(start, stop):
            sample = block.get(pos)
            if sample is None:
                yield pos, None, None, -1
                continue
            yield pos, rendered.view(pos), params[pos], sample.label

    def _collate(self, unit, shard, records, size):
        b = len(records)
        views_u8 = np.zeros((b, size, size, 3), np.uint8)
        params = np.zeros((b, views.N_PARAMS), np.float32)
        digests = np.zeros(b, np.int64)
        labels = np.full(b, -1, np.int32)
        valid = np.zeros(b, bool)
        for i, (_, view, p, label) in enumerate(records):
            if view is None:
                continue
            views_u8[i] = view
            if p is not None:
                params[i] = p
            digests[i] = views.view_digest(view) or 1  # 0 is reserved for "no view here"
            labels[i] = label
            valid[i] = True
        item = {"unit": unit, "shard": shard, "start": records[0][0], "views": torch.from_numpy(views_u8),
                "params": torch.from_numpy(params), "digests": torch.from_numpy(digests),
                "labels": torch.from_numpy(labels), "valid": torch.from_numpy(valid)}
        if unit.split == "train" and self.m.cache.tail_samples:
            item["tail_uniforms"] = torch.from_numpy(np.stack([tail_uniforms(self.m, unit.epoch, shard, pos)
                                                               for pos, *_ in records]))
        return item


TAIL_STREAM = 1000  # the generator part of the tail draws (views.py numbers its parts from 0)


def tail_uniforms(m: Manifest, epoch: int, shard: int, pos: int) -> np.ndarray:
    """The view's `cache.tail_samples` uniforms in [0, 1) for its tail draws, from (seed, epoch, shard, pos)
    alone like its view parameters, so the draws do not depend on topology, batch or device."""
    rng = np.random.default_rng([m.views.seed, epoch, shard, pos, TAIL_STREAM])
    return rng.random(m.cache.tail_samples)


class UnitBuffers:
    """Collects teacher answers per unit and writes a unit the moment its last view arrives, on a background
    thread so the teacher keeps running while the unit's chunks are compressed, written and fsynced. One
    write is in flight at a time (the next completed unit waits for it, which bounds the memory held); each
    write keeps `cache.write_unit`'s order (data, fsync, then the done flag), and its error is raised in the
    caller at the next `add` or at `flush`."""

    def __init__(self, root, layouts, lists):
        self.root, self.layouts, self.lists = root, layouts, lists
        self.buffers: dict[Unit, dict[str, np.ndarray]] = {}
        self.remaining: dict[Unit, int] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unit-writer")
        self._in_flight: Future | None = None

    def _write(self, unit: Unit, data: dict[str, np.ndarray]) -> None:
        self.flush()
        self._in_flight = self._writer.submit(cache.write_unit, self.root, unit.split, unit.epoch, unit.group, data)

    def flush(self) -> None:
        """Wait for the write in flight; re-raise its error."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._writer.shutdown(wait=True)

    def _open(self, unit: Unit) -> dict[str, np.ndarray]:
        layout = self.layouts[unit.split]
        shards = layout.group_shards(unit.group)
        u, p, k = len(shards), layout.positions, layout.top_k
        buf = {"topk_logratios": np.zeros((u, p, k - 1), np.float16), "topk_ids": np.zeros((u, p, k), layout.id_dtype),
               "leftover_logit": np.zeros((u, p), np.uint16), "digest": np.zeros((u, p), np.uint32),
               "labels": np.full((u, p), -1, np.int32)}
        if unit.split == "train":
            buf["view"] = np.zeros((u, p, layout.n_params), np.float32)
        if layout.tail_samples:
            buf["tail_ids"] = np.zeros((u, p, layout.tail_samples), layout.id_dtype)
            buf["tail_logprobs"] = np.zeros((u, p, layout.tail_samples), np.float16)
        self.buffers[unit] = buf
        self.remaining[unit] = sum(self.lists[unit.split].shards[s].samples for s in shards)
        return buf

    def add(self, item: dict, answers: dict[str, torch.Tensor]) -> Unit | None:
        """Store one teacher batch's answers (`losses.sparse_teacher_answers`, on the CPU); returns the unit if
        this batch completed (and wrote) it."""
        unit = item["unit"]
        buf = self.buffers.get(unit) or self._open(unit)
        layout = self.layouts[unit.split]
        row = item["shard"] - unit.group * layout.shards_per_unit
        n = len(item["valid"])
        cols = slice(item["start"], item["start"] + n)
        valid = item["valid"].numpy()
        keep = valid[:, None]
        buf["topk_logratios"][row, cols] = np.where(keep, answers["topk_logratios"].numpy(), 0)  # the stored form
        buf["topk_ids"][row, cols] = np.where(keep, answers["topk_ids"].numpy(), 0)
        buf["leftover_logit"][row, cols] = np.where(valid, answers["leftover_logit"].numpy(), 0)
        buf["digest"][row, cols] = item["digests"].numpy()
        buf["labels"][row, cols] = item["labels"].numpy()
        if "view" in buf:
            buf["view"][row, cols] = item["params"].numpy()
        for name in ("tail_ids", "tail_logprobs"):
            if name in buf:
                buf[name][row, cols] = np.where(keep, answers[name].numpy(), 0)
        self.remaining[unit] -= n
        if self.remaining[unit]:
            return None
        self._write(unit, self.buffers.pop(unit))
        del self.remaining[unit]
        return unit


def run(m: Manifest, rank: int = 0, world_size: int = 1, barrier=None, progress: bool = True) -> dict:
    """Fill the cache for this rank's units, holding the writer lock of (cache, rank, world size) so a second
    writer started by mistake stops before touching it (`pipeline.lock`). `barrier` (a callable) syncs ranks
    after creation under torchrun; independent jobs pass None and rely on creation being idempotent."""
    storage.configure_manifest(m)  # the cache's store options, before its lock is taken
    with writer_lock(m.cache.path, rank, world_size, m.cache.allow_no_lock):
        return _fill(m, rank, world_size, barrier, progress)


def _fill(m: Manifest, rank: int, world_size: int, barrier, progress: bool) -> dict:
    lists = {"train": data_shardlist(m, "train"), "val": data_shardlist(m, "val")}
    if lists["val"].classes != lists["train"].classes:
        raise ManifestError(f"the class maps of {m.data.train} and {m.data.val} differ: rebuild the shards")
    layouts = layouts_for(m, lists["train"], lists["val"])
    if rank == 0:  # a sorted dump is sorted throughout: its first shard tells (read without decoding)
        first = lists["train"].shards[0].url
        warn_if_class_ordered([first], [[label for _, label in scan_shard(first)]], len(lists["train"].classes),
                              m.views.mix.window)
    device = pick_device(m.cache.device)
    teacher = load_teacher(m.teacher, len(lists["train"].classes), device, data=f"data.train={m.data.train}")
    if rank == 0 and (noise := views.erasing_noise_warning(m.views, teacher.mean, teacher.std, f"teacher {m.teacher.model}")):
        warnings.warn(noise, stacklevel=2)
    if m.cache.compile:  # the identity (and so the fingerprint) is the weights', not the compiled module's
        teacher = dataclasses.replace(teacher, model=torch.compile(teacher.model))
    attrs = cache_attrs(m, lists["train"], lists["val"], teacher.identity)
    if rank == 0 or barrier is None:
        root = cache.create(m.cache.path, layouts, attrs)
    if barrier is not None:
        barrier()
        root = cache.open_cache(m.cache.path, mode="r+") if rank else root
    done = {"train": cache.done_units(root, "train"), "val": cache.done_units(root, "val")}
    mine = [u for i, u in enumerate(all_units(layouts)) if i % world_size == rank]
    todo = [u for u in mine if not done[u.split][(u.group,) if u.epoch is None else (u.epoch, u.group)]]
    total = sum(lists[u.split].shards[s].samples for u in todo for s in layouts[u.split].group_shards(u.group))
    # with workers, the next batches render while the teacher runs; pinned host memory lets the copy overlap
    loader = DataLoader(UnitViews(m, lists, todo, teacher.crop_pct), batch_size=None, num_workers=m.cache.workers,
                        persistent_workers=False, prefetch_factor=4 if m.cache.workers else None,
                        pin_memory=device.type == "cuda")
    buffers = UnitBuffers(root, layouts, lists)
    started, written = time.time(), 0
    bar = tqdm(total=total, unit="view", desc=f"teacher-cache rank {rank}", disable=not progress or (barrier is not None and rank != 0), smoothing=0.1)
    try:
        for item in loader:
            answers = teacher_answers(teacher, item, device, m.cache.top_k)
            written += buffers.add(item, answers) is not None
            bar.update(len(item["valid"]))
    finally:
        buffers.close()  # the last unit's write completes (or raises) before the run returns
    bar.close()
    if buffers.remaining:
        raise RuntimeError(f"units left incomplete: {sorted(buffers.remaining, key=str)[:3]}")
    seconds = time.time() - started
    return {"path": m.cache.path, "units_written": written, "units_skipped": len(mine) - len(todo),
            "views": total, "seconds": seconds, "views_per_s": total / seconds if seconds else 0.0}


@torch.inference_mode()
def teacher_answers(teacher: Teacher, item: dict, device: torch.device, top_k: int) -> dict[str, torch.Tensor]:
    """One batch's answers as the cache stores them, reduced to top-K on the device (only K values and ids and
    one leftover per view cross to the host), after checking the valid views' logits are finite."""
    logits = forward(teacher, item["views"], device)
    uniforms = item.get("tail_uniforms")
    answers = sparse_teacher_answers(logits, top_k, None if uniforms is None else uniforms.to(device), stored=True)
    finite = torch.isfinite(logits).all(dim=1).cpu()
    if not finite[item["valid"]].all():
        stop = item["start"] + len(finite)
        raise FloatingPointError(f"the teacher returned non-finite logits for shard {item['shard']}, positions "
                                 f"{item['start']}..{stop - 1}: check the teacher weights")
    return {name: value.cpu() for name, value in answers.items()}
