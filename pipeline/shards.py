"""Writing WebDataset shards and the shard lists that every stage reads.

A shard list (`shardlist.json`) is the contract between the shards and the stages:

    {"format": "distill-shardlist/1", "classes": ["0", ..., "9"],
     "shards": [{"url": "train-000000.tar", "samples": 300, "sha256": "<hex>"}, ...]}

`url` is relative to the list's own directory, absolute, or a URL webdataset's `gopen` opens
(`pipe:...`, `http://...`). `classes[i]` names class id i. Shards written here are reproducible: fixed
mtime, owner and mode, members of a sample in sorted order, so a rebuild gives identical bytes.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import numpy as np
from PIL import Image
from tqdm import tqdm
from webdataset import TarWriter
from webdataset.shardlists import expand_urls

from pipeline import storage
from pipeline.reader import IMAGE_SUFFIXES, ShardEntry, ShardError, ShardList, scan_shard

SHARDLIST_FORMAT = "distill-shardlist/1"
SHARDLIST_NAME = "shardlist.json"
CLASS_MAP_NAME = "class_map.json"
DIGITS_VAL_SIZE = 300
DIGITS_SIZE = 32  # the 8x8 digits are upscaled 4x with nearest-neighbour, so every pixel stays a source value


# --------------------------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _tar_bytes(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=0, user="distill", group="distill", mode=0o444) as writer:
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def _write_shards(out_dir: Path, prefix: str, samples: Iterable[dict], shard_size: int,
                  classes: list[str]) -> Path:
    """Write `samples` ({"__key__", "cls", <image suffix>}) as tars of `shard_size` samples plus their
    shard list; earlier `<prefix>-*.tar` files in `out_dir` that this run did not write are removed."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SHARDLIST_NAME).unlink(missing_ok=True)  # never leave an old list over half-rewritten shards
    entries, samples = [], iter(samples)
    while chunk := list(itertools.islice(samples, shard_size)):
        name = f"{prefix}-{len(entries):06d}.tar"
        data = _tar_bytes(chunk)
        _write_atomic(out_dir / name, data)
        entries.append({"url": name, "samples": len(chunk), "sha256": hashlib.sha256(data).hexdigest()})
    written = {e["url"] for e in entries}
    for stale in out_dir.glob(f"{prefix}-*.tar"):
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", stale.name) and stale.name not in written:
            stale.unlink()
    path = out_dir / SHARDLIST_NAME
    _write_atomic(path, _json_bytes({"format": SHARDLIST_FORMAT, "classes": classes, "shards": entries}))
    return path


def _write_class_map(path: Path, classes: list[str]) -> None:
    _write_atomic(path, _json_bytes({"classes": classes}))


# --------------------------------------------------------------------------------------------- digits


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 RGB (N, 32, 32, 3) images (0..16 -> 0..255, nearest upscale)
    and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    scale = DIGITS_SIZE // gray.shape[1]
    gray = gray.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.repeat(gray[..., None], 3, axis=3), digits.target.astype(np.int64)


def digits_split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fixed stratified split: (train, val), val has DIGITS_VAL_SIZE samples."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=DIGITS_VAL_SIZE, stratify=labels, random_state=seed)


