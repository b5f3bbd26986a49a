"""Verify a teacher cache against the teacher: recompute a random sample of cached views and compare.

For every shard with complete units, a seeded random run of about `share` of its views (at least one, so
every complete unit is sampled) is re-rendered from the stored parameters at the teacher's resolution
(`views.ShardViews`: `views.render`'s views, each unmixed view drawn once; val: `views.eval_view`), and for
every complete epoch of that shard:

- the digest of the re-rendered uint8 view must equal the stored one (the pixels are the teacher's);
- the teacher is run again on the view and its answer compared with the stored one in probability space,
  where the student uses it (logits are not comparable: adding a constant to all of them changes nothing):
  class agreement of the top-K as a set and in order, the top-1, and per view the largest
  |p_cached - p_recomputed| over the stored classes, the error of the leftover mass (outside the stored
  classes), and the KL divergence KL(recomputed || cached) over the K stored classes plus the leftover as
  one bucket (the uniform fill is the same on both sides, so it is left out). Stored tail draws
  (`cache.tail_samples`) count among the stored classes for the probability error.

A float16 cache checked on the machine that filled it is off by about 1e-4 in probability and 1e-7 in KL;
the defaults (2e-3, 2e-3, 1e-3 nats) pass it comfortably and fail a teacher whose logits moved by 1% of
their spread, or a cache with two classes swapped (tests/test_verify.py checks both). A cache filled under
CUDA bfloat16 autocast and checked on CPU moves by about that much: loosen --max-prob-error / --max-kl
there. A top-1 disagreement counts only when the recomputed winner beats the cached top-1 class by more
than `max_prob_error` in probability (a near-tie may flip either way). Views whose digest differs are not
compared further: their pixels are not the teacher's.

The library versions stored in the cache are compared with the installed ones; they are reported, and the
digests decide whether the difference matters. A scan of every chunk of every complete unit (existence and
checksum) runs first unless switched off. Units not complete yet are listed, not failed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from pipeline import cache, views
from pipeline.cache import cache_attrs, library_versions
from pipeline.manifest import Manifest
from pipeline.reader import ShardList, read_shard
from pipeline.shards import data_shardlist
from pipeline.student_data import check_fingerprint
from pipeline.teacher import Teacher, forward, load_teacher, pick_device

ANSWERS = ("topk_logprobs", "topk_ids", "log_leftover")
FIELDS = {"train": ANSWERS + ("digest", "view") + cache.TAIL_FIELDS, "val": ANSWERS + ("digest",)}
EXAMPLES = 5  # locations listed per kind of failure


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Pass/fail limits; the defaults are documented in `distill verify-cache --help`."""

    max_digest_mismatches: int = 0
    max_top1_disagreement: float = 0.01  # share of checked views
    max_prob_error: float = 2e-3  # per view: max |p_cached - p_recomputed| over the stored classes
    max_leftover_error: float = 2e-3  # per view: |leftover mass cached - recomputed|
    max_kl: float = 1e-3  # per view: KL(recomputed || cached) over the stored classes + leftover, in nats


@dataclass(slots=True)
class SplitReport:
    split: str
    units_done: int = 0
    units_total: int = 0
    incomplete: list[str] = field(default_factory=list)
    views: int = 0
    digest_matches: int = 0
    digest_mismatches: list[str] = field(default_factory=list)
    topk_set_agree: int = 0
    topk_order_agree: int = 0
    top1_agree: int = 0
    top1_disagreements: list[str] = field(default_factory=list)  # beyond tolerance
    max_prob_error: float = 0.0
    max_leftover_error: float = 0.0
    max_kl: float = 0.0
    violations: list[str] = field(default_factory=list)  # views past a probability-space threshold

    @property
    def compared(self) -> int:
        return self.digest_matches


@dataclass(slots=True)
class Report:
    cache: str
    share: float
    seed: int
    thresholds: Thresholds
    splits: dict[str, SplitReport]
    versions: dict[str, dict[str, str | None]]  # library -> {"cache": ..., "installed": ...}, differing only
    damaged: list[str] = field(default_factory=list)  # chunk problems of complete units
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        return out


# --------------------------------------------------------------------------------------------- sampling


def sample_positions(labels: np.ndarray, share: float, seed: int, split: str) -> dict[int, np.ndarray]:
    """shard -> the positions to check: a random run of about `share` of the shard's views (at least one),
    drawn from (seed, split, shard) alone. `labels` [S, P] is -1 where no view is cached."""
    out = {}
    for shard, row in enumerate(labels):
        held = np.flatnonzero(row >= 0)
        if not len(held):
            continue
        n = min(len(held), max(1, math.ceil(share * len(held))))
        rng = np.random.default_rng([seed, cache.SPLITS.index(split), shard])
        first = int(rng.integers(len(held) - n + 1))
        out[shard] = held[first:first + n]
    return out


