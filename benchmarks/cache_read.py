"""Section 3, cache read: views/s of the student's reader (`cache.SlabReader`) in one process, in shard order
and in the order the student reads the shards (a seeded permutation, as `reader.plan_epoch` lays them out),
over a synthetic ImageNet-like cache (K = 10 and 100, 1000 classes, real view parameters) written by
`cache.create`/`cache.write_unit`; next to `cache.read_slab` (which opens the arrays and checks the unit on
every call) and to the same slab or a whole unit read through array handles opened once."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.markdown import num, table
from benchmarks.settings import Settings
from benchmarks.synthetic import imagenet_like_params, synthetic_logits
from benchmarks.timing import interleave, summary
from pipeline import cache, views
from pipeline.losses import sparse_teacher_answers
from pipeline.student_data import CACHED_FIELDS

KS = (10, 100)


def write_synthetic_cache(path: Path, k: int, s: Settings) -> None:
    """A train split of s.shards x s.positions views at top-K `k`, chunks of s.shards_per_unit shards."""
    rng = np.random.default_rng(0)
    n = s.shards * s.positions
    logits = synthetic_logits(rng, n, s.classes)
    answers = sparse_teacher_answers(torch.from_numpy(logits).float(), k)  # stage 1's reduction
    fields = {name: value.numpy().reshape((s.shards, s.positions) + value.shape[1:]) for name, value in answers.items()}
    fields |= {"topk_ids": fields["topk_ids"].astype(np.uint16),
              "view": imagenet_like_params(rng, s.shards, s.positions),
              "digest": rng.integers(1, 2**32, size=(s.shards, s.positions)).astype(np.uint32),
              "labels": rng.integers(s.classes, size=(s.shards, s.positions)).astype(np.int32)}
    layout = cache.CacheLayout(shards=s.shards, positions=s.positions, top_k=k, num_classes=s.classes,
                               n_params=views.N_PARAMS, shards_per_unit=s.shards_per_unit, epochs=1)
    root = cache.create(str(path), {"train": layout},
                        {"classes": [str(c) for c in range(s.classes)], "top_k": k, "synthetic": True})
    for group in range(layout.groups):
        shards = layout.group_shards(group)
        cache.write_unit(root, "train", 0, group, {name: v[shards.start:shards.stop] for name, v in fields.items()})


def measure(work: Path, s: Settings) -> dict:
    """Over four units' worth of shards, so that the student's order crosses chunks as it does on ImageNet
    (1,281 shards in units of 8)."""
    s = replace(s, shards=4 * s.shards_per_unit)
    out = {}
    student_order = np.random.default_rng([0, 0]).permutation(s.shards).tolist()
    for k in KS:
        path = work / "cache-read" / f"k{k}"
        write_synthetic_cache(path, k, s)
        root = cache.open_cache(str(path))
        arrays = {name: root["train"][name] for name in CACHED_FIELDS if name in root["train"]}
        reads = max(s.slab_reads, s.shards)

        def rate(read_one, views_per_read, opened=lambda: None):
            def run():
                state = opened()  # outside the clock, like the open handles: a reader lives for an epoch
                start = time.perf_counter()
                for i in range(reads):
                    read_one(i, state)
                return reads * views_per_read / (time.perf_counter() - start)
            return run

        def reader(order):
            return lambda i, slab_reader: slab_reader.read(0, order[i % s.shards], CACHED_FIELDS)

        def slab(i, _, root=root):
            cache.read_slab(root, "train", 0, i % s.shards, CACHED_FIELDS)

        def opened_slab(i, _, arrays=arrays):
            {name: arr[0, i % s.shards] for name, arr in arrays.items()}

        def opened_unit(i, _, arrays=arrays):
            first = i % (s.shards // s.shards_per_unit) * s.shards_per_unit
            {name: arr[0, first:first + s.shards_per_unit] for name, arr in arrays.items()}

        new_reader = lambda root=root: cache.SlabReader(root, "train")  # noqa: E731
        runs = interleave({"slab_reader": rate(reader(list(range(s.shards))), s.positions, new_reader),
                           "slab_reader_student_order": rate(reader(student_order), s.positions, new_reader),
                           "read_slab": rate(slab, s.positions), "opened_slab": rate(opened_slab, s.positions),
                           "opened_unit": rate(opened_unit, s.positions * s.shards_per_unit)}, s.reps)
        out[str(k)] = {name: summary(values) for name, values in runs.items()} | {
            "views_per_slab": s.positions, "views_per_unit": s.positions * s.shards_per_unit,
            "shards": s.shards, "student_order": student_order}
    return out


def markdown(rd: dict) -> list[str]:
    rows = []
    for k, entry in rd.items():
        reader, permuted, slab, opened, unit = (
            entry[n]["median"] for n in ("slab_reader", "slab_reader_student_order", "read_slab", "opened_slab",
                                         "opened_unit"))
        rows.append([k, num(reader), num(permuted), num(slab), num(opened), num(unit),
                     f"In the student's order the reader runs at {num(permuted / reader * 100, 2)}% of its "
                     f"shard-order rate; it gives {num(reader / unit, 2)}x the whole-chunk read and "
                     f"{num(reader / slab, 2)}x read_slab."])
    first = next(iter(rd.values()))
    return ["## 3. Cache read", "",
            f"views/s in one process over a synthetic cache of {first['shards']} shards x {first['views_per_slab']} "
            f"positions, chunks of {first['views_per_unit']} views (shards_per_unit shards, as in the ImageNet "
            f"manifest), fields `student_data.CACHED_FIELDS`. `SlabReader` is the student's reader (a new one per "
            f"repetition, opened before the clock starts, as a worker opens it once per epoch), reading the shards "
            f"in order and in the student's order (a seeded permutation, as `reader.plan_epoch` lays the shards "
            f"out: the order that matters); `read_slab` opens the arrays and checks the unit on every call; "
            f"`open handles` reads one slab or a whole chunk through arrays opened once.", ""] + table(
        ["K", "SlabReader, shard order", "SlabReader, student's order", "read_slab", "open handles, one slab",
         "open handles, whole chunk", "interpretation"], rows)


def goals(rd: dict) -> list[list[str]]:
    k = "10" if "10" in rd else next(iter(rd))
    value = rd[k]["slab_reader_student_order"]["median"]
    return [["3", f"cache.SlabReader views/s per process in the student's shard order (K={k})", num(value),
             ">= 1e6", "yes" if value >= 1e6 else "**no**"]]
