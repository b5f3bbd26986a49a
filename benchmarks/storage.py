"""The storage section of `make bench`: bytes per view of cache format v3, per array, apparent and on disk.

A cache is written through `cache.create`/`cache.write_unit` (so with the layout and codecs `cache.py` uses)
at ImageNet-sized units (FULL: one unit of 8 shards x 1,000 views, as `manifests/imagenet_deit.yaml`'s
`shards_per_unit: 8`), from ImageNet-like teacher outputs (a N(0, 1.5^2) bulk over 1,000 classes with a
heavy head: own class, mix partner, five related classes) reduced by `losses.sparse_teacher_answers`, the
function stage 1 runs, and from real `views.sample_params` draws under DeiT's recipe for ImageNet-like source
sizes. Apparent bytes are the chunk files' sizes; on-disk bytes are their allocated blocks (`st_blocks`, what
`du` counts), so a chunk smaller than a filesystem block is charged its block. Every array is read back
through `cache.read_slab` and compared with what was written.

Also: the extra bytes of `cache.tail_samples`, and the bias of the soft-loss gradient of the top-K with the
uniform fill against the top-K with tail draws, both against the full-distribution gradient in float64.

`measure(quick)` returns (results for bench/results.json, the markdown section for BENCHMARKS.md);
`python -m benchmarks.storage [--quick]` prints both.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.synthetic import imagenet_like_params, synthetic_logits
from pipeline import cache, views
from pipeline.losses import deit_loss, sparse_teacher_answers

PER_VIEW = ("topk_logratios", "topk_ids", "leftover_logit", "view", "digest", "tail_ids", "tail_logprobs")
PER_SAMPLE = ("labels",)  # stored once per sample, not per view
TINYVIT_GOAL = {10: 44.0, 100: 4 * 100 + 4.0}  # TinyViT's 4K+4 B record (float16 probs, int16 ids, seed)


@dataclass(frozen=True, slots=True)
class Settings:
    shards: int
    positions: int
    shards_per_unit: int
    classes: int
    top_ks: tuple[int, ...]
    tail_samples: int
    bias_views: int
    bias_draws: int


FULL = Settings(shards=8, positions=1000, shards_per_unit=8, classes=1000, top_ks=(10, 100), tail_samples=16,
                bias_views=8, bias_draws=400)
QUICK = Settings(shards=2, positions=64, shards_per_unit=2, classes=1000, top_ks=(10, 100), tail_samples=16,
                 bias_views=4, bias_draws=40)


def imagenet_like_logits(rng: np.random.Generator, n: int, classes: int) -> torch.Tensor:
    """`synthetic.synthetic_logits` as a tensor: an ImageNet teacher's logits on DeiT's mixed views."""
    return torch.from_numpy(synthetic_logits(rng, n, classes))


def _chunk_bytes(array_dir: Path) -> tuple[int, int]:
    """(apparent, on-disk) bytes of an array's chunk files."""
    files = [f for f in (array_dir / "c").rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), sum(f.stat().st_blocks * 512 for f in files)


