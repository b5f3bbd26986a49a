"""Stage 2's data path: the views the teacher saw, replayed from the cache, with the teacher's answers.

Per student epoch `e` (cache epoch `e % E`; with `views.repeats` r, 1/r of the images, each in its views from
the r cache epochs of the group `e // r`, as DeiT's RASampler: `TrainSet.selected`), `reader.plan_epoch` lays
the train shards out in a seeded order and cuts them, at blocks of `views.mix.window` positions, into equal
runs per rank and contiguous runs per loader worker. A worker reads each shard's cached slab once
(`cache.SlabReader`), decodes its runs widened to the cache epoch's whole mix windows (so a view's mix partner
is always decoded: `views.windows_covering`), re-renders every view from its stored parameters at the
student's resolution (`views.ShardViews`: each unmixed view once, then the mix), and attaches the teacher's
top-K logits, ids and logsumexp, the label, the partner's label and lambda. No random number is drawn on that
path.

The shuffle buffer after it is decided on item indices before anything is rendered
(`shuffle_buffer_order`), so a worker knows which batch each view lands in. That makes the data position
resumable at any batch: a worker told to skip its first `s` batches renders only the views still to come.
The buffer holds what it takes to render a view (the encoded image bytes of its mix window, its slab row), not
the rendered view: a view is decoded and rendered when its batch is emitted, its window's unmixed views
rendered once and kept only while views of that window are still waiting. So the first batch of an epoch
costs about two batches' renders (each view and its mix partner), not a buffer's worth, and a worker holds
JPEG bytes rather than rendered views.
Each worker batches its own views (dropping its last partial batch); the loader interleaves workers
round-robin, a finished worker dropping out, and every rank stops after `TrainSet.steps_per_epoch`
batches: the smallest count any rank reaches in any epoch, so DDP never waits on a short rank (each worker
stops at its part of them, `TrainSet.share`).

A run keeps its loader workers for all its epochs (`RankLoader`, torch's persistent workers): each epoch and
the batches to skip are handed to them in shared memory, each worker derives its part from (epoch, rank,
skip) alone, and it begins its part of the next epoch (reading up to its first batch and rendering it) in a
thread while it finishes the current one (`StudentViews`). The batches are the same as from workers started
anew each epoch (`TrainSet.loader`), bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline import cache, views
from pipeline.cache import library_versions
from pipeline.manifest import Manifest, ManifestError
from pipeline.reader import ShardList, Span, dataloader_worker, decode_image, plan_epoch, read_shard
from pipeline.shards import data_shardlist

log = logging.getLogger(__name__)

CACHED_FIELDS = ("topk_logprobs", "topk_ids", "log_leftover", "digest", "view") + cache.TAIL_FIELDS

# fingerprint field -> the manifest keys that produce it (for the fix in a mismatch message)
REPEAT_PARTITION = 7  # tags the seed of the repeated-augmentation partition (TrainSet.selected)


class ViewDriftError(cache.CacheError):
    """A view re-rendered now differs from the one the teacher saw when it filled the cache."""


# --------------------------------------------------------------------------------------------- checks


def check_fingerprint(root, expected: dict, cache_path: str) -> None:
    """Stop before training when the cache was not built from this run spec: name the field (and the
    place inside it), both values, and the manifest key to change."""
    cache.check_fingerprint(root, expected, cache_path, fix=(
        "The cached answers hold only for the cache's own {field}: point cache.path at a cache built from this "
        "manifest (`make teacher-cache`), or set {key} back to what the cache was built with."))


def cache_epochs_used(student_epochs: int, repeats: int = 1) -> int:
    """How many cache epochs `student_epochs` epochs replay before cycling (whole groups of `repeats`)."""
    return -(-student_epochs // repeats) * repeats


def check_complete(root, cache_path: str, epochs: int, repeats: int = 1) -> None:
    """Every unit the run will read must be done: train units of the cache epochs it uses, all val units."""
    train_done = cache.done_units(root, "train")
    used = min(cache_epochs_used(epochs, repeats), train_done.shape[0])
    for epoch in range(used):
        if not train_done[epoch].all():
            group = int(np.flatnonzero(~train_done[epoch])[0])
            raise cache.CacheError(f"cache {cache_path}: train unit (epoch {epoch}, shard group {group}) is not "
                                   f"complete: resume `make teacher-cache` to finish it before training")
    val_done = cache.done_units(root, "val")
    if not val_done.all():
        group = int(np.flatnonzero(~val_done)[0])
        raise cache.CacheError(f"cache {cache_path}: val unit (shard group {group}) is not complete: resume "
                               f"`make teacher-cache` to finish it before training")


def warn_if_cycling(student_epochs: int, cache_epochs: int, repeats: int = 1) -> None:
    if cache_epochs_used(student_epochs, repeats) > cache_epochs:
        warnings.warn(f"student.epochs={student_epochs} exceeds the {cache_epochs} cached epochs: student epoch e "
                      f"replays cache epoch e % {cache_epochs}, so the epochs cycle through the same views "
                      f"(fill more with `make teacher-cache` and a larger cache.epochs)", stacklevel=2)


# --------------------------------------------------------------------------------------------- shuffling


def shuffle_buffer_order(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A shuffle buffer of `size` over items 0..n-1 arriving in order, decided on indices alone.

    Returns (order, ready): output k is item order[k], and it can leave the buffer once ready[k] items
    have arrived (a full buffer swaps out a random slot for each new item; the rest drains shuffled)."""
    size = max(1, size)
    order = np.empty(n, np.int64)
    ready = np.empty(n, np.int64)
    slots = np.arange(min(size, n))
    k = 0
    for i, j in zip(range(len(slots), n), rng.integers(size, size=max(0, n - len(slots)))):
        order[k], ready[k] = slots[j], i + 1
        slots[j] = i
        k += 1
    order[k:] = rng.permutation(slots)
    ready[k:] = n
    return order, ready