def write_digits(out_dir: str | Path, shard_size: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """Build the embedded digits set: out_dir/{train,val}/<split>-NNNNNN.tar + shardlist.json, and
    out_dir/class_map.json. Keys are `digitNNNN` (index in load_digits); images are PNG."""
    out_dir = Path(out_dir)
    images, labels = digits_arrays()
    classes = [str(c) for c in range(int(labels.max()) + 1)]

    def samples(indices):
        for i in indices:
            png = io.BytesIO()
            Image.fromarray(images[i]).save(png, format="PNG")
            yield {"__key__": f"digit{i:04d}", "cls": str(labels[i]).encode(), "png": png.getvalue()}

    train, val = digits_split(labels, seed)
    paths = tuple(_write_shards(out_dir / split, split, samples(idx), shard_size, classes)
                  for split, idx in (("train", train), ("val", val)))
    _write_class_map(out_dir / CLASS_MAP_NAME, classes)
    return paths


# --------------------------------------------------------------------------------------------- image folders


def _folder_key(relative: str) -> str:
    """A dot-free key from a file's path under the source root (webdataset cuts keys at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(relative)[0])


def write_imagefolder(src: str | Path, out: str | Path, shard_size: int = 1000, seed: int = 0,
                      classes: list[str] | None = None, progress: bool = False) -> Path:
    """Shard a torchvision ImageFolder tree (src/<class>/<image>): one global shuffle drawn from `seed`,
    image bytes copied unchanged under their own (lower-cased) extension, `cls` = class id. Writes
    out/shard-NNNNNN.tar, out/shardlist.json and out/class_map.json; returns the shard list's path.

    Class ids are the sorted folder names' order, or, with `classes` (a class map, e.g. ImageNet's 1000
    synsets for a tree holding some of them), each folder's index in that map. `progress`: a bar on a
    terminal (none in logs)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ShardError(f"source {src} is not a directory: pass --src an ImageFolder tree (src/<class>/<image>)")
    try:
        found, class_to_idx = find_classes(src)
        if classes is not None:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ShardError(f"source {src} has class folders that the class map does not name, e.g. "
                                 f"{unknown[0]!r}: pass the class map that lists them, or remove the folders")
            class_to_idx = {name: classes.index(name) for name in found}
        classes = list(classes) if classes is not None else found
        files = make_dataset(src, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise ShardError(f"source {src} is not an ImageFolder tree ({e}): lay it out as src/<class>/<image>, "
                         f"images as {'/'.join(IMAGE_SUFFIXES)}") from None
    unsupported = [p for p, _ in files if Path(p).suffix.lower().lstrip(".") not in IMAGE_SUFFIXES]
    if unsupported:
        raise ShardError(f"source {src} has {len(unsupported)} images in formats the shards do not carry, e.g. "
                         f"{unsupported[0]}: convert them to {'/'.join(IMAGE_SUFFIXES)}")
    keys, used = [], set()
    for path, _ in files:
        base = key = _folder_key(os.path.relpath(path, src))
        for n in itertools.count(1):
            if key not in used:
                break
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)

    def samples(order):
        for i in order:
            path, label = files[i]
            data = Path(path).read_bytes()
            try:
                Image.open(io.BytesIO(data)).close()  # reads the header only
            except Exception as e:
                raise ShardError(f"source image {path} does not open as an image ({e}): replace or delete it") from None
            yield {"__key__": keys[i], "cls": str(label).encode(), Path(path).suffix.lower().lstrip("."): data}

    order = np.random.default_rng(seed).permutation(len(files))
    bar = tqdm(samples(order), total=len(order), unit="image", desc="shards", disable=None if progress else True)
    path = _write_shards(out, "shard", bar, shard_size, classes)
    _write_class_map(out / CLASS_MAP_NAME, classes)
    return path


# --------------------------------------------------------------------------------------------- shard lists


def expand_shard_paths(patterns: Iterable[str]) -> list[str]:
    """Glob patterns (`data/*.tar`) and webdataset's brace ranges (`train-{000000..000009}.tar`) to paths."""
    paths = []
    for pattern in patterns:
        for expanded in expand_urls(pattern):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            if not matches:
                raise ShardError(f"no file matches {expanded!r}: check the pattern (quote it so the shell "
                                 f"does not expand it first)")
            paths += matches
    return paths