# --------------------------------------------------------------------------------------------- checks


def scan_chunks(root) -> list[str]:
    """Every chunk of every complete unit must exist and decode (checksum): one line per problem. Each array
    is read an epoch at a time; only where that fails are the complete units' chunks decoded one by one."""
    problems = []
    for split in cache.SPLITS:
        arrays = dict(root[split].arrays())
        layout = cache.layout_of(root, split)
        done = cache.done_units(root, split)
        for epoch in [None] if split == "val" else range(done.shape[0]):
            units = {int(g): cache.unit_chunks(arrays, epoch, int(g))
                     for g in np.flatnonzero(done if epoch is None else done[epoch])}
            missing = set(cache.missing_chunks(root, arrays, [c for chunks in units.values() for c in chunks]))
            problems += [str(cache.missing_chunk_error(root, split, arrays, layout, epoch, group, *chunk))
                         for group, chunks in units.items() for chunk in chunks if chunk in missing]
            for name, arr in arrays.items():
                if name == "done" or (name == "labels" and epoch not in (None, 0)):
                    continue  # the done flags were read above; train labels belong to epoch 0
                try:
                    arr[... if epoch is None or name == "labels" else epoch]
                except Exception:  # a chunk does not decode (it may be one of a unit not done): find which
                    chunks = [c for cs in units.values() for c in cs if c[0] == name and c not in missing]
                    problems += _undecodable(root, split, arr, chunks)
    return problems


def _undecodable(root, split: str, arr, chunks: list[tuple[str, tuple[int, ...]]]) -> list[str]:
    problems = []
    for _, coords in chunks:
        try:
            cache.check_chunk(root, split, arr, coords)
        except cache.CacheError as e:
            problems.append(str(e))
    return problems


def version_drift(attrs: dict) -> dict[str, dict[str, str | None]]:
    stored = attrs.get("versions", {})
    return {name: {"cache": stored.get(name), "installed": now}
            for name, now in library_versions().items() if stored.get(name) != now}


def compare_answers(report: SplitReport, stored: dict, logits: np.ndarray, where: list[str], t: Thresholds) -> None:
    """Fold one batch of recomputed logits [b, C] into the report, against the stored answers (`ANSWERS`:
    top-K log-probabilities and ids [b, K], log leftover [b]), in probability space (see the module doc)."""
    ids = stored["topk_ids"].astype(np.int64)
    k = ids.shape[1]
    log_p = torch.log_softmax(torch.from_numpy(logits).double(), dim=1)
    rec_ids = log_p.topk(k, dim=1).indices.numpy()
    p_rec = np.take_along_axis(log_p.exp().numpy(), ids, axis=1)
    rest = log_p.scatter(1, torch.from_numpy(ids), float("-inf"))
    m_rec = torch.logsumexp(rest, dim=1).exp().numpy() if k < logits.shape[1] else np.zeros(len(ids))
    p_cached = np.exp(stored["topk_logprobs"].astype(np.float64))
    m_cached = np.exp(stored["log_leftover"].astype(np.float64)) if k < logits.shape[1] else np.zeros(len(ids))
    prob_error = np.abs(p_cached - p_rec).max(axis=1)
    if "tail_ids" in stored:  # the tail draws' stored probabilities count among the stored classes
        tail_rec = np.take_along_axis(log_p.exp().numpy(), stored["tail_ids"].astype(np.int64), axis=1)
        tail_error = np.abs(np.exp(stored["tail_logprobs"].astype(np.float64)) - tail_rec).max(axis=1)
        prob_error = np.maximum(prob_error, tail_error)
    leftover_error = np.abs(m_cached - m_rec)
    kl = _bucket_kl(np.column_stack([p_rec, m_rec]), np.column_stack([p_cached, m_cached]))
    rows = np.arange(len(ids))
    full = log_p.exp().numpy()
    margin = full[rows, rec_ids[:, 0]] - full[rows, ids[:, 0]]
    report.topk_set_agree += int(sum(set(a) == set(b) for a, b in zip(ids.tolist(), rec_ids.tolist())))
    report.topk_order_agree += int((ids == rec_ids).all(axis=1).sum())
    report.top1_agree += int((ids[:, 0] == rec_ids[:, 0]).sum())
    report.max_prob_error = max(report.max_prob_error, float(prob_error.max(initial=0.0)))
    report.max_leftover_error = max(report.max_leftover_error, float(leftover_error.max(initial=0.0)))
    report.max_kl = max(report.max_kl, float(kl.max(initial=0.0)))
    for i, place in enumerate(where):
        if margin[i] > t.max_prob_error:
            report.top1_disagreements.append(f"{place}: cache says class {ids[i, 0]}, the teacher now says "
                                             f"{rec_ids[i, 0]} by a probability margin of {margin[i]:.4g}")
        if prob_error[i] > t.max_prob_error or leftover_error[i] > t.max_leftover_error or kl[i] > t.max_kl:
            j = int(np.argmax(np.abs(p_cached[i] - p_rec[i])))
            report.violations.append(
                f"{place}: class {ids[i, j]} cached p={p_cached[i, j]:.6g}, recomputed {p_rec[i, j]:.6g}; "
                f"leftover cached {m_cached[i]:.6g}, recomputed {m_rec[i]:.6g}; KL {kl[i]:.3g}")


