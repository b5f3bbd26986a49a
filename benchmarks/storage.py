"""Section 4, storage: bytes per view on disk, per field, for several K, next to TinyViT's 4K+4, on synthetic
caches written by `cache.create`/`cache.write_unit` (real view parameters, synthetic ImageNet-like logits);
and every lossless codec candidate tried on every field, so the codec choice in `cache.py` is a measured one.

Interface (the runner calls only this): `measure(quick) -> (results, markdown section)`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from benchmarks.markdown import met, num, table
from benchmarks.settings import Settings, settings
from benchmarks.synthetic import imagenet_like_params, synthetic_logits
from pipeline import cache, views

STORED_FIELDS = ("topk_logits", "topk_ids", "lse", "view", "digest")  # per view, in the report's order


def tinyvit_bytes(top_k: int) -> int:
    """TinyViT's per-view record: K float16 probabilities, K int16 ids, a 4-byte seed."""
    return 4 * top_k + 4


def measure(quick: bool, work: str | Path | None = None) -> tuple[dict, str]:
    """The section's results and its markdown; the caches go under `work` (a temporary directory if None)."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
            return measure(quick, tmp)
    result = storage(Path(work), settings(quick))
    return result, "\n".join(markdown(result))


REFERENCE_CODEC = "blosc-zstd5-shuffle"  # the project's first choice; candidates must keep half its speed
PER_VIEW_VECTORS = ("topk_logits", "topk_ids", "view")  # fields with a trailing axis per view


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
    digests = rng.integers(1, 2**64 - 1, size=(s.shards, s.positions), dtype=np.uint64, endpoint=True)
    labels = rng.integers(s.classes, size=(s.shards, s.positions)).astype(np.int32)
    top1 = np.exp(logits.max(1) - lse.reshape(-1))
    result = {"views": n, "classes": s.classes, "positions_per_shard": s.positions,
              "chunk_views": s.shards_per_unit * s.positions, "mean_top1_probability": float(top1.mean()),
              "by_k": {}}
    for k in s.top_ks:
        ids = order[:, :k]
        shape = (s.shards, s.positions, k)
        fields = {"topk_logits": np.take_along_axis(logits, ids, 1).astype(np.float16).reshape(shape),
                  "topk_ids": ids.astype(np.uint16 if s.classes <= 65535 else np.int32).reshape(shape),
                  "lse": lse, "view": params, "digest": digests}
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
            if name in ("topk_logits", "topk_ids") or k == s.top_ks[0]:  # the others do not depend on K
                chunks = (s.shards_per_unit,) + fields[name].shape[1:]
                candidates[name] = compare_codecs(work / "codecs" / f"k{k}", name, fields[name], chunks)
        result["by_k"][str(k)] = {
            "bytes_per_view": per_field, "total": total, "tinyvit": tinyvit_bytes(k),
            "topk_only": per_field["topk_logits"] + per_field["topk_ids"],
            "raw_bytes_per_view": {name: fields[name][0, 0].nbytes for name in STORED_FIELDS},
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


def markdown(sg: dict) -> list[str]:
    rows = []
    for k, e in sg["by_k"].items():
        b = e["bytes_per_view"]
        verdict = "within" if e["total"] <= e["tinyvit"] else "above"
        rows.append([k] + [num(b[f]) for f in STORED_FIELDS] + [num(e["total"]), str(e["tinyvit"]),
                     f"{verdict} TinyViT's record; top-K alone (logits + ids) {num(e['topk_only'])} B vs its "
                     f"{4 * int(k)} B, plus {num(b['view'] + b['digest'])} B of explicit view parameters and digest "
                     f"that TinyViT's seed replaces."])
    first = next(iter(sg["by_k"].values()))
    lines = ["## 4. Storage", "",
             f"Bytes per view on disk (chunk files, crc32c included; metadata excluded: {first['metadata_bytes']} B "
             f"per cache) of synthetic caches written by `cache.create`/`cache.write_unit`: {sg['views']} views in "
             f"chunks of {sg['chunk_views']}, {sg['classes']} classes. Logits: `synthetic_logits`, a Gaussian bulk "
             f"N(0, 1.5^2) with a heavy head (own class, mix partner, five neighbours; mean top-1 probability "
             f"{num(sg['mean_top1_probability'], 2)}); view parameters: real `views.sample_params` under DeiT's "
             f"recipe for ImageNet-like source sizes; digests: uniform 64-bit. Labels (stored once per sample, "
             f"not per view) are left out. Codecs in use: "
             + ", ".join(f"{f} `{c}`" for f, c in first["in_use"].items()) + ".", ""]
    lines += table(["K", *STORED_FIELDS, "total", "TinyViT 4K+4", "interpretation"], rows)
    if "10" in sg["by_k"]:
        k10 = sg["by_k"]["10"]
        lines += ["", f"Goal: at most TinyViT's {k10['tinyvit']} B per view at K=10 with every field: "
                  f"{num(k10['total'])} B, met: {met(k10['total'] <= k10['tinyvit'])}."]
    lines += ["", "Lossless codec candidates: bytes per view, and encode / decode rates in thousands of views/s "
              "(whole-array write and read, median of 3). Every candidate reads back bit-identical.", ""]
    names = list(next(iter(first["candidates"].values())))
    cand_rows = []
    for field in STORED_FIELDS:
        for k, e in sg["by_k"].items():
            if field not in e["candidates"]:
                continue
            c = e["candidates"][field]
            cand_rows.append([field, k if field in ("topk_logits", "topk_ids") else "any"] + [
                f"{num(c[n]['bytes_per_view'])} ({c[n]['encode_views_per_s'] / 1e3:.0f} / "
                f"{c[n]['decode_views_per_s'] / 1e3:.0f})" if n in c else "-" for n in names])
    lines += table(["field", "K", *names], cand_rows)
    lines += ["", f"Choice per field: the fewest bytes (summed over the K measured) among the candidates that encode "
              f"and decode at least half as fast as `{REFERENCE_CODEC}` (which is kept unless the choice saves 1%), "
              f"against what `cache.py` writes now:", ""]
    lines += table(["field", "chosen", "bytes (summed over K)", "cache.py now (summed over K)",
                     "smallest at any speed"],
                    [[f, f"`{b['codec']}`", num(b["bytes_per_view_summed"]), num(b["in_use_summed"]),
                      f"`{b['smallest_overall']}` {num(b['smallest_overall_bytes'])}"]
                     for f, b in sg["best"].items()])
    return lines


