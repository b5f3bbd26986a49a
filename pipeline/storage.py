"""Where data and caches live: WebDataset URLs and fsspec stores.

`data.train` / `data.val` accept what webdataset users write: a brace pattern or glob
(`shards/train-{000000..001023}.tar`, `s3://bucket/imagenet/train-*.tar`), a list of them, `file://`, `s3://`,
`gs://`, `http(s)://` (any fsspec protocol, `data.storage_options` passed through), `pipe:` commands (only with
`data.allow_pipe: true` or DISTILL_ALLOW_PIPE=1: they run a shell command), a directory holding timm's
`_info.json` (its split's `filenames` and `shard_lengths`), and the project's own shard-list JSON.

The sample counts and sha256 checksums the cache's layout needs are taken once, by one streaming scan of every
shard (or, for `_info.json`, counts from the file and checksums from the same scan), and kept beside the
cache in `<cache.path>.shards/<split>.json`; later stages and resumed runs read them from there. The file
records the data spec it was made from: another spec is scanned afresh.

Every read of a whole shard hashes the bytes as they stream past and compares the digest with the recorded
one at the end of the shard (`HashingReader`): a shard replaced since it was listed stops the run.
"""

from __future__ import annotations

import glob as local_glob
import hashlib
import json
import os
import posixpath
from typing import IO, Any

import fsspec
from webdataset.shardlists import expand_urls

PIPE_ENV = "DISTILL_ALLOW_PIPE"
INFO_NAMES = ("_info.json", "info.json")
VAL_SPLIT_NAMES = ("validation", "val", "test")


class StorageError(ValueError):
    """A URL, store or data spec is unusable; the message names it and the fix."""


# --------------------------------------------------------------------------------------------- URLs


def is_remote(url: str) -> bool:
    """True for a URL with a protocol other than file:// (s3://, gs://, http://, memory://, pipe:...)."""
    if url.startswith("pipe:"):
        return True
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    """A local path for a plain path or a file:// URL."""
    return url.removeprefix("file://")


def pipe_allowed(allow: bool = False) -> bool:
    return allow or os.environ.get(PIPE_ENV, "") == "1"