def cache_bytes(work: Path, s: Settings, k: int, logits: torch.Tensor, params: np.ndarray, tail: bool) -> dict:
    """Write one cache at K (with or without tail draws) and measure it, per array."""
    rng = np.random.default_rng(k)
    n = s.shards * s.positions
    t = s.tail_samples if tail else 0
    answers = sparse_teacher_answers(logits, k, torch.from_numpy(rng.random((n, t))) if t else None)
    data = {name: value.numpy().reshape((s.shards, s.positions) + value.shape[1:]) for name, value in answers.items()}
    for name in ("topk_ids", "tail_ids"):
        if name in data:
            data[name] = data[name].astype(np.uint16)
    data |= {"view": params, "digest": rng.integers(1, 2**24, size=(s.shards, s.positions)).astype(np.uint32),
             "labels": rng.integers(s.classes, size=(s.shards, s.positions)).astype(np.int32)}
    layout = cache.CacheLayout(shards=s.shards, positions=s.positions, top_k=k, num_classes=s.classes,
                               n_params=views.N_PARAMS, shards_per_unit=s.shards_per_unit, epochs=1, tail_samples=t)
    path = work / f"k{k}{'-tail' if tail else ''}"
    root = cache.create(str(path), {"train": layout}, {"classes": [str(c) for c in range(s.classes)], "top_k": k})
    for group in range(layout.groups):
        rows = layout.group_shards(group)
        cache.write_unit(root, "train", 0, group, {name: v[rows.start:rows.stop] for name, v in data.items()})
    for shard in range(s.shards):  # the reader gives back exactly what was written
        slab = cache.read_slab(root, "train", 0, shard, tuple(data))
        for name, value in slab.items():
            if name == "topk_logprobs":  # rank 1's is derived (cache.topk_logprobs): its probability to 2**-10
                first = np.exp(value[..., 0].astype(np.float64)) / np.exp(data[name][shard][..., 0].astype(np.float64))
                if np.abs(first - 1).max() > 2**-10:
                    raise AssertionError(f"{path}: the derived top-1 probability of shard {shard} is off by {np.abs(first - 1).max():.2g}")
                value, data_value = value[..., 1:], data[name][shard][..., 1:]
            else:
                data_value = data[name][shard]
            if not np.array_equal(value, data_value):
                raise AssertionError(f"{path}: {name} of shard {shard} did not read back unchanged")
    arrays = {}
    for name in (*PER_VIEW, *PER_SAMPLE, "done"):
        if (path / "train" / name).exists():
            apparent, disk = _chunk_bytes(path / "train" / name)
            raw = data[name][0, 0].nbytes if name in data else 1
            if name == "topk_logratios":
                raw = data["topk_logprobs"][0, 0, 1:].astype(np.float16).nbytes
            if name == "leftover_logit":
                raw = 2
            if name in cache.CODECS:
                raw = cache.CODECS[name][0](data[name][0, :1]).nbytes
            arrays[name] = {"raw": raw, "apparent": apparent / n, "disk": disk / n,
                            "codecs": _codecs(root["train"][name])}
    per_view = [a for name, a in arrays.items() if name in PER_VIEW or name == "done"]
    return {"views": n, "arrays": arrays,
            "total_apparent": sum(a["apparent"] for a in per_view), "total_disk": sum(a["disk"] for a in per_view),
            "labels_disk_per_sample": arrays["labels"]["disk"],
            "metadata_bytes": sum(f.stat().st_size for f in path.rglob("zarr.json"))}


def _codecs(arr) -> str:
    parts = [type(c).__name__.removesuffix("Codec").lower() for c in (*arr.filters, *arr.compressors)]
    return "+".join(parts)


def gradient_bias(s: Settings, tau: float, seed: int = 0) -> dict:
    """Squared error of the soft-loss gradient against the full-distribution one (float64), as a multiple of
    the sampling error of a mean over `bias_draws` draws: tail draws (about 1 when unbiased) and the uniform fill."""
    rng = np.random.default_rng(seed)
    b, c, k = s.bias_views, s.classes, 10
    z = imagenet_like_logits(rng, b, c).double()
    student = torch.from_numpy(rng.normal(0.0, 2.0, (b, c))).float()

    def grad(cached):
        x = student.clone().requires_grad_(True)
        deit_loss(torch.zeros_like(x), x, torch.full_like(x, 1 / c), cached, "soft", 1.0, tau)["loss"].backward()
        return x.grad.double()

    x = student.double().clone().requires_grad_(True)
    log_t, log_s = torch.log_softmax(z / tau, 1), torch.log_softmax(x / tau, 1)
    (torch.sum(log_t.exp() * (log_t - log_s)) * tau * tau / x.numel()).backward()
    truth = x.grad
    uniform = grad(sparse_teacher_answers(z.float(), k))
    draws = torch.stack([grad(sparse_teacher_answers(z.float(), k, torch.from_numpy(rng.random((b, s.tail_samples)))))
                         for _ in range(s.bias_draws)])
    sampling = draws.var(0).sum() / s.bias_draws
    return {"tau": tau, "draws": s.bias_draws, "leftover_mean": float(1 - torch.softmax(z, 1).topk(k, 1).values.sum(1).mean()),
            "tail_relative_bias": float((draws.mean(0) - truth).norm() / truth.norm()),
            "uniform_relative_bias": float((uniform - truth).norm() / truth.norm()),
            "tail_sq_error_over_sampling": float(((draws.mean(0) - truth) ** 2).sum() / sampling),
            "uniform_sq_error_over_sampling": float(((uniform - truth) ** 2).sum() / sampling),
            "single_draw_relative_error": float((draws[0] - truth).norm() / truth.norm())}