def _bucket_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row over buckets, each row renormalised (float16 rounding leaves the cached sum off 1)."""
    p = p / p.sum(axis=1, keepdims=True)
    q = q / q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=1)


# --------------------------------------------------------------------------------------------- the run


class _Verifier:
    def __init__(self, m: Manifest, root, teacher: Teacher, device: torch.device, thresholds: Thresholds):
        self.m, self.root, self.teacher, self.device, self.t = m, root, teacher, device, thresholds
        self.size = root.attrs["teacher_size"]

    def shard(self, report: SplitReport, shardlist: ShardList, split: str, shard: int, positions: np.ndarray,
              epochs: list[int | None], damaged: list[str]) -> None:
        """Check `positions` of one shard in each of `epochs` (its complete units), reading the shard once."""
        n, first, last = shardlist.shards[shard].samples, int(positions[0]), int(positions[-1]) + 1
        # whole mix windows of every epoch checked (their alignment changes with the epoch)
        covering = [views.windows_covering(self.m.views, e, shard, first, last, n) for e in epochs if e is not None]
        start, stop = min([first] + [a for a, _ in covering]), max([last] + [b for _, b in covering])
        samples = {s.pos: s for s in read_shard(shardlist, shard, start=start, stop=stop, on_error="skip")}
        for epoch in epochs:
            try:
                slab = cache.read_slab(self.root, split, epoch, shard, FIELDS[split])
            except cache.CacheError as e:  # found here when the chunk scan is off
                damaged.append(str(e))
                continue
            self._epoch(report, shardlist, split, epoch, shard, positions, samples, slab)

    def _epoch(self, report, shardlist, split, epoch, shard, positions, samples, slab) -> None:
        train_views = None if split == "val" else views.ShardViews(
            {pos: s.image for pos, s in samples.items()}, slab["view"], self.size, self.m.views)
        rendered, places, kept = [], [], []
        for pos in map(int, positions):
            where = f"{split} {'' if epoch is None else f'epoch {epoch}, '}shard {shard} position {pos}"
            sample = samples.get(pos)
            report.views += 1
            if sample is None:
                report.digest_mismatches.append(f"{where}: the sample no longer decodes from "
                                                f"{shardlist.shards[shard].url}")
                continue
            where += f" (key {sample.key!r})"
            view = (views.eval_view(sample.image, self.size, self.teacher.crop_pct) if train_views is None
                    else train_views.view(pos))  # a skipped bad partner: the teacher stage mixed with itself
            if (views.view_digest(view) or 1) != int(slab["digest"][pos]):
                report.digest_mismatches.append(where)
                continue
            report.digest_matches += 1
            rendered.append(view)
            places.append(where)
            kept.append(pos)
        batch = self.m.cache.batch_size
        for i in range(0, len(kept), batch):
            x = torch.from_numpy(np.stack(rendered[i:i + batch]))
            logits = forward(self.teacher, x, self.device).float().cpu().numpy()
            rows = kept[i:i + batch]
            stored = {name: slab[name][rows] for name in ANSWERS + cache.TAIL_FIELDS if name in slab}
            compare_answers(report, stored, logits, places[i:i + batch], self.t)


def _incomplete(split: str, done: np.ndarray) -> list[str]:
    if split == "val":
        return [f"val shard group {g}" for g in np.flatnonzero(~done)]
    return [f"train epoch {e}, shard group {g}" for e, g in zip(*np.nonzero(~done))]


def verify_cache(m: Manifest, path: str, share: float = 0.01, seed: int = 0, thresholds: Thresholds = Thresholds(),
                 scan: bool = True, progress: bool = False) -> Report:
    """Verify the cache at `path` (built from the run spec `m`) on a random sample; see the module doc.
    `progress`: a bar per split on a terminal (none in logs)."""
    if not 0 < share <= 1:
        raise ValueError(f"--sample={share} must lie in (0, 1]: the share of cached views to recompute")
    root = cache.open_cache(path)
    lists = {"train": data_shardlist(m, "train"), "val": data_shardlist(m, "val")}
    device = pick_device(m.cache.device)
    teacher = load_teacher(m.teacher, len(lists["train"].classes), device)
    check_fingerprint(root, cache_attrs(m, lists["train"], lists["val"], teacher.identity), path)
    report = Report(path, share, seed, thresholds, {}, version_drift(dict(root.attrs)))
    if scan:
        report.damaged = scan_chunks(root)
    verifier = _Verifier(m, root, teacher, device, thresholds)
    for split in cache.SPLITS:
        layout = cache.layout_of(root, split)
        done = cache.done_units(root, split)
        sr = report.splits[split] = SplitReport(split, int(done.sum()), int(done.size), _incomplete(split, done))
        labels = cache.read_labels(root, split, report.damaged)
        sampled = sample_positions(labels, share, seed, split)
        for shard, positions in tqdm(sampled.items(), total=len(sampled), unit="shard", desc=f"verify {split}",
                                     disable=None if progress else True):
            group = shard // layout.shards_per_unit
            epochs = [None] if split == "val" else [int(e) for e in np.flatnonzero(done[:, group])]
            if not (done[group] if split == "val" else epochs):
                continue
            verifier.shard(sr, lists[split], split, shard, positions, epochs, report.damaged)
    report.damaged = list(dict.fromkeys(report.damaged))
    report.failures = _failures(report)
    return report


def _failures(report: Report) -> list[str]:
    t, out = report.thresholds, []
    if report.damaged:
        out.append(f"{len(report.damaged)} damaged chunk(s) in complete units: {report.damaged[0]}")
    for sr in report.splits.values():
        if len(sr.digest_mismatches) > t.max_digest_mismatches:
            drift = ", ".join(f"{k} {v['installed']} (cache: {v['cache']})" for k, v in report.versions.items())
            cause = (f"the installed versions differ from the cache's: {drift}" if drift else
                     "the library versions match the cache's: the rendering code or the cache itself changed")
            out.append(f"{sr.split}: {len(sr.digest_mismatches)} of {sr.views} re-rendered views differ from the "
                       f"views the teacher saw ({cause}); first: {sr.digest_mismatches[0]}. Install the cache's "
                       f"versions or rebuild the cache")
        if sr.compared and len(sr.top1_disagreements) / sr.compared > t.max_top1_disagreement:
            out.append(f"{sr.split}: the teacher's top-1 now differs on {len(sr.top1_disagreements)} of "
                       f"{sr.compared} views (more than {t.max_top1_disagreement:.2%}); first: "
                       f"{sr.top1_disagreements[0]}")
        if sr.violations:
            out.append(f"{sr.split}: {len(sr.violations)} views have cached probabilities off by more than "
                       f"{t.max_prob_error:g} per class, {t.max_leftover_error:g} in leftover mass or {t.max_kl:g} "
                       f"nats of KL (--max-prob-error/--max-leftover-error/--max-kl); first: {sr.violations[0]}")
    return out


# --------------------------------------------------------------------------------------------- the table


def format_report(report: Report) -> str:
    def share(n: int, d: int) -> str:
        return f"{n}/{d} ({n / d:.1%})" if d else "-"

    rows = [("", *report.splits)]
    rows.append(("complete units", *(f"{s.units_done}/{s.units_total}" for s in report.splits.values())))
    rows.append(("views checked", *(str(s.views) for s in report.splits.values())))
    rows.append(("digest matches", *(share(s.digest_matches, s.views) for s in report.splits.values())))
    rows.append(("top-K set agrees", *(share(s.topk_set_agree, s.compared) for s in report.splits.values())))
    rows.append(("top-K order agrees", *(share(s.topk_order_agree, s.compared) for s in report.splits.values())))
    rows.append(("top-1 agrees", *(share(s.top1_agree, s.compared) for s in report.splits.values())))
    rows.append(("top-1 off beyond tol", *(str(len(s.top1_disagreements)) for s in report.splits.values())))
    rows.append(("max |p error|", *(f"{s.max_prob_error:.3g}" for s in report.splits.values())))
    rows.append(("max leftover error", *(f"{s.max_leftover_error:.3g}" for s in report.splits.values())))
    rows.append(("max KL (nats)", *(f"{s.max_kl:.3g}" for s in report.splits.values())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"verify-cache {report.cache}: sample {report.share:g} (seed {report.seed})"]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in rows]
    if report.versions:
        lines.append("library versions differ from the cache's (the digests above decide whether that matters): " +
                     ", ".join(f"{k} {v['installed']} (cache: {v['cache']})" for k, v in report.versions.items()))
    for s in report.splits.values():
        if s.incomplete:
            lines.append(f"{s.split}: {len(s.incomplete)} unit(s) not complete, not verified (first: "
                         f"{s.incomplete[0]}): resume `make teacher-cache` to finish them")
    lines.append("PASSED" if report.passed else "FAILED:\n  " + "\n  ".join(report.failures))
    return "\n".join(lines)