def build_shardlist(paths: Iterable[str | Path], out: str | Path | None = None,
                    classes: Iterable[str] | None = None) -> dict:
    """Scan shards made by any tool into a shard list: sample count and sha256 per shard. Classes are
    `classes` when given, else "0".."<max cls>". With `out` the list is written there, urls relative to it."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ShardError("no shards given: pass the shard files (or a glob) to list")
    if len(set(map(os.path.abspath, paths))) < len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise ShardError(f"shard {twice} is given twice: list each shard once")
    for path in paths:
        if not os.path.isfile(path):
            raise ShardError(f"shard {path} does not exist: check the path or the glob")
    scanned = build_shardlist_urls(paths, classes)
    base = os.path.dirname(os.path.abspath(out)) if out is not None else None
    shards = [{**e, "url": os.path.relpath(os.path.abspath(e["url"]), base) if base else os.path.abspath(e["url"])}
              for e in scanned["shards"]]
    shardlist = {**scanned, "shards": shards}
    if out is not None:
        _write_atomic(Path(out), _json_bytes(shardlist))
    return shardlist


# --------------------------------------------------------------------------------------------- class order


def class_order(labels: Iterable[int | None], num_classes: int) -> tuple[float, float, int]:
    """(share of neighbouring positions holding the same label, the share a shuffled shard drawn from the
    labels' overall class mix would give, the longest run of one label). Unlabelled positions break runs."""
    labels = np.array([-1 if x is None else x for x in labels], np.int64)
    if len(labels) < 2:
        return 0.0, 0.0, len(labels)
    same = (labels[1:] == labels[:-1]) & (labels[1:] >= 0)
    changes = np.flatnonzero(~same)
    longest = int(np.diff(np.concatenate([[-1], changes, [len(same)]])).max())
    share = np.bincount(labels[labels >= 0], minlength=num_classes) / max(1, int((labels >= 0).sum()))
    return float(same.mean()), float((share ** 2).sum()), longest


def class_order_warning(url: str, labels: Iterable[int | None], num_classes: int, window: int = 16) -> str | None:
    """A warning text when shard `url` looks written in class order: a run of one label at least a mix window
    long, and neighbours sharing a label far more often than a shuffled shard of `num_classes` equally
    common classes would (halfway from 1/num_classes to always). Mix partners come from the same few shard
    positions (`views.mix_window`), so such a shard pairs almost every image with its own class."""
    same, _, longest = class_order(labels, num_classes)
    shuffled = 1.0 / max(1, num_classes)
    if longest < window or same <= (1.0 + shuffled) / 2:
        return None
    return (f"shard {url} looks written in class order: {same:.0%} of neighbouring samples share a label (about "
            f"{shuffled:.0%} in a shuffled shard) and one label runs {longest} samples in a row. Mix partners are "
            f"drawn from a window of {window} neighbouring positions of the same shard, so most mixes would pair an "
            f"image with its own class. Reshuffle: write the shards from the image tree with "
            f"`make shards SRC=<ImageFolder dir>` (one global shuffle), or shuffle the samples when writing them")


def warn_if_class_ordered(urls: list[str], labels_per_shard: list[list[int | None]], num_classes: int,
                          window: int = 16) -> int:
    """Warn once (naming the first shard and the count) when shards look written in class order; returns
    how many do."""
    found = [w for url, labels in zip(urls, labels_per_shard)
             if (w := class_order_warning(url, labels, num_classes, window))]
    if found:
        more = f" ({len(found)} of {len(urls)} shards look like this)" if len(found) > 1 else ""
        warnings.warn(found[0] + more, stacklevel=2)
    return len(found)


def load_class_map(path: str | Path) -> list[str]:
    """Class names from a class map: {"classes": [...]} (as written here) or a plain JSON list."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"class map {path} cannot be read ({e}): pass a JSON file like {{\"classes\": [...]}}") from None
    classes = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ShardError(f"class map {path} has no list of class names: write it as {{\"classes\": [\"name0\", ...]}}")
    return classes


def _resolve(url: str, base: Path) -> str:
    return str(base / url) if urlparse(url).scheme == "" else url


def load_shardlist(path: str | Path) -> ShardList:
    """Read and check a shard list; urls come back resolved, and every local shard must exist."""
    path = Path(path)
    rebuild = "rebuild it with `make shards` (built-in data) or `make shardlist SHARDS=...`"
    if not path.is_file():
        raise ShardError(f"shard list {path} does not exist: {rebuild}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"shard list {path} is not valid JSON ({e}): {rebuild}") from None
    return parse_shardlist(data, str(path), path.parent, rebuild)


def parse_shardlist(data: Any, where: str, base: Path | None, rebuild: str) -> ShardList:
    """Check a shard list's content; relative urls are resolved against `base`."""
    if not isinstance(data, dict) or data.get("format") != SHARDLIST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ShardError(f"shard list {where} has format {found!r}, not {SHARDLIST_FORMAT!r}: {rebuild}")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ShardError(f"shard list {where}: `classes` must be a non-empty list of class names: {rebuild}")
    if not isinstance(data.get("shards"), list) or not data["shards"]:
        raise ShardError(f"shard list {where}: `shards` must be a non-empty list: {rebuild}")
    shards = []
    for i, entry in enumerate(data["shards"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("url"), str) and isinstance(entry.get("sha256"), str)
              and isinstance(entry.get("samples"), int) and not isinstance(entry["samples"], bool))
        if not ok or entry["samples"] < 1:
            raise ShardError(f"shard list {where}: shards[{i}] = {entry!r} needs a url, samples >= 1 and a sha256: {rebuild}")
        url = _resolve(entry["url"], base) if base is not None else entry["url"]
        if urlparse(url).scheme == "" and not os.path.isfile(url):
            raise ShardError(f"shard list {where} lists shard {url}, which does not exist: restore the shard, or "
                             f"rebuild the list with `make shardlist` so it lists only shards that exist")
        shards.append(ShardEntry(url, entry["samples"], entry["sha256"]))
    return ShardList(where, tuple(classes), tuple(shards))


# --------------------------------------------------------------------------------------------- data specs


def _is_shardlist_file(spec) -> bool:
    return isinstance(spec, str) and spec.endswith(".json") and not storage.is_remote(spec)


def data_shardlist(m, split: str) -> ShardList:
    """The shard list of `data.<split>` (train or val), whatever form the spec takes (see `pipeline.storage`):
    a shard-list JSON is read as it is; any other spec is scanned once (counts and sha256 in one streaming
    pass, or counts from timm's `_info.json` and the store's checksums) and the result is kept beside the
    cache, in `<cache.path>.shards/<split>.json`, for every later stage and run."""
    spec = getattr(m.data, split)
    storage.configure_manifest(m)
    if _is_shardlist_file(spec):
        return load_shardlist(spec)
    index = storage.index_path(m.cache.path, split)
    source = {"spec": spec, "class_map": m.data.class_map}
    known = storage.read_json(index, m.cache.storage_options)
    if isinstance(known, dict) and known.get("source") == source:
        return parse_shardlist(known, index, None, f"delete {index} to scan the shards again")
    if m.data.class_map:
        classes = load_class_map(m.data.class_map)
    elif split != "train":
        classes = list(data_shardlist(m, "train").classes)  # val uses the train split's class ids
    else:
        classes = None
    listing = scan_spec(spec, split, m.data.allow_pipe, classes)
    listing["source"] = source
    storage.write_json_atomic(index, listing, m.cache.storage_options)
    return parse_shardlist(listing, index, None, f"delete {index} to scan the shards again")


def scan_spec(spec, split: str, allow_pipe: bool = False, classes: list[str] | None = None) -> dict:
    """A shard list (as a dict, absolute urls) for a data spec: brace patterns, globs, lists, URLs, or a
    directory with timm's `_info.json` (its counts, with the store's checksums where it has them)."""
    try:
        info = None
        if isinstance(spec, str) and not spec.startswith("pipe:") and not glob.has_magic(spec) and "{" not in spec:
            info = storage.info_split(spec, split)
        if info is None:
            return build_shardlist_urls(storage.expand(spec, allow_pipe), classes)
    except storage.StorageError as e:
        raise ShardError(f"data.{split}: {e}") from None
    entries = []
    for url, samples in info:
        checksum = storage.store_checksum(url)
        if checksum is None:  # local files: one hashing pass, no tar parsing
            with storage.HashingReader(storage.open_stream(url)) as stream:
                stream.drain()
            checksum = stream.hexdigest()
        entries.append({"url": url, "samples": samples, "sha256": checksum})
    if classes is None:
        raise ShardError(f"data.{split}={spec!r} takes its counts from _info.json, which names no classes: set "
                         f"data.class_map to a JSON list of the class names (e.g. ImageNet's 1000 synsets)")
    return {"format": SHARDLIST_FORMAT, "classes": list(classes), "shards": entries}


def build_shardlist_urls(urls: list[str], classes: list[str] | None) -> dict:
    """`build_shardlist` for URLs of any store: one streaming pass per shard gives its count and sha256."""
    entries, top, shard_labels = [], None, []
    classes = None if classes is None else list(classes)
    for url in urls:
        digest = []
        scanned = scan_shard(url, digest)
        if not scanned:
            raise ShardError(f"shard {url} is empty (no samples): delete it or leave it out of the list")
        for key, label in scanned:
            if label is not None and label < 0:
                raise ShardError(f"shard {url}: sample {key!r} has label {label}; class ids are 0 or more: fix its "
                                 f"`cls` member")
            if label is not None and (top is None or label > top[0]):
                top = (label, url, key)
        entries.append({"url": url, "samples": len(scanned), "sha256": digest[0]})
        shard_labels.append([label for _, label in scanned])
    if classes is None:
        if top is None:
            raise ShardError(f"no sample in {urls[0]}... has an integer `cls` member: give the class names "
                             f"(--class-map, or data.class_map) or fix the shards")
        classes = [str(i) for i in range(top[0] + 1)]
    if top is not None and top[0] >= len(classes):
        raise ShardError(f"shard {top[1]}: sample {top[2]!r} has label {top[0]}, outside the {len(classes)} "
                         f"given classes: pass the full class map (--class-map, or data.class_map) or fix the "
                         f"`cls` member")
    warn_if_class_ordered(urls, shard_labels, len(classes))
    return {"format": SHARDLIST_FORMAT, "classes": list(classes), "shards": entries}