def measure(quick: bool = False) -> tuple[dict, str]:
    s = QUICK if quick else FULL
    rng = np.random.default_rng(0)
    n = s.shards * s.positions
    logits = imagenet_like_logits(rng, n, s.classes)
    params = imagenet_like_params(rng, s.shards, s.positions)
    work = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    try:
        by_k = {k: cache_bytes(work, s, k, logits, params, tail=False) for k in s.top_ks}
        tail = cache_bytes(work, s, s.top_ks[0], logits, params, tail=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bias = [gradient_bias(s, tau) for tau in (1.0, 3.0)]
    results = {f"bytes_per_view_k{k}_disk": e["total_disk"] for k, e in by_k.items()}
    results["storage"] = {"settings": {"views": n, "unit_views": s.shards_per_unit * s.positions,
                                       "classes": s.classes, "quick": quick},
                          "by_k": {str(k): e for k, e in by_k.items()},
                          "tail_samples": {"samples": s.tail_samples, "k": s.top_ks[0], **tail}, "bias": bias}
    return results, markdown(results)


def markdown(results: dict) -> str:
    st = results["storage"]
    cfg = st["settings"]
    lines = ["## 4. Storage (cache format v3)", "",
             f"Bytes per view of a cache written by `cache.create`/`cache.write_unit`: {cfg['views']} views in units "
             f"of {cfg['unit_views']} (ImageNet's 8 shards per unit), {cfg['classes']} classes, ImageNet-like teacher "
             f"outputs reduced by `losses.sparse_teacher_answers` (stage 1's function), real `views.sample_params` "
             f"under DeiT's recipe. Apparent: chunk file sizes; on disk: their allocated blocks (what `du` counts). "
             f"Labels are stored once per sample, not per view, and left out of the per-view total."
             + (" Quick run: small units, not for quoting." if cfg["quick"] else ""), ""]
    rows = []
    for k, e in st["by_k"].items():
        for name, a in e["arrays"].items():
            if name in PER_SAMPLE:
                continue
            share = a["disk"] / e["total_disk"] if e["total_disk"] else 0.0
            rows.append([k, f"`{name}`", str(a["raw"]), f"{a['apparent']:.2f}", f"{a['disk']:.2f}", f"{share:.0%}",
                         a["codecs"]])
        goal = TINYVIT_GOAL.get(int(k))
        verdict = "" if goal is None else (" (meets" if e["total_disk"] <= goal else " (**misses**") + f" {goal:g})"
        rows.append([k, "**total**", "", f"{e['total_apparent']:.2f}", f"**{e['total_disk']:.2f}**{verdict}", "", ""])
    lines += _table(["K", "array", "raw B", "apparent B/view", "on-disk B/view", "share", "codecs"], rows)
    t = st["tail_samples"]
    base = st["by_k"][str(t["k"])]["total_disk"]
    lines += ["", f"`cache.tail_samples: {t['samples']}` at K = {t['k']} adds "
              f"{t['total_disk'] - base:.2f} B per view on disk ({t['total_disk']:.2f} in all).", "",
              "Soft-loss gradient against the full distribution (float64), top-K with the uniform fill vs top-K with "
              f"{t['samples']} tail draws ({st['bias'][0]['draws']} independent draws per view, mean taken; the "
              "squared error of that mean as a multiple of its sampling error is about 1 when unbiased):", ""]
    lines += _table(["tau", "mass outside top-K", "uniform fill: relative bias", "uniform: sq. error / sampling",
                     "tail draws: relative error of the mean", "tail: sq. error / sampling", "one draw: relative error"],
                    [[f"{b['tau']:g}", f"{b['leftover_mean']:.2f}", f"{b['uniform_relative_bias']:.4f}",
                      f"{b['uniform_sq_error_over_sampling']:.1f}", f"{b['tail_relative_bias']:.4f}",
                      f"{b['tail_sq_error_over_sampling']:.2f}", f"{b['single_draw_relative_error']:.3f}"]
                     for b in st["bias"]])
    lines += ["", "At tau = 1 (DeiT's default) the tail draws are unbiased: their mean converges to the full gradient "
              "while the uniform fill stays off by its bias. At other temperatures the draws are importance-weighted "
              "and self-normalised (proposal: the tail at tau = 1): consistent but noisy, with no advantage over the "
              "uniform fill at tau = 3 in this measurement.", ""]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


if __name__ == "__main__":
    found, text = measure(quick="--quick" in sys.argv)
    print(text)
    print(json.dumps({k: v for k, v in found.items() if k != "storage"}, indent=1))
