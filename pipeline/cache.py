"""The teacher cache: one Zarr v3 group, its layout, its attributes, and the unit write/read rules.

Layout, schema distill-cache/3 (E cached epochs, S train shards, P = longest train shard, K = top-K, B =
`pipeline.views.PARAM_BYTES`)::

    <cache>/zarr.json                  attributes: schema, fingerprint, K, classes, teacher, recipe, versions ...
    train/topk_logratios float16 [E, S, P, K-1]  log p_i - log p_1 of ranks 2..K (none when K = 1)
    train/topk_ids      uint16|int32 [E, S, P, K]  the top-K class ids, rank 1 first (uint16 up to 65,535 classes)
    train/leftover_logit uint16 [E, S, P]      logit s = log(m / (1 - m)) of the mass m outside the top-K
    train/view          uint8   [E, S, P, B]   the quantised view parameters (`pipeline.views.encode_params`)
    train/digest        uint32  [E, S, P]      24-bit digest of the teacher's uint8 view; 0 = no view here
    train/tail_ids      uint16|int32 [E, S, P, T]  with cache.tail_samples = T: classes drawn from the tail
    train/tail_logprobs float16 [E, S, P, T]   (the teacher's distribution outside the top-K), and their log-probs
    train/labels        int32   [S, P]         ground-truth labels (written by the epoch-0 units)
    train/done          uint8   [E, G]         1 once unit (epoch, shard group) is durable
    val/topk_logratios, val/topk_ids, val/leftover_logit, val/digest [Sv, Pv, ...], val/labels, val/done [Gv]

Why this form: for a confident teacher the leftover `1 - sum_i p_i` is a difference of nearly equal numbers,
which float16 logits (v1) destroyed. The leftover's logit in fixed point (`encode_answers`: steps of 1/1024)
keeps both m and 1 - m to a relative 4.9e-4, whether the teacher is confident (m tiny) or flat (m near 1); the
top-K are stored as float16 ratios to rank 1, and rank 1 follows from them and 1 - m (`decode_answers`), so no
stored number is implied by the others (v2 stored all K log-probabilities: one more number a view).
tests/test_cache_format.py proves the bounds against float64. Readers get decoded values: `topk_logprobs`
float32 [.., K], `log_leftover` float32 (-inf for "nothing left") and `view` float32 [.., N_PARAMS];
`write_unit` takes the same.

A work unit is (epoch, group of `shards_per_unit` consecutive shards) and owns whole chunks of every array
(chunk shape (1, shards_per_unit, P, ...)), so exactly one writer ever touches a chunk: zarr-python loses
data on concurrent partial writes of one chunk (zarr-python issue #3682). A unit's `done` flag lives in a
chunk of its own and is written only after the unit's data chunks are written and fsynced; readers trust
only done units, and a restart redoes every unit that is not done. Every chunk carries a crc32c checksum.

Reads go through `read_slab` (`SlabReader` for many shards), `read_labels` and `done_units`, which never hand
out fill values or garbage: a done unit whose chunk is missing, or a chunk whose checksum fails, raises
CacheError naming the array, the chunk, the unit and the fix. Units are written with `write_empty_chunks`, so
every done unit has every chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec
from zarr.core.sync import sync

from pipeline import views
from pipeline.manifest import Manifest, ManifestError
from pipeline.reader import ShardList

SCHEMA = "distill-cache/3"
SPLITS = ("train", "val")
LOGIT_TOP = 16.0  # leftover_logit holds rint((LOGIT_TOP - s) * LOGIT_SCALE), s = log(m / (1 - m)) of the leftover m
LOGIT_SCALE = 1024
LOGIT_NONE = 65535  # ... and this code means no mass outside the top-K (K = C, or m < e**-48)


def encode_answers(topk_logprobs: np.ndarray, log_leftover: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's answers as stored: (topk_logratios float16 [..., K-1], leftover_logit uint16 [...]).
    `topk_logprobs` [..., K] has rank 1 first; `log_leftover` is log m (-inf for none)."""
    lp = np.asarray(topk_logprobs, np.float64)
    log_m = np.asarray(log_leftover, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = log_m - np.log(-np.expm1(log_m))  # log m - log(1 - m), both ends exact
        code = np.rint((LOGIT_TOP - logit) * LOGIT_SCALE)
    code = np.where(np.isnan(code) | (code >= LOGIT_NONE), LOGIT_NONE, np.clip(code, 0, None))
    return (lp[..., 1:] - lp[..., :1]).astype(np.float16), code.astype(np.uint16)


def decode_answers(topk_logratios: np.ndarray, leftover_logit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored form -> (topk_logprobs float32 [..., K], log_leftover float32 [...], -inf for none): with s the
    leftover's logit, log m = -log(1 + e**-s), log(1 - m) = -log(1 + e**s), and rank 1's log-prob is
    log(1 - m) - log(1 + sum_i e**r_i) over the stored ratios r_i of ranks 2..K."""
    ratios = np.asarray(topk_logratios).astype(np.float64)
    code = np.asarray(leftover_logit)
    logit = LOGIT_TOP - code.astype(np.float64) / LOGIT_SCALE
    none = code == LOGIT_NONE
    log_m = np.where(none, -np.inf, -np.logaddexp(0.0, -logit))
    log_top = np.where(none, 0.0, -np.logaddexp(0.0, logit))  # log of the top-K mass 1 - m
    first = log_top - np.log1p(np.exp(ratios).sum(-1))
    topk = np.concatenate([first[..., None], first[..., None] + ratios], axis=-1)
    return topk.astype(np.float32), log_m.astype(np.float32)


# the fields readers and writers hand over that are stored in another form: field -> the arrays it is stored in
ANSWER_ARRAYS = ("topk_logratios", "leftover_logit")
STORED_AS = {"topk_logprobs": ANSWER_ARRAYS, "log_leftover": ANSWER_ARRAYS}
# fields stored in an array of their own name with a codec: name -> (encode, decode)
CODECS = {"view": (views.encode_params, views.decode_params)}


def _stored(data: dict[str, np.ndarray], grp: zarr.Group) -> dict[str, np.ndarray]:
    """What `write_unit` is handed as the arrays it writes: the teacher's answers either decoded
    (`topk_logprobs`, `log_leftover`: encoded here) or already in their stored form (stage 1, which computes it
    from the full logits: `losses.sparse_teacher_answers(stored=True)`)."""
    out = {name: (CODECS[name][0](values) if name in CODECS else values)
           for name, values in data.items() if name not in STORED_AS}
    if "topk_logprobs" in data:
        out["topk_logratios"], out["leftover_logit"] = encode_answers(data["topk_logprobs"], data["log_leftover"])
    if "topk_logratios" in out and "topk_logratios" not in grp:  # K = 1 stores no ratios
        del out["topk_logratios"]
    if "leftover_logit" in out:
        out["leftover_logit"] = np.asarray(out["leftover_logit"]).astype(np.uint16)
    return out


class CacheError(RuntimeError):
    """The cache is missing, incomplete, corrupt or does not match the run spec; the message says which."""


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """Shapes of one split. `epochs` is None for val (its views are the teacher's eval transform)."""

    shards: int
    positions: int
    top_k: int
    num_classes: int
    n_params: int
    shards_per_unit: int
    epochs: int | None
    tail_samples: int = 0  # T classes per view drawn from the teacher's tail (`losses.sparse_teacher_answers`)

    @property
    def groups(self) -> int:
        return -(-self.shards // self.shards_per_unit)

    @property
    def id_dtype(self) -> str:
        return "uint16" if self.num_classes <= 65535 else "int32"

    def group_shards(self, group: int) -> range:
        return range(group * self.shards_per_unit, min((group + 1) * self.shards_per_unit, self.shards))


def _compressors(name: str, dtype: str, column: int) -> list:
    # zstd inside blosc, then a crc32c so a flipped byte is caught on read. Chosen by measurement (`make bench`,
    # BENCHMARKS.md storage section): bit-shuffle for the class ids (their high bits are zero: smaller and faster
    # to write than byte-shuffle), byte-shuffle for the rest; zstd level 5 (level 9 writes 10-30x slower). The
    # view records (45 B a view, byte columns after the transpose) take zstd level 9 inside blosc with one blosc
    # block per byte column (`column` bytes: the unit's views), so each column gets its own entropy tables: 8%
    # smaller than one zstd stream at level 19 over all columns, whose tables mix the fields
    if name == "view":
        return [BloscCodec(cname="zstd", clevel=9, shuffle="noshuffle", typesize=1, blocksize=column), Crc32cCodec()]
    shuffle = "bitshuffle" if name in ("topk_ids", "tail_ids") else "shuffle"
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=np.dtype(dtype).itemsize), Crc32cCodec()]


def _filters(name: str, ndim: int) -> list:
    # the view records are laid out byte-column-major inside a chunk (the byte axis first) so each field's bytes,
    # over all the unit's views, lie together (a byte shuffle per field): smaller and faster to write
    # (BENCHMARKS.md); with the byte axis only swapped past the positions, each shard's columns would alternate
    # and zstd's entropy tables would mix fields (0.9 B a view more at ImageNet's units); lossless
    return [TransposeCodec(order=(ndim - 1, *range(ndim - 1)))] if name == "view" else []


def _array_specs(layout: CacheLayout) -> dict[str, tuple[tuple, tuple, str]]:
    """name -> (shape, chunks, dtype) for one split."""
    e = () if layout.epochs is None else (layout.epochs,)
    e1 = () if layout.epochs is None else (1,)
    s, p, k, u = layout.shards, layout.positions, layout.top_k, layout.shards_per_unit
    specs = {
        **({"topk_logratios": (e + (s, p, k - 1), e1 + (u, p, k - 1), "float16")} if k > 1 else {}),
        "topk_ids": (e + (s, p, k), e1 + (u, p, k), layout.id_dtype),
        "leftover_logit": (e + (s, p), e1 + (u, p), "uint16"),
        "digest": (e + (s, p), e1 + (u, p), "uint32"),
        "labels": ((s, p), (u, p), "int32"),
        **({"tail_ids": (e + (s, p, layout.tail_samples), e1 + (u, p, layout.tail_samples), layout.id_dtype),
            "tail_logprobs": (e + (s, p, layout.tail_samples), e1 + (u, p, layout.tail_samples), "float16")}
           if layout.tail_samples else {}),
        "done": (e + (layout.groups,), e1 + (1,), "uint8"),
    }
    if layout.epochs is not None:
        specs["view"] = (e + (s, p, views.PARAM_BYTES), e1 + (u, p, views.PARAM_BYTES), "uint8")
    return specs


def create(path: str, layouts: dict[str, CacheLayout], attrs: dict[str, Any]) -> zarr.Group:
    """Create a new cache, or open an existing one with the same fingerprint and grow its epoch axis to
    `layouts['train'].epochs` (appending epochs never touches the old ones).

    Never overwrites: arrays that already exist (a creation killed half-way, or an independent job that
    created them first) are checked against the layout and kept; the attributes are written last."""
    root = zarr.open_group(store_url(path), mode="a")
    if SCHEMA_KEY in root.attrs:
        _check_schema(root, path)
        check_fingerprint(root, attrs)
        want = layouts["train"].epochs
        grown = False
        for name, arr in root["train"].arrays():
            # each array on its own: an extension killed half-way leaves some arrays grown and some not
            if name != "labels" and arr.shape[0] < want:
                arr.resize((want,) + arr.shape[1:])
                grown = True
        if grown:
            root.attrs["epochs"] = want
        return root
    for split, layout in layouts.items():
        grp = root.require_group(split)
        for name, (shape, chunks, dtype) in _array_specs(layout).items():
            if name in grp:
                arr = grp[name]
                if arr.shape != shape or arr.chunks != chunks or arr.dtype != np.dtype(dtype):
                    raise CacheError(f"{path}/{split}/{name} exists with shape {arr.shape}, chunks {arr.chunks}, "
                                     f"{arr.dtype}; this run needs {shape}, {chunks}, {dtype}: use a new cache.path")
                continue
            try:
                grp.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                 filters=_filters(name, len(shape)),
                                 compressors=_compressors(name, dtype, math.prod(chunks[:-1])))
            except zarr.errors.ContainsArrayError:
                pass  # an independent job created it a moment ago
    root.attrs.update({**attrs, SCHEMA_KEY: SCHEMA, "epochs": layouts["train"].epochs})
    return root


SCHEMA_KEY = "schema"

# attributes that define what the cached numbers mean; a student that disagrees on any of them must stop
FINGERPRINT_FIELDS = ("seed", "top_k", "recipe", "teacher", "classes", "shards", "teacher_size")
FINGERPRINT_KEYS = {  # the manifest keys that decide each fingerprint field
    "seed": "views.seed",
    "top_k": "cache.top_k",
    "recipe": "views",
    "teacher": "teacher.model / teacher.model_args / teacher.checkpoint / teacher.img_size",
    "classes": "the class map of data.train",
    "shards": "data.train / data.val",
    "teacher_size": "teacher.img_size",
}
FILL_FIX = "Point cache.path at a new directory, or set {key} back to the cache's value."


def fingerprint(attrs: dict[str, Any]) -> str:
    blob = json.dumps({k: attrs.get(k) for k in FINGERPRINT_FIELDS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_fingerprint(root: zarr.Group, expected: dict[str, Any], name: str | None = None,
                      fix: str = FILL_FIX) -> None:
    """Raise naming the first field on which the cache and the run spec disagree (and the place inside it),
    with both values there and `fix` ({field}, {key}: the manifest keys to change). Fields `expected` leaves
    out are not compared."""
    have = dict(root.attrs)
    for field in FINGERPRINT_FIELDS:
        found = field in expected and first_difference(_jsonable(have.get(field)), _jsonable(expected[field]), field)
        if found:
            where, a, b = found
            raise CacheError(
                f"cache {name or root.store} was built with a different {field}: at {where} the cache has "
                f"{_short(a)}, the run spec has {_short(b)}. " + fix.format(field=field, key=FINGERPRINT_KEYS[field]))


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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------- attributes


VERSIONED = ("torch", "torchvision", "timm", "pillow", "numpy")


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in VERSIONED}


def cache_attrs(m: Manifest, train: ShardList, val: ShardList, teacher_identity: dict) -> dict:
    """The self-describing attributes; the fingerprint covers what the cached numbers mean."""
    attrs = {
        "seed": m.views.seed,
        "top_k": m.cache.top_k,
        "recipe": views.recipe(m.views),
        "teacher": teacher_identity,
        "classes": list(train.classes),
        "shards": {name: [[Path(s.url).name, s.samples, s.sha256] for s in lst.shards]
                   for name, lst in (("train", train), ("val", val))},
        "teacher_size": m.teacher.img_size,
        "shards_per_unit": m.cache.shards_per_unit,
        "tail_samples": m.cache.tail_samples,
        "param_fields": list(views.PARAM_FIELDS),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    attrs["fingerprint"] = fingerprint(attrs)
    return attrs


def layouts_for(m: Manifest, train: ShardList, val: ShardList) -> dict[str, CacheLayout]:
    num_classes = len(train.classes)
    if m.cache.tail_samples < 0 or (m.cache.tail_samples and m.cache.top_k == num_classes):
        raise ManifestError(f"cache.tail_samples={m.cache.tail_samples} must be >= 0, and 0 when cache.top_k equals "
                            f"the {num_classes} classes (there is no tail to sample)")
    if m.cache.top_k > num_classes:
        raise ManifestError(f"cache.top_k={m.cache.top_k} exceeds the {num_classes} classes of {m.data.train}: "
                            f"set cache.top_k <= {num_classes}")
    common = dict(top_k=m.cache.top_k, num_classes=num_classes, shards_per_unit=m.cache.shards_per_unit)
    return {
        "train": CacheLayout(shards=len(train.shards), positions=max(s.samples for s in train.shards),
                             n_params=views.N_PARAMS, epochs=m.cache.epochs,
                             tail_samples=m.cache.tail_samples, **common),
        "val": CacheLayout(shards=len(val.shards), positions=max(s.samples for s in val.shards),
                           n_params=0, epochs=None, **common),
    }


def open_cache(path: str, mode: str = "r") -> zarr.Group:
    """Open an existing cache; a clear error if there is none."""
    try:
        root = zarr.open_group(store_url(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise CacheError(f"no teacher cache at {path}: run `make teacher-cache` first (or pass CACHE=...)") from e
    _check_schema(root, path)
    return root


def _check_schema(root: zarr.Group, path: str) -> None:
    found = root.attrs.get(SCHEMA_KEY)
    if found == "distill-cache/1":
        raise CacheError(
            f"{path} is a teacher cache of schema distill-cache/1, which stored float16 raw logits: for a confident "
            f"teacher their leftover mass is lost, so this version reads only {SCHEMA}. Rebuild it: move or delete "
            f"{path} and run `make teacher-cache` (`distill teacher-cache --manifest M`)")
    if found == "distill-cache/2":
        raise CacheError(
            f"{path} is a teacher cache of schema distill-cache/2 (log-probabilities of all K ranks, the log leftover, "
            f"48-byte view records), which this version does not read: it reads only {SCHEMA}. Rebuild it: move or "
            f"delete {path} and run `make teacher-cache` (`distill teacher-cache --manifest M`)")
    if found != SCHEMA:
        raise CacheError(f"{path} is not a teacher cache of schema {SCHEMA} (found {found!r}): point cache.path at "
                         f"a cache made by `make teacher-cache`")


def layout_of(root: zarr.Group, split: str) -> CacheLayout:
    grp = root[split]
    logits = grp["topk_ids"]
    has_epochs = split == "train"
    shape = logits.shape[1:] if has_epochs else logits.shape
    return CacheLayout(
        shards=shape[0], positions=shape[1], top_k=shape[2], num_classes=len(root.attrs["classes"]),
        n_params=views.N_PARAMS if has_epochs else 0,
        shards_per_unit=logits.chunks[1] if has_epochs else logits.chunks[0],
        epochs=logits.shape[0] if has_epochs else None,
        tail_samples=grp["tail_ids"].shape[-1] if "tail_ids" in grp else 0,
    )


def done_units(root: zarr.Group, split: str = "train") -> np.ndarray:
    """Boolean done flags: [E, G] for train, [G] for val."""
    return _read(root, split, root[split]["done"], ...) == 1


def unit_region(layout: CacheLayout, epoch: int | None, group: int) -> tuple:
    shards = layout.group_shards(group)
    sl = slice(shards.start, shards.stop)
    return (sl,) if epoch is None else (epoch, sl)


def write_unit(root: zarr.Group, split: str, epoch: int | None, group: int, data: dict[str, np.ndarray]) -> None:
    """Write one unit's arrays (each shaped [shards in group, P, ...], decoded values: `CODECS`), make them
    durable, then mark it done.

    `labels` is written only by the epoch-0 unit (or the val unit), so its chunks also have one writer.
    Chunks are written even when they hold only the fill value, so a done unit's chunks all exist. A failed
    write (disk full, a store error) leaves the unit not done and raises CacheError saying so."""
    grp = root[split]
    layout = layout_of(root, split)
    region = unit_region(layout, epoch, group)
    data = _stored(data, grp)
    try:
        for name, values in data.items():
            arr = grp[name].with_config({"write_empty_chunks": True})
            if name == "labels":
                if epoch in (None, 0):
                    arr[region[-1]] = values
                continue
            arr[region] = values
        _fsync_chunks(root, split, epoch, group, list(data))
        done_at = (group,) if epoch is None else (epoch, group)
        grp["done"][done_at] = 1
        _fsync_chunks(root, split, epoch, group, ["done"])
    except OSError as e:
        raise CacheError(
            f"cache {root.store}: writing {_unit_text(layout, split, epoch, group)} failed: {e}. The unit is not "
            f"marked complete and the units completed before it are kept: free space on the cache's filesystem "
            f"(or fix the store) and resume `make teacher-cache`, which redoes this unit and the ones after it"
        ) from e


def _fsync_chunks(root: zarr.Group, split: str, epoch: int | None, group: int, names: list[str]) -> None:
    """fsync the unit's chunk files where the store is a local directory (object stores are durable on PUT)."""
    local_root = getattr(root.store, "root", None)
    if local_root is None:
        return
    for name in names:
        if name == "labels" and epoch not in (None, 0):
            continue
        if name == "done":
            key = [str(group)] if epoch is None else [str(epoch), str(group)]
        elif name == "labels":
            key = [str(group), "0"]
        else:
            nd = root[split][name].ndim
            key = ([] if epoch is None else [str(epoch)]) + [str(group)] + ["0"] * (nd - (1 if epoch is None else 2))
        chunk = Path(local_root, split, name, "c", *key)
        if chunk.exists():
            fd = os.open(chunk, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _unit_text(layout: CacheLayout, split: str, epoch: int | None, group: int) -> str:
    where = f"epoch {epoch}, " if epoch is not None else ""
    return f"{split} unit ({where}shard group {group}, shards {list(layout.group_shards(group))})"


def _require_done(root, split, done: zarr.Array, layout: CacheLayout, epoch: int | None, group: int) -> None:
    if _read(root, split, done, (group,) if epoch is None else (epoch, group)) != 1:
        raise CacheError(
            f"cache {root.store}: {_unit_text(layout, split, epoch, group)} is not complete: resume "
            f"`make teacher-cache` to finish it"
        )


SLAB_FIELDS = ("topk_logprobs", "topk_ids", "log_leftover", "digest", "view")
TAIL_FIELDS = ("tail_ids", "tail_logprobs")  # only in caches made with cache.tail_samples > 0


class SlabReader:
    """Shards' cached answers ([P, ...] per field) from one split, for a reader of many shards (the student's
    data path): the arrays are opened once, each unit's done flag and chunks are checked once, and the chunks
    of the unit read last stay decoded, so consecutive shards of one unit decode them once (a chunk holds all
    `shards_per_unit` shards of its unit). Refuses what `read_slab` refuses, with the same errors in the same
    order: units that are not done, done units whose chunks are missing, chunks that fail their checksum.

    A unit's checks and decoding go to the store together, in one round trip, the codecs running side by side;
    what comes back is judged in read_slab's order, so nothing read from a unit that is not done or not whole is
    handed out. A unit seen done stays trusted for the reader's life (units are never undone while a cache is
    read); one not done is looked up again on the next read."""

    def __init__(self, root: zarr.Group, split: str):
        self.root, self.split = root, split
        self.arrays = dict(root[split].arrays())
        self.layout = layout_of(root, split)
        self._done: set[tuple[int | None, int]] = set()
        self._present: set[tuple[str, tuple[int, ...]]] = set()  # chunks (name, coords) seen in the store
        self._unit: tuple[int | None, int] | None = None  # the (epoch, group) whose chunks `_decoded` holds
        self._decoded: dict[str, np.ndarray] = {}  # field -> [shards of the unit, P, ...]

    def read(self, epoch: int | None, shard: int,
             fields: tuple[str, ...] = SLAB_FIELDS + TAIL_FIELDS) -> dict[str, np.ndarray]:
        """One shard's slab: `read_slab(root, split, epoch, shard, fields)`; fields the split lacks are left out."""
        group = shard // self.layout.shards_per_unit
        fields = tuple(name for name in fields if name in self.arrays or name in STORED_AS)
        stored = [array for name in fields for array in STORED_AS.get(name, (name,)) if array in self.arrays]
        unit = self._load(epoch, group, tuple(dict.fromkeys(stored)))
        row = shard - self.layout.group_shards(group).start
        out = {name: CODECS[name][1](unit[name][row]) if name in CODECS else unit[name][row].copy()
               for name in fields if name not in STORED_AS}
        if any(name in STORED_AS for name in fields):
            ratios = unit["topk_logratios"][row] if "topk_logratios" in unit else np.zeros((self.layout.positions, 0), np.float16)
            topk, log_m = decode_answers(ratios, unit["leftover_logit"][row])
            out |= {name: value for name, value in (("topk_logprobs", topk), ("log_leftover", log_m)) if name in fields}
        return {name: out[name] for name in fields}

    def _load(self, epoch: int | None, group: int, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The unit's chunks of `fields` ([shards of the unit, P, ...] each), checked first."""
        if self._unit != (epoch, group):
            self._unit, self._decoded = (epoch, group), {}
        shards = self.layout.group_shards(group)
        rows = slice(shards.start, shards.stop)
        todo = {name: rows if (epoch is None or name == "labels") else (epoch, rows)
                for name in fields if name not in self._decoded}
        check_done = (epoch, group) not in self._done
        unseen = [chunk for chunk in unit_chunks(self.arrays, epoch, group, fields) if chunk not in self._present]

        async def fetch():
            done = self.arrays["done"].async_array
            return await asyncio.gather(
                *([done.getitem((group,) if epoch is None else (epoch, group))] if check_done else []),
                *(self.root.store.exists(_chunk_key(self.arrays[name], coords)) for name, coords in unseen),
                *(self.arrays[name].async_array.getitem(at) for name, at in todo.items()),
                return_exceptions=True)

        results = sync(fetch()) if check_done or unseen or todo else []
        if check_done:
            flag = results.pop(0)
            if isinstance(flag, BaseException) or flag != 1:  # read it again: names a bad flag chunk, or not done
                _require_done(self.root, self.split, self.arrays["done"], self.layout, epoch, group)
            self._done.add((epoch, group))
        self._check_present(epoch, group, unseen, results[:len(unseen)])
        if "labels" in fields and epoch not in (None, 0):  # train labels come from the epoch-0 unit
            if (0, group) not in self._done:
                _require_done(self.root, self.split, self.arrays["done"], self.layout, 0, group)
                self._done.add((0, group))
            labels = [chunk for chunk in unit_chunks(self.arrays, 0, group, ("labels",)) if chunk not in self._present]
            if labels:
                self._check_present(0, group, labels, sync(_exist(self.root, self.arrays, labels)))
        decoded = results[len(unseen):]
        if any(isinstance(value, BaseException) for value in decoded):
            # a chunk that does not decode: read field by field, so the first bad one is named
            decoded = [_read(self.root, self.split, self.arrays[name], at) for name, at in todo.items()]
        self._decoded.update(zip(todo, decoded))
        return self._decoded

    def _check_present(self, epoch: int | None, group: int, chunks: list, present: list) -> None:
        """A done unit's chunks must exist: zarr would read a missing chunk as its fill value (zeros)."""
        for answer in present:
            if isinstance(answer, BaseException):
                raise answer
        missing = [chunk for chunk, there in zip(chunks, present) if not there]
        if missing:
            raise missing_chunk_error(self.root, self.split, self.arrays, self.layout, epoch, group, *missing[0])
        self._present.update(chunks)


def read_slab(root: zarr.Group, split: str, epoch: int | None, shard: int,
              fields: tuple[str, ...] = SLAB_FIELDS + TAIL_FIELDS) -> dict[str, np.ndarray]:
    """One contiguous read of a shard's cached answers ([P, ...] per field). Refuses units that are not done,
    and done units whose chunks are missing or fail their checksum. Readers of many shards keep a
    `SlabReader` instead."""
    return SlabReader(root, split).read(epoch, shard, fields)


def read_labels(root: zarr.Group, split: str, damaged: list[str] | None = None) -> np.ndarray:
    """The ground-truth labels [S, P] of a split, -1 where there is no sample and in shard groups whose
    labels are not written yet (their epoch-0 / val unit is not done): never the fill value 0.

    A damaged labels chunk raises CacheError; when `damaged` is a list, its group stays -1 and the error
    text is appended there instead."""
    arrays = dict(root[split].arrays())
    layout = layout_of(root, split)
    done = _read(root, split, arrays["done"], ...) == 1
    labels = np.full((layout.shards, layout.positions), -1, np.int32)
    for group in map(int, np.flatnonzero(done[0] if split == "train" else done)):
        shards = layout.group_shards(group)
        try:
            _require_chunks(root, split, arrays, layout, 0 if split == "train" else None, group, ("labels",))
            labels[shards.start:shards.stop] = _read(root, split, arrays["labels"], slice(shards.start, shards.stop))
        except CacheError as e:
            if damaged is None:
                raise
            damaged.append(str(e))
    return labels


# --------------------------------------------------------------------------------------------- chunk checks


def unit_chunks(arrays: dict[str, zarr.Array], epoch: int | None, group: int,
                names: tuple[str, ...] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(array name, chunk coordinates) of every chunk a unit writes (labels: only the epoch-0 unit), given
    the split's arrays (`dict(root[split].arrays())`)."""
    out = []
    for name in names or sorted(arrays):
        if name == "labels":
            if epoch in (None, 0):
                out.append((name, (group, 0)))
            continue
        lead = (group,) if epoch is None else (epoch, group)
        out.append((name, lead + (0,) * (arrays[name].ndim - len(lead))))
    return out


def _chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def chunk_location(root: zarr.Group, arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """A chunk's file (local cache) or store key, for messages."""
    local_root = getattr(root.store, "root", None)
    key = _chunk_key(arr, coords)
    return str(Path(local_root, key)) if local_root is not None else f"{root.store}/{key}"


def _repair_hint(root: zarr.Group, split: str, done: zarr.Array, epoch: int | None, group: int) -> str:
    flag = chunk_location(root, done, (group,) if epoch is None else (epoch, group))
    return (f"restore the cache from a copy, or delete {flag} (the unit's done flag) and resume "
            f"`make teacher-cache` to recompute the unit")


async def _exist(root: zarr.Group, arrays: dict[str, zarr.Array], chunks: list[tuple[str, tuple[int, ...]]]) -> list:
    return await asyncio.gather(*(root.store.exists(_chunk_key(arrays[n], c)) for n, c in chunks))


def missing_chunks(root: zarr.Group, arrays: dict[str, zarr.Array],
                   chunks: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """The chunks of `chunks` absent from the store (checked concurrently, in one round trip)."""
    return [chunk for chunk, present in zip(chunks, sync(_exist(root, arrays, chunks))) if not present]


def missing_chunk_error(root: zarr.Group, split: str, arrays: dict[str, zarr.Array], layout: CacheLayout,
                        epoch: int | None, group: int, name: str, coords: tuple[int, ...]) -> CacheError:
    return CacheError(
        f"cache {root.store}: {split}/{name} chunk {coords} ({chunk_location(root, arrays[name], coords)}) of "
        f"{_unit_text(layout, split, epoch, group)}, which is marked complete, is missing; zarr would read it "
        f"as zeros. The cache was damaged (a file deleted or lost in a copy): "
        f"{_repair_hint(root, split, arrays['done'], epoch, group)}")


def _require_chunks(root, split, arrays, layout, epoch, group, names) -> None:
    """A done unit's chunks must exist: zarr would read a missing chunk as its fill value (zeros)."""
    missing = missing_chunks(root, arrays, unit_chunks(arrays, epoch, group, names))
    if missing:
        raise missing_chunk_error(root, split, arrays, layout, epoch, group, *missing[0])


def _covering_chunks(arr: zarr.Array, selection) -> list[tuple[int, ...]]:
    """Chunk coordinates a basic selection (ints, slices, one Ellipsis) touches."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    if Ellipsis in sel:
        at = sel.index(Ellipsis)
        sel = sel[:at] + (slice(None),) * (arr.ndim - len(sel) + 1) + sel[at + 1:]
    sel = sel + (slice(None),) * (arr.ndim - len(sel))
    axes = []
    for index, size, chunk in zip(sel, arr.shape, arr.chunks):
        if isinstance(index, slice):
            start, stop, _ = index.indices(size)
            axes.append(range(start // chunk, -(-stop // chunk)))
        else:
            axes.append([int(index) % size // chunk])
    return list(itertools.product(*axes))


def check_chunk(root: zarr.Group, split: str, arr: zarr.Array, coords: tuple[int, ...]) -> None:
    """Decode one chunk; a failure (checksum, codec) raises CacheError naming array, chunk and unit."""
    try:
        arr.get_block_selection(coords)
    except Exception as e:  # the codecs raise ValueError (crc32c), RuntimeError (blosc), ...
        name = arr.basename
        # the unit that writes the chunk: val (group, ...), train labels (group, 0) from epoch 0, train (epoch, group, ...)
        epoch, group = (None, coords[0]) if split == "val" else (0, coords[0]) if name == "labels" else coords[:2]
        layout = layout_of(root, split)
        owner = _unit_text(layout, split, epoch, group)
        if name == "labels":
            owner = f"the labels of shard group {group}, written by {owner}"
        raise CacheError(
            f"cache {root.store}: {split}/{name} chunk {coords} ({chunk_location(root, arr, coords)}) is corrupt "
            f"({e}); it belongs to {owner}. Nothing was read from it: "
            f"{_repair_hint(root, split, root[split]['done'], epoch, group)}") from e


def _read(root: zarr.Group, split: str, arr: zarr.Array, selection) -> np.ndarray:
    """`arr[selection]`; a chunk that does not decode raises CacheError naming it."""
    try:
        return arr[selection]
    except Exception:
        for coords in _covering_chunks(arr, selection):
            check_chunk(root, split, arr, coords)
        raise


def store_url(path: str) -> str:
    """What zarr opens: a local directory for a plain path or file:// URL (zarr's LocalStore, whose chunk files
    are fsynced), else the URL (zarr's FsspecStore; storage options come from `storage.configure`)."""
    local = local_dir(path)
    return str(local) if local is not None else path


def local_dir(path: str) -> Path | None:
    """The directory of a cache on the local filesystem (plain path or file:// URL); None for a remote URL."""
    if "://" in path and not path.startswith("file://"):
        return None
    return Path(path.removeprefix("file://"))


def disk_usage(path: str) -> int | None:
    """Bytes of a cache on disk, or on its object store (None where the store cannot say)."""
    root = local_dir(path)
    if root is not None:
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    from pipeline import storage

    fs, prefix = storage.filesystem(path)
    try:
        return int(fs.du(prefix, total=True))
    except (NotImplementedError, OSError):
        return None


def cached_views(path: str) -> int:
    """Views held by complete units, train and val together."""
    root = open_cache(path)
    total = 0
    for split in SPLITS:
        counts = [n for _, n, _ in root.attrs["shards"][split]]
        layout = layout_of(root, split)
        per_group = np.array([sum(counts[s] for s in layout.group_shards(g)) for g in range(layout.groups)])
        total += int((done_units(root, split) * per_group).sum())
    return total
