"""Stage 2's data path: the views the teacher saw, replayed from the cache, with the teacher's answers.

Per student epoch `e` (cache epoch `e % E`), `reader.plan_epoch` lays the train shards out in a seeded
order and cuts them, at mix-window boundaries, into equal runs per rank and contiguous runs per loader
worker. A worker reads each shard's cached slab once (`cache.SlabReader`), walks its positions window by
window (so a view's mix partner is always decoded), re-renders every view from its stored parameters at the
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
batches: the smallest count any rank reaches in any epoch, so DDP never waits on a short rank.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from pipeline import cache, views
from pipeline.manifest import Manifest, ManifestError
from pipeline.reader import Span, dataloader_worker, plan_epoch, read_shard
from pipeline.shards import ShardList, load_shardlist
from pipeline.teacher_cache import library_versions

log = logging.getLogger(__name__)

CACHED_FIELDS = ("topk_logits", "topk_ids", "lse", "digest", "view")

# fingerprint field -> the manifest keys that produce it (for the fix in a mismatch message)
FINGERPRINT_KEYS = {
    "seed": "views.seed",
    "top_k": "cache.top_k",
    "recipe": "views",
    "teacher": "teacher.model / teacher.model_args / teacher.checkpoint / teacher.img_size",
    "classes": "the class map of data.train",
    "shards": "data.train / data.val",
    "teacher_size": "teacher.img_size",
}


class ViewDriftError(cache.CacheError):
    """A view re-rendered now differs from the one the teacher saw when it filled the cache."""


# --------------------------------------------------------------------------------------------- checks


def first_difference(have, want, path: str) -> tuple[str, object, object] | None:
    """The dotted path of the first place two JSON values differ, with both values there."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in sorted(set(have) | set(want), key=str):
            found = first_difference(have.get(key), want.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(have, list) and isinstance(want, list) and len(have) == len(want):
        for i, (a, b) in enumerate(zip(have, want)):
            found = first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if have == want else (path, have, want)


def _short(value, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def check_fingerprint(root, expected: dict, cache_path: str) -> None:
    """Stop before training when the cache was not built from this run spec: name the field (and the
    place inside it), both values, and the manifest key to change."""
    have = json.loads(json.dumps(dict(root.attrs)))
    want = json.loads(json.dumps(expected))  # tuples become lists, as in the stored attributes
    for field in cache.FINGERPRINT_FIELDS:
        found = first_difference(have.get(field), want.get(field), field)
        if found:
            where, a, b = found
            raise cache.CacheError(
                f"cache {cache_path} was built with a different {field}: at {where} the cache has {_short(a)}, "
                f"the run spec has {_short(b)}. The cached answers hold only for the cache's own {field}: point "
                f"cache.path at a cache built from this manifest (`make teacher-cache`), or set "
                f"{FINGERPRINT_KEYS[field]} back to what the cache was built with.")


def check_complete(root, cache_path: str, epochs: int) -> None:
    """Every unit the run will read must be done: train units of the cache epochs it uses, all val units."""
    train_done = cache.done_units(root, "train")
    used = min(epochs, train_done.shape[0])
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


def warn_if_cycling(student_epochs: int, cache_epochs: int) -> None:
    if student_epochs > cache_epochs:
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
    items: np.ndarray  # [n, 2] (shard, position) of every view it yields, in reading order
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

    def cache_epoch(self, epoch: int) -> int:
        return epoch % self.cache_epochs

    def plan(self, epoch: int, rank: int) -> list[WorkerPlan]:
        s = self.m.student
        spans_per_worker = plan_epoch(self.shardlist, epoch, s.seed, self.world_size, self.workers,
                                      block=self.m.views.mix.window)[rank]
        plans = []
        for worker, spans in enumerate(spans_per_worker):
            items = [(sp.shard, p) for sp in spans for p in range(sp.start, sp.stop) if self.valid[sp.shard, p]]
            items = np.array(items, np.int64).reshape(-1, 2)
            rng = np.random.default_rng([s.seed, epoch, rank, worker])
            order, ready = shuffle_buffer_order(len(items), s.shuffle_buffer, rng)
            plans.append(WorkerPlan(spans, items, order, ready, s.batch_size))
        return plans

    @functools.cached_property
    def _valid_before(self) -> np.ndarray:
        """[S, P + 1]: views at positions below p of each shard."""
        return np.concatenate([np.zeros((len(self.valid), 1), np.int64), self.valid.cumsum(1)], axis=1)

    def _batches_per_rank(self, epoch: int) -> list[int]:
        """Batches each rank can make in `epoch`, from counts alone (no shuffle, no rendering)."""
        prefix = self._valid_before
        spans = plan_epoch(self.shardlist, epoch, self.m.student.seed, self.world_size, self.workers,
                           block=self.m.views.mix.window)
        b = self.m.student.batch_size
        return [sum(sum(int(prefix[sp.shard, sp.stop] - prefix[sp.shard, sp.start]) for sp in w) // b for w in rank)
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
        """Exactly `steps_per_epoch - skip` batches of this rank's share of `epoch`, resuming after batch `skip`."""
        steps = self.steps_per_epoch
        plans = self.plan(epoch, rank)
        skips, first = round_robin_resume([p.batches for p in plans], skip)
        # loader worker j runs plan first + j: the loader's own round-robin starts at its worker 0
        dataset = StudentViews(self, epoch, plans[first:] + plans[:first], skips[first:] + skips[:first])
        workers = self.m.student.workers
        # the generator keeps the loader from drawing its base seed from torch's global RNG
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, generator=torch.Generator(),
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            prefetch_factor=2 if workers else None)
        # every worker yields all its planned batches, which add up to at least `steps` (see steps_per_epoch)
        yield from itertools.islice(loader, steps - skip)


def open_train_set(m: Manifest, root, world_size: int = 1, teacher_size: int | None = None) -> TrainSet:
    """The train set of an opened cache; `teacher_size`: also render every view at that size when it differs
    from the student's (for a teacher run online)."""
    shardlist = load_shardlist(m.data.train)
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
    when asked), labels, partner_labels, lam [B], topk_logits float16 [B, K], topk_ids int64 [B, K],
    lse [B], shard, pos [B]."""

    def __init__(self, data: TrainSet, epoch: int, plans: list[WorkerPlan], skips: list[int]):
        self.data, self.epoch, self.plans, self.skips = data, epoch, plans, skips

    def __iter__(self):
        worker, workers = dataloader_worker()
        if workers != len(self.plans):
            raise RuntimeError(f"the epoch was planned for {len(self.plans)} loader workers, not {workers}")
        plan, skip = self.plans[worker], self.skips[worker]
        b = plan.batch_size
        position = np.empty(len(plan.items), np.int64)  # item -> its output index
        position[plan.order] = np.arange(len(plan.items))
        wanted = (position >= skip * b) & (position < plan.batches * b)
        done_by = plan.ready[np.arange(skip, plan.batches) * b + b - 1] if plan.batches > skip else []
        pending: dict[int, Callable[[], dict]] = {}  # item -> renders its record when its batch is emitted
        next_batch = skip
        for item, record in self._records(plan, wanted):
            if record is not None:
                pending[item] = record
            while next_batch < plan.batches and done_by[next_batch - skip] <= item + 1:
                yield _collate([pending.pop(int(i))() for i in plan.order[next_batch * b:(next_batch + 1) * b]])
                next_batch += 1
        for batch in range(next_batch, plan.batches):  # the buffer's drain, after spans with nothing wanted
            yield _collate([pending.pop(int(i))() for i in plan.order[batch * b:(batch + 1) * b]])

    def _records(self, plan: WorkerPlan, wanted: np.ndarray) -> Iterator[tuple[int, Callable[[], dict] | None]]:
        """(item index, a function that renders its record, or None when not wanted) for every item, in reading
        order. Reading decodes nothing: the images stay encoded until a view of their window is rendered, and
        each mix window gets its own `views.ShardViews`, so its unmixed views are rendered once whatever the
        order its views are emitted in, and dropped with the last of them."""
        data, m = self.data, self.data.m
        reader = cache.SlabReader(cache.open_cache(data.cache_path), "train")
        cache_epoch = data.cache_epoch(self.epoch)
        window = m.views.mix.window
        item = 0
        slab, slab_shard = None, None
        for span in plan.spans:
            span_items = int(data.valid[span.shard, span.start:span.stop].sum())
            if not wanted[item:item + span_items].any():
                item += span_items
                continue
            if slab_shard != span.shard:
                slab = reader.read(cache_epoch, span.shard, CACHED_FIELDS)
                slab_shard = span.shard
            n = data.shardlist.shards[span.shard].samples
            start, stop = span.start // window * window, min(-(-span.stop // window) * window, n)
            # whole mix windows: a view's partner lives in its window. The positions the teacher saw are the
            # cache's valid ones (a sample stage 1 skipped as undecodable has none), so the images are those.
            samples = {s.pos: s for s in read_shard(data.shardlist, span.shard, start=start, stop=stop,
                                                    decode=False, on_error=m.data.on_error)}
            images = EncodedImages({pos: s.image for pos, s in samples.items() if data.valid[span.shard, pos]},
                                   data.shardlist.shards[span.shard].url)
            sizes = {"views": m.student.img_size}
            if data.teacher_size is not None:
                sizes["teacher_views"] = data.teacher_size
            rendered_window, rendered = None, {}  # the pending records hold their window's ShardViews
            for pos in range(span.start, span.stop):
                if not data.valid[span.shard, pos]:
                    continue
                record = None
                if wanted[item]:
                    if rendered_window != pos // window:  # each unmixed view rendered once per size
                        rendered_window = pos // window
                        rendered = {name: views.ShardViews(images, slab["view"], size, m.views)
                                    for name, size in sizes.items()}
                    record = functools.partial(self._record, slab, samples, rendered, span.shard, pos, cache_epoch)
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
                "topk_logits": slab["topk_logits"][pos], "topk_ids": slab["topk_ids"][pos].astype(np.int64),
                "lse": slab["lse"][pos], "shard": shard, "pos": pos}


class EncodedImages(Mapping):
    """position -> RGB image, decoded from its encoded bytes on every access, as `reader.read_shard` decodes
    (`Image.open(...).convert("RGB")`): the same pixels, decoded only when a view is rendered."""

    def __init__(self, encoded: dict[int, bytes], url: str):
        self.encoded, self.url = encoded, url

    def __getitem__(self, pos: int) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.encoded[pos])) as img:
                return img.convert("RGB")
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


def verify_views(m: Manifest, root, shardlist: ShardList, share: float) -> int:
    """Re-render about `share` of the views of cache epoch 0 at the teacher's resolution, compare each with
    the digest of the view the teacher saw, and stop at the first mismatch. Returns how many were checked."""
    if share <= 0:
        return 0
    valid = cache.read_labels(root, "train") >= 0
    rng = np.random.default_rng([m.student.seed, int(valid.sum())])
    runs = _verification_runs(shardlist, math.ceil(share * valid.sum()), m.views.mix.window, rng)
    size = root.attrs["teacher_size"]
    stored = root.attrs.get("versions", {})
    drift = {k: (stored.get(k), v) for k, v in library_versions().items() if stored.get(k) != v}
    checked = 0
    reader = cache.SlabReader(root, "train")
    for shard, start, stop in runs:
        slab = reader.read(0, shard, ("digest", "view"))
        samples = {s.pos: s for s in read_shard(shardlist, shard, start=start, stop=stop, on_error=m.data.on_error)}
        rendered = views.ShardViews({pos: s.image for pos, s in samples.items()}, slab["view"], size, m.views)
        for pos in range(start, stop):
            if not valid[shard, pos]:
                continue
            view = rendered.view(pos)
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
    if drift:
        log.warning("library versions differ from the cache's (%s) but the %d re-rendered views are still identical",
                 ", ".join(f"{k} {now} vs {then}" for k, (then, now) in drift.items()), checked)
    return checked