def round_robin_resume(counts: list[int], skip: int) -> tuple[list[int], int]:
    """Where each worker stands after the first `skip` batches of an epoch, when a DataLoader takes one batch
    per worker in turn and a finished worker drops out: (batches taken from each worker, the worker whose
    turn is next). A loader whose workers run the plans rotated to start at that worker, each skipping its
    taken batches, continues the sequence exactly."""
    if skip > sum(counts):
        raise ValueError(f"cannot skip {skip} batches of an epoch that has {sum(counts)}")
    taken, worker = [0] * len(counts), 0
    while skip:
        if taken[worker] < counts[worker]:
            taken[worker] += 1
            skip -= 1
        worker = (worker + 1) % len(counts)
    for _ in counts:
        if taken[worker] < counts[worker]:
            break
        worker = (worker + 1) % len(counts)
    return taken, worker


# --------------------------------------------------------------------------------------------- the train set


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What one loader worker of one rank does in one epoch."""

    spans: list[Span]
    items: np.ndarray  # [n, 3] (shard, position, copy) of every view it yields, in reading order; copy i of a
    # position is its view from the i-th cache epoch of `TrainSet.cache_epochs_of` (always 0 without repeats)
    order: np.ndarray  # shuffle buffer output order (indices into items)
    ready: np.ndarray  # items read before each output can leave the buffer
    batch_size: int

    @property
    def batches(self) -> int:
        return len(self.items) // self.batch_size


@dataclass(frozen=True)
class TrainSet:
    """The train shards with their cache, and the rules every rank and worker derives its share from."""

    m: Manifest
    shardlist: ShardList
    cache_path: str
    cache_epochs: int
    valid: np.ndarray  # [S, P] bool: positions holding a view (the cache has a label there)
    num_classes: int
    world_size: int
    teacher_size: int | None = None  # also render views at this size (an online teacher), None = no

    @property
    def workers(self) -> int:
        return max(1, self.m.student.workers)

    @property
    def repeats(self) -> int:
        return self.m.views.repeats

    def cache_epochs_of(self, epoch: int) -> list[int]:
        """The cache epochs student epoch `epoch` replays: `epoch % E` alone; with repeats r, the r cache epochs
        of its group g = epoch // r (g * r .. g * r + r - 1, cycling), one view of each selected image from each."""
        r = self.repeats
        first = epoch // r * r
        return [(first + i) % self.cache_epochs for i in range(r)]

    def cache_epoch(self, epoch: int) -> int:
        return self.cache_epochs_of(epoch)[0]

    def selected(self, epoch: int, shard: int) -> np.ndarray:
        """[P] bool: the positions of `shard` student epoch `epoch` trains on. Without repeats, every position
        holding a view. With repeats r (DeiT's RASampler): the (epoch % r)-th of r equal parts of a permutation
        of the shard's positions drawn from (student seed, epoch // r, shard), so the r epochs of a group train
        on every image once, each time in its r views of the group's r cache epochs: r times fewer distinct
        images per epoch, each in r distinct views, as RASampler gives, and every cached view used once."""
        if self.repeats == 1:
            return self.valid[shard]
        r, n = self.repeats, self.shardlist.shards[shard].samples
        rank = np.random.default_rng([self.m.student.shuffle_seed(), epoch // r, shard, REPEAT_PARTITION]).permutation(n)
        part = np.zeros(self.valid.shape[1], bool)
        part[:n] = rank % r == epoch % r
        return self.valid[shard] & part

    def plan(self, epoch: int, rank: int, only: int | None = None) -> list[WorkerPlan]:
        """The plans of the loader workers of `rank` in `epoch` (of worker `only` alone, when given)."""
        s, r = self.m.student, self.repeats
        spans_per_worker = plan_epoch(self.shardlist, epoch, s.shuffle_seed(), self.world_size, self.workers,
                                      block=self.m.views.mix.window)[rank]
        plans = []
        for worker, spans in enumerate(spans_per_worker):
            if only is not None and worker != only:
                continue
            chosen = {shard: self.selected(epoch, shard) for shard in {sp.shard for sp in spans}}
            items = [(sp.shard, p, copy) for sp in spans for p in range(sp.start, sp.stop) if chosen[sp.shard][p]
                     for copy in range(r)]
            items = np.array(items, np.int64).reshape(-1, 3)
            rng = np.random.default_rng([s.shuffle_seed(), epoch, rank, worker])
            # the buffer shuffles images; an image's r copies stay side by side, as RASampler keeps them in one step
            order, ready = shuffle_buffer_order(len(items) // r, s.shuffle_buffer, rng)
            order = (order[:, None] * r + np.arange(r)).ravel()
            ready = np.repeat(ready * r, r)
            plans.append(WorkerPlan(spans, items, order, ready, s.batch_size))
        return plans

    def share(self, epoch: int, rank: int, skip: int, worker: int) -> tuple[WorkerPlan, int, int]:
        """What loader worker `worker` of `rank` yields of `epoch` resumed after batch `skip`: (a plan, its first
        batch, its end batch). The loader takes one batch per worker in turn from its worker 0, a finished worker
        dropping out, so worker j runs the plan whose turn is next after `skip` batches, plus j
        (`round_robin_resume`), from its batches taken by then to those the epoch's first `steps_per_epoch` take:
        the same batches in the same order as every plan run whole and cut at `steps_per_epoch`, and no batch
        made that the epoch does not use. Computed from (epoch, rank, skip) alone, so a persistent worker
        derives its part of each epoch itself."""
        counts = self._worker_batches(epoch)[rank]
        taken, first = round_robin_resume(counts, skip)
        ends, _ = round_robin_resume(counts, self.steps_per_epoch)
        index = (first + worker) % len(counts)
        return self.plan(epoch, rank, index)[0], taken[index], ends[index]

    @functools.cached_property
    def _valid_before(self) -> np.ndarray:
        """[S, P + 1]: views at positions below p of each shard."""
        return np.concatenate([np.zeros((len(self.valid), 1), np.int64), self.valid.cumsum(1)], axis=1)

    def _batches_per_rank(self, epoch: int) -> list[int]:
        """Batches each rank can make in `epoch`, from counts alone (no shuffle, no rendering)."""
        return [sum(rank) for rank in self._worker_batches(epoch)]

    def _worker_batches(self, epoch: int) -> list[list[int]]:
        """[rank][worker]: the batches of each loader worker's plan in `epoch` (`WorkerPlan.batches`), from
        counts alone."""
        spans = plan_epoch(self.shardlist, epoch, self.m.student.shuffle_seed(), self.world_size, self.workers,
                           block=self.m.views.mix.window)
        if self.repeats == 1:
            prefix = self._valid_before
        else:
            chosen = np.array([self.selected(epoch, shard) for shard in range(len(self.valid))])
            prefix = np.concatenate([np.zeros((len(chosen), 1), np.int64), chosen.cumsum(1)], axis=1) * self.repeats
        b = self.m.student.batch_size
        return [[sum(int(prefix[sp.shard, sp.stop] - prefix[sp.shard, sp.start]) for sp in w) // b for w in rank]
                for rank in spans]

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        """The same for every rank and every epoch: the fewest batches any rank can make in any epoch."""
        steps = min(min(self._batches_per_rank(e)) for e in range(self.m.student.epochs))
        if steps < 1:
            b, w = self.m.student.batch_size, self.world_size
            raise ManifestError(f"student.batch_size={b} leaves some rank without a full batch in an epoch "
                                f"({self.shardlist.num_samples} train samples over {w} ranks x {self.workers} loader "
                                f"workers, each batching its own share): lower student.batch_size or student.workers")
        return steps

    def loader(self, epoch: int, rank: int, skip: int = 0) -> Iterator[dict]:
        """Exactly `steps_per_epoch - skip` batches of this rank's share of `epoch`, resuming after batch `skip`,
        from loader workers started for this epoch alone (`open_loader` keeps them for a run)."""
        yield from RankLoader(self, rank, persistent=False).epoch(epoch, skip)

    def open_loader(self, rank: int, persistent: bool = True) -> RankLoader:
        """This rank's loader for a whole run: `.epoch(e, skip)` per epoch, `.close()` (or `with`) at the end."""
        return RankLoader(self, rank, persistent)


def open_train_set(m: Manifest, root, world_size: int = 1, teacher_size: int | None = None) -> TrainSet:
    """The train set of an opened cache; `teacher_size`: also render every view at that size when it differs
    from the student's (for a teacher run online)."""
    shardlist = data_shardlist(m, "train")
    layout = cache.layout_of(root, "train")
    counts = [n for _, n, _ in root.attrs["shards"]["train"]]
    in_shard = np.arange(layout.positions)[None, :] < np.array(counts)[:, None]
    valid = (cache.read_labels(root, "train") >= 0) & in_shard
    labelled = m.student.labelled_shards
    if labelled is not None and not 1 <= labelled <= len(shardlist.shards):
        raise ManifestError(f"student.labelled_shards={labelled}: {m.data.train} has {len(shardlist.shards)} shards; "
                            f"choose 1..{len(shardlist.shards)}, or null for all")
    size = None if teacher_size in (None, m.student.img_size) else teacher_size
    return TrainSet(m, shardlist, m.cache.path, layout.epochs, valid, layout.num_classes, world_size, size)


class StudentViews(IterableDataset):
    """One rank's epoch as batches: uint8 views [B, H, W, 3] (and `teacher_views` at the teacher's size
    when asked), labels, partner_labels, lam [B], topk_logprobs float16 [B, K], topk_ids int64 [B, K],
    log_leftover [B], shard, pos, cache_epoch [B] (and tail_ids, tail_logprobs where the cache has tail samples).

    The epoch and the batches to skip are read from `where` (shared memory, written by `RankLoader.epoch`)
    each time the dataset is iterated, so one set of persistent loader workers serves every epoch of a run;
    each worker derives its part from (epoch, rank, skip) alone (`TrainSet.share`). With `ahead` (persistent
    workers), a worker begins its part of the next epoch (as asked for without a skip) in a thread once it has
    read all it reads of the current one (its batches left are the shuffle buffer's drain; not before its first
    batch is out) or starts its last `AHEAD` batches, whichever comes first: the thread reads the next epoch's
    shards up to its first batch and renders it, and the worker hands that batch over when the epoch is asked
    for. The batches are the same either way, only made earlier: reading does not stop at an epoch's end, and
    the next epoch's first batch is made while the trainer takes its last steps and evaluates. A worker then
    holds up to two buffers of encoded samples (the drain of one epoch, the start of the next)."""

    def __init__(self, data: TrainSet, rank: int, where: torch.Tensor, ahead: bool = False):
        self.data, self.rank, self.where, self.ahead = data, rank, where, ahead
        self._next: _Ahead | None = None  # in a worker: its part of the next epoch, begun

    def __iter__(self) -> Iterator[dict]:
        epoch, skip = (int(v) for v in self.where)
        worker, workers = dataloader_worker()
        if workers != self.data.workers:
            raise RuntimeError(f"the epoch was planned for {self.data.workers} loader workers, not {workers}")
        begun = self._next
        if begun is not None:
            begun.thread.join()  # its first batch made: from here on only this thread touches `_next`
            self._next = None
            if begun.key == (epoch, skip, worker):
                return begun.take()
            begun.drop()  # another epoch was asked for (never in a run's sequence of epochs)
        return self._batches(epoch, skip, worker)

    def _batches(self, epoch: int, skip: int, worker: int) -> Iterator[dict]:
        plan, start, stop = self.data.share(epoch, self.rank, skip, worker)
        b = plan.batch_size
        position = np.empty(len(plan.items), np.int64)  # item -> its output index
        position[plan.order] = np.arange(len(plan.items))
        wanted = (position >= start * b) & (position < stop * b)
        done_by = plan.ready[np.arange(start, stop) * b + b - 1] if stop > start else []
        pending: dict[int, Callable[[], dict]] = {}  # item -> renders its record when its batch is emitted
        next_batch = start
        last_read = int(np.flatnonzero(wanted)[-1]) if wanted.any() else -1
        read_all = False  # every wanted item read: the batches left are the shuffle buffer's drain

        def emit(batch: int) -> dict:
            if batch >= stop - AHEAD or (read_all and batch > start):
                self._begin(epoch + 1, worker)
            return _collate([pending.pop(int(i))() for i in plan.order[batch * b:(batch + 1) * b]])

        for item, record in self._records(epoch, plan, wanted):
            if record is not None:
                pending[item] = record
            read_all = item >= last_read
            while next_batch < stop and done_by[next_batch - start] <= item + 1:
                yield emit(next_batch)
                next_batch += 1
        for batch in range(next_batch, stop):  # the buffer's drain, after spans with nothing wanted
            yield emit(batch)

    def _begin(self, epoch: int, worker: int) -> None:
        """Start this worker's part of `epoch` (from its first batch) in a thread, once, in persistent workers."""
        if self.ahead and self._next is None and epoch < self.data.m.student.epochs:
            self._next = _Ahead((epoch, 0, worker), lambda: self._batches(epoch, 0, worker))
            self._next.start()

    def _records(self, epoch: int, plan: WorkerPlan, wanted: np.ndarray
                 ) -> Iterator[tuple[int, Callable[[], dict] | None]]:
        """(item index, a function that renders its record, or None when not wanted) for every item, in reading
        order. Reading decodes nothing: the images stay encoded until a view of their window is rendered, and
        each mix window of each replayed cache epoch gets its own `views.ShardViews`, so its unmixed views are
        rendered once whatever the order its views are emitted in, and dropped with the last of them."""
        data, m = self.data, self.data.m
        root = cache.open_cache(data.cache_path)
        cache_epochs = data.cache_epochs_of(epoch)
        readers = [cache.SlabReader(root, "train") for _ in cache_epochs]  # each keeps its own unit's chunks
        item = 0
        slabs, slab_shard, chosen, chosen_shard = None, None, None, None
        for span in plan.spans:
            if chosen_shard != span.shard:
                chosen, chosen_shard = data.selected(epoch, span.shard), span.shard
            span_items = int(chosen[span.start:span.stop].sum()) * len(cache_epochs)
            if not wanted[item:item + span_items].any():
                item += span_items
                continue
            if slab_shard != span.shard:
                slabs = [reader.read(e, span.shard, CACHED_FIELDS) for reader, e in zip(readers, cache_epochs)]
                slab_shard = span.shard
            n = data.shardlist.shards[span.shard].samples
            # whole mix windows of each cache epoch replayed: a view's partner lives in its window. The positions
            # the teacher saw are the cache's valid ones (a sample stage 1 skipped as undecodable has none).
            bounds = [views.windows_covering(m.views, e, span.shard, span.start, span.stop, n) for e in cache_epochs]
            start, stop = min(a for a, _ in bounds), max(b for _, b in bounds)
            samples = {s.pos: s for s in read_shard(data.shardlist, span.shard, start=start, stop=stop,
                                                    decode=False, on_error=m.data.on_error)}
            images = EncodedImages({pos: s.image for pos, s in samples.items() if data.valid[span.shard, pos]},
                                   data.shardlist.shards[span.shard].url)
            sizes = {"views": m.student.img_size}
            if data.teacher_size is not None:
                sizes["teacher_views"] = data.teacher_size
            rendered = [(None, {}) for _ in cache_epochs]  # per copy: (its current window, that window's ShardViews)
            for pos in range(span.start, span.stop):
                if not chosen[pos]:
                    continue
                for copy, (slab, cache_epoch) in enumerate(zip(slabs, cache_epochs)):  # the copies, in order
                    record = None
                    if wanted[item]:
                        window = views.mix_window(m.views, cache_epoch, span.shard, pos, n)
                        if rendered[copy][0] != window:  # each unmixed view rendered once per size
                            rendered[copy] = (window, {name: views.ShardViews(images, slab["view"], size, m.views)
                                                       for name, size in sizes.items()})
                        record = functools.partial(self._record, slab, samples, rendered[copy][1], span.shard, pos,
                                                   cache_epoch)
                    yield item, record
                    item += 1

    def _record(self, slab: dict, samples: dict, rendered: dict[str, views.ShardViews], shard: int, pos: int,
                cache_epoch: int) -> dict:
        data = self.data
        sample = samples.get(pos)
        if sample is None or slab["digest"][pos] == 0:
            raise cache.CacheError(f"cache {data.cache_path}: cache epoch {cache_epoch}, shard {shard} "
                                   f"({data.shardlist.shards[shard].url}) position {pos} has a label but "
                                   f"{'no readable sample' if sample is None else 'no view (digest 0)'}: the shards "
                                   f"changed since the cache was filled or the cache is damaged; rebuild the cache")
        _, lam = views.mix_target(slab["view"][pos])
        partner = rendered["views"].partner(pos)  # itself when the partner was skipped as a bad sample
        return {**{name: shard_views.view(pos) for name, shard_views in rendered.items()},
                "labels": sample.label, "partner_labels": samples[partner].label, "lam": lam,
                "topk_logprobs": slab["topk_logprobs"][pos], "topk_ids": slab["topk_ids"][pos].astype(np.int64),
                "log_leftover": slab["log_leftover"][pos], "shard": shard, "pos": pos, "cache_epoch": cache_epoch,
                **{name: slab[name][pos].astype(np.int64) if name == "tail_ids" else slab[name][pos]
                   for name in ("tail_ids", "tail_logprobs") if name in slab}}


AHEAD = 2  # a persistent worker begins its next epoch at the latest as it starts the last AHEAD batches of this one
PREFETCH = 2  # batches each loader worker has in flight (the DataLoader's prefetch_factor)


class _Ahead:
    """A worker's part of its next epoch, begun in a thread: its first batch made (reading the shards up to it,
    rendering its views and their mix partners) while the worker finishes its current epoch and the trainer
    its last steps and evaluation. `take` hands over that batch and the rest of the epoch's batches."""

    def __init__(self, key: tuple[int, int, int], batches: Callable[[], Iterator[dict]]):
        import threading

        self.key, self.make = key, batches
        self.batches: Iterator[dict] | None = None
        self.first: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"student-views-epoch-{key[0]}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self.batches = self.make()
            self.first = next(self.batches, None)
        except BaseException as e:  # raised where the epoch's first batch is asked for, as without the thread
            self.error = e

    def take(self) -> Iterator[dict]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.first is not None:
            yield self.first
            yield from self.batches

    def drop(self) -> None:
        self.thread.join()
        if self.batches is not None:
            self.batches.close()


class RankLoader:
    """One rank's train batches over a run: one DataLoader whose workers (`student.workers`) start at the first
    epoch asked for and, with `persistent`, stay for every later epoch (torch's persistent_workers), each epoch
    handed to them through shared memory; `close` (or leaving a `with` block) stops them. With workers 0 the
    batches are made in this process, as without persistence."""

    def __init__(self, data: TrainSet, rank: int, persistent: bool = True):
        workers = data.m.student.workers
        persistent = persistent and workers > 0
        self.data, self.rank = data, rank
        self.where = torch.zeros(2, dtype=torch.int64)  # (epoch, skip), read by the workers
        if workers:
            self.where.share_memory_()
        # the generator keeps the loader from drawing its base seed from torch's global RNG
        self.loader = DataLoader(StudentViews(data, rank, self.where, ahead=persistent), batch_size=None,
                                 num_workers=workers, generator=torch.Generator(), pin_memory=torch.cuda.is_available(),
                                 persistent_workers=persistent, prefetch_factor=PREFETCH if workers else None)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """Exactly `steps_per_epoch - skip` batches of this rank's share of `epoch`, resuming after batch `skip`."""
        steps = self.data.steps_per_epoch
        if not 0 <= skip <= steps:
            raise ValueError(f"cannot skip {skip} batches of an epoch that has {steps}")
        if skip == steps:
            return iter(())
        self.where[0], self.where[1] = epoch, skip
        # the workers' parts of the epoch add up to exactly `steps - skip` batches (TrainSet.share)
        return itertools.islice(self.loader, steps - skip)

    def close(self) -> None:
        """Stop the persistent workers (a no-op without them, or when stopped already)."""
        iterator, self.loader._iterator = self.loader._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def __enter__(self) -> RankLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EncodedImages(Mapping):
    """position -> RGB pixels, decoded from its encoded bytes on every access by `reader.decode_image`, as
    `reader.read_shard` decodes: the same pixels, decoded only when a view is rendered."""

    def __init__(self, encoded: dict[int, bytes], url: str):
        self.encoded, self.url = encoded, url

    def __getitem__(self, pos: int) -> np.ndarray:
        try:
            return decode_image(self.encoded[pos])
        except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of refusing bytes
            raise cache.CacheError(f"shard {self.url} position {pos} has a view in the cache but its image does not "
                                   f"decode ({e}): the shards changed since the cache was filled; rebuild the cache "
                                   f"or restore the shard") from None

    def __contains__(self, pos) -> bool:
        return pos in self.encoded

    def __iter__(self):
        return iter(self.encoded)

    def __len__(self) -> int:
        return len(self.encoded)


def _collate(records: list[dict]) -> dict[str, torch.Tensor]:
    out = {name: torch.from_numpy(np.stack([r[name] for r in records])) for name in records[0]}
    out["lam"] = out["lam"].float()  # Python floats stack as float64
    return out


# --------------------------------------------------------------------------------------------- digest check


def _verification_runs(shardlist: ShardList, count: int, window: int,
                       rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(shard, start, stop): random runs of whole mix windows, one per chosen shard, about `count` positions
    in all, so each chosen shard is read once and only the checked windows are decoded."""
    shards = len(shardlist.shards)
    chosen = np.sort(rng.choice(shards, size=min(shards, -(-count // window)), replace=False))
    run_windows = -(-count // (len(chosen) * window))
    runs = []
    for shard in map(int, chosen):
        n = shardlist.shards[shard].samples
        windows = -(-n // window)
        length = min(windows, run_windows)
        first = int(rng.integers(windows - length + 1))
        runs.append((shard, first * window, min((first + length) * window, n)))
    return runs


def student_views(m: Manifest, teacher_size: int) -> dict:
    """How the student's views relate to the teacher's, for the start-up log and the run's result."""
    size = m.student.img_size
    same = size == teacher_size
    return {"student_size": size, "teacher_size": teacher_size, "same_pixels": same,
            "note": "the student sees the pixels the teacher saw" if same else
                    f"the student sees each view rendered at {size} px from the parameters the teacher's {teacher_size} px "
                    f"view was rendered from (same crop, flip, RandAugment, mix; the erasing noise is drawn again at "
                    f"{size} px): the same views at another resolution, not the teacher's pixels"}


def _down(view: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(view).resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def _erased(params: np.ndarray, size: int) -> np.ndarray:
    """[size, size] bool: the view's erasing box (its noise is drawn per resolution)."""
    mask = np.zeros((size, size), bool)
    described = views.describe(params)
    info, grid = described["erase"], described["grid"]
    if info is not None:  # the box is in pixels of the teacher's grid x grid view
        x0, y0, x1, y1 = info["box"]
        mask[y0 * size // grid:math.ceil(y1 * size / grid), x0 * size // grid:math.ceil(x1 * size / grid)] = True
    return mask


# the student's render may differ from the teacher's (downscaled to the smaller size) by at most this share
# of the difference between the teacher's view and the student's render of another view
RESOLUTION_GAP_SHARE = 0.5


def verify_views(m: Manifest, root, shardlist: ShardList, share: float) -> int:
    """Re-render about `share` of the views of cache epoch 0 at the teacher's resolution, compare each with
    the digest of the view the teacher saw, and stop at the first mismatch. Returns how many were checked.

    A student at another resolution also gets its own render of each checked view, from the same stored
    parameters by the student loader's path; both are reduced to the smaller size (box filter, erasing boxes
    left out) and must agree far better than the teacher's view agrees with the student's render of the
    next checked view (median over the views, at most RESOLUTION_GAP_SHARE of it)."""
    size = root.attrs["teacher_size"]
    relation = student_views(m, size)
    if not relation["same_pixels"]:
        log.warning("student.img_size=%d differs from teacher.img_size=%d: %s", m.student.img_size, size,
                    relation["note"])
    if share <= 0:
        return 0
    valid = cache.read_labels(root, "train") >= 0
    rng = np.random.default_rng([m.student.seed, int(valid.sum())])
    runs = _verification_runs(shardlist, math.ceil(share * valid.sum()), m.views.mix.window, rng)
    student_size = None if relation["same_pixels"] else m.student.img_size
    small = min(size, m.student.img_size)
    pairs = []  # (teacher view, student view, params) at the smaller size, for the resolution check
    stored = root.attrs.get("versions", {})
    drift = {k: (stored.get(k), v) for k, v in library_versions().items() if stored.get(k) != v}
    checked = 0
    reader = cache.SlabReader(root, "train")
    for shard, start, stop in runs:
        slab = reader.read(0, shard, ("digest", "view"))
        n = shardlist.shards[shard].samples
        read_start, read_stop = views.windows_covering(m.views, 0, shard, start, stop, n)  # partners at the ends
        samples = {s.pos: s for s in read_shard(shardlist, shard, start=read_start, stop=read_stop,
                                                on_error=m.data.on_error)}
        images = {pos: s.image for pos, s in samples.items()}
        rendered = views.ShardViews(images, slab["view"], size, m.views)
        student = None if student_size is None else views.ShardViews(images, slab["view"], student_size, m.views)
        for pos in range(start, stop):
            if not valid[shard, pos]:
                continue
            view = rendered.view(pos)
            if student is not None:
                keep = ~_erased(slab["view"][pos], small)
                pairs.append((_down(view, small)[keep], _down(student.view(pos), small), keep))
            checked += 1
            if (views.view_digest(view) or 1) != int(slab["digest"][pos]):
                versions = ("the installed versions differ from the cache's: " +
                            ", ".join(f"{k} {now} (cache: {then})" for k, (then, now) in drift.items())
                            if drift else "torch, torchvision, timm, pillow and numpy match the cache's versions")
                raise ViewDriftError(
                    f"cache {m.cache.path}: the view of cache epoch 0, shard {shard} ({shardlist.shards[shard].url}), "
                    f"position {pos} (key {samples[pos].key!r}) renders differently now than when the teacher saw it: "
                    f"the view recipe or the library versions drifted ({versions}). Training on it would pair the "
                    f"teacher's answers with other pixels: install the cache's versions or rebuild the cache "
                    f"(`make teacher-cache` into a new cache.path); student.verify_sample=0 skips this check")
    if len(pairs) > 1:
        check_student_resolution(m, pairs)
    if drift:
        log.warning("library versions differ from the cache's (%s) but the %d re-rendered views are still identical",
                 ", ".join(f"{k} {now} vs {then}" for k, (then, now) in drift.items()), checked)
    return checked


def check_student_resolution(m: Manifest, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """Stop unless the student's renders are the teacher's views at another resolution: `pairs` holds, per
    checked view, (the teacher's view reduced to the smaller size, outside the erasing box; the student's
    render reduced likewise; the mask). Returns the median ratio of the matched gap to the control gap."""
    ratios = []
    for i, (teacher, student, keep) in enumerate(pairs):
        other = pairs[(i + 1) % len(pairs)][1][keep]
        matched, control = np.abs(teacher - student[keep]).mean(), np.abs(teacher - other).mean()
        if control > 0:
            ratios.append(matched / control)
    ratio = float(np.median(ratios)) if ratios else 0.0
    if ratio > RESOLUTION_GAP_SHARE:
        raise ViewDriftError(
            f"cache {m.cache.path}: the student's {m.student.img_size} px renders do not look like the teacher's views "
            f"at another resolution (median gap {ratio:.2f} of the gap to another view, limit "
            f"{RESOLUTION_GAP_SHARE}): the student would train on other views than the teacher answered for; "
            f"check student.img_size and the cache's recipe, or set student.img_size to teacher.img_size")
    return ratio