def check_pipe(url: str, allow: bool = False) -> None:
    if url.startswith("pipe:") and not pipe_allowed(allow):
        raise StorageError(f"shard {url!r} is a `pipe:` URL, which runs a shell command: if you trust the command, "
                           f"allow it with `data.allow_pipe: true` in the manifest (or {PIPE_ENV}=1 in the environment)")


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path in it) for a URL or local path; a clear error for an unknown protocol or a
    missing package (s3fs, gcsfs)."""
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        raise StorageError(f"{url}: its protocol needs a package that is not installed ({e}): "
                           f"pip install s3fs (s3://) or gcsfs (gs://)") from None
    except ValueError as e:
        raise StorageError(f"{url}: not a URL fsspec can open ({e}): use a local path, file://, s3://, gs:// "
                           f"or http(s)://") from None


def open_stream(url: str, storage_options: dict | None = None) -> IO[bytes]:
    """A binary stream of the whole object at `url` (pipe: URLs must have been allowed, see `check_pipe`)."""
    if url.startswith("pipe:"):
        check_pipe(url)
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if not is_remote(url):
        return open(local_path(url), "rb")
    fs, path = filesystem(url, storage_options)
    return fs.open(path, "rb", block_size=1 << 22)


def _unstrip(fs: fsspec.AbstractFileSystem, url: str, path: str) -> str:
    return path if not is_remote(url) else fs.unstrip_protocol(path)


def expand(spec: str | list[str] | tuple[str, ...], allow_pipe: bool = False,
           storage_options: dict | None = None) -> list[str]:
    """Shard URLs from brace patterns, globs and lists, in the order given (a glob's matches sorted)."""
    urls = []
    for pattern in [spec] if isinstance(spec, str) else list(spec):
        for url in expand_urls(pattern):
            if url.startswith("pipe:"):
                check_pipe(url, allow_pipe)
                urls.append(url)
                continue
            if not local_glob.has_magic(url):
                urls.append(url)
                continue
            if is_remote(url):
                fs, path = filesystem(url, storage_options)
                matches = [_unstrip(fs, url, p) for p in sorted(fs.glob(path))]
            else:
                matches = sorted(local_glob.glob(local_path(url)))
            if not matches:
                raise StorageError(f"no shard matches {url!r}: check the pattern (quote it so the shell does not "
                                   f"expand it first)")
            urls += matches
    if not urls:
        raise StorageError(f"data spec {spec!r} names no shards")
    twice = next((u for u in urls if urls.count(u) > 1), None)
    if twice is not None:
        raise StorageError(f"shard {twice} is named twice by {spec!r}: name each shard once")
    return urls


def info_split(directory: str, split: str, storage_options: dict | None = None) -> list[tuple[str, int]] | None:
    """(url, samples) per shard of `split` from timm's `_info.json` in `directory`; None when there is none.

    `split` "val" also finds timm's "validation" (and "test")."""
    fs, path = filesystem(directory, storage_options)
    try:
        if not fs.isdir(path):
            return None
    except OSError:
        return None
    for name in INFO_NAMES:
        info_path = posixpath.join(path, name)
        if fs.exists(info_path):
            break
    else:
        return None
    where = _unstrip(fs, directory, info_path)
    try:
        with fs.open(info_path, "rb") as f:
            info = json.loads(f.read())
        splits = info["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{where} is not a timm dataset info file ({type(e).__name__}: {e}): it needs "
                           f"splits.<name>.filenames and .shard_lengths") from None
    names = [split] if split == "train" else [split, *VAL_SPLIT_NAMES]
    found = next((n for n in names if n in splits), None)
    if found is None:
        raise StorageError(f"{where} has no split named {' or '.join(map(repr, names))} (it has {sorted(splits)}): "
                           f"point data.{split} at the shards themselves, or add the split")
    entry = splits[found]
    try:
        filenames, lengths = list(entry["filenames"]), [int(n) for n in entry["shard_lengths"]]
    except (KeyError, TypeError, ValueError) as e:
        raise StorageError(f"{where}: split {found!r} needs `filenames` and `shard_lengths` lists ({e})") from None
    if len(filenames) != len(lengths) or not filenames:
        raise StorageError(f"{where}: split {found!r} lists {len(filenames)} filenames and {len(lengths)} shard "
                           f"lengths: they must pair up one to one")
    base = directory.rstrip("/")
    return [(f"{base}/{name}", n) for name, n in zip(filenames, lengths)]


# --------------------------------------------------------------------------------------------- checksums


class HashingReader:
    """A read-only stream that feeds every byte read through sha256 (`hexdigest()` once it is drained)."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.sha = stream, hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def close(self) -> None:
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------- the index


def index_path(cache_path: str, split: str) -> str:
    """Where the scan of a split's shards is kept: beside the cache."""
    return f"{cache_path.rstrip('/')}.shards/{split}.json"


def read_json(url: str, storage_options: dict | None = None) -> Any | None:
    """A JSON document at a local path or URL; None when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_json_atomic(url: str, obj: Any, storage_options: dict | None = None) -> None:
    """Write a JSON document whole or not at all: a rename on a local disk, a single PUT on an object store."""
    data = (json.dumps(obj, indent=1) + "\n").encode()
    if not is_remote(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = filesystem(url, storage_options)
    fs.pipe_file(path, data)


def configure(url: str, storage_options: dict | None) -> None:
    """Make `storage_options` the defaults of `url`'s protocol for this process and the loader workers it
    forks (fsspec's own config), so every open of that store, by any stage, uses them."""
    if not storage_options or not is_remote(url):
        return
    protocol = fsspec.core.split_protocol(url)[0]
    fsspec.config.conf.setdefault(protocol, {}).update(storage_options)


def store_checksum(url: str, storage_options: dict | None = None) -> str | None:
    """The store's own checksum of an object, as `etag:<value>`: S3's ETag, GCS's md5Hash; None where the
    store has none (local files, plain http)."""
    if not is_remote(url) or url.startswith("pipe:"):
        return None
    fs, path = filesystem(url, storage_options)
    info = fs.info(path)
    for key in ("ETag", "etag", "md5Hash", "md5_hash"):
        if info.get(key):
            return f"etag:{str(info[key]).strip(chr(34))}"
    return None


def configure_manifest(m) -> None:
    """Apply the manifest's storage options (data and cache) and its pipe: opt-in to this process."""
    if m.data.allow_pipe:
        os.environ[PIPE_ENV] = "1"  # inherited by loader workers and by the processes a stage starts
    for url in [m.data.train, m.data.val]:
        for one in [url] if isinstance(url, str) else url:
            configure(one, m.data.storage_options)
    configure(m.cache.path, m.cache.storage_options)
