"""The writer lock: at most one `teacher-cache` process fills a cache's units for a given (rank, world size).

Units are dealt to ranks by index, so two processes with the same rank and world size would write the same
chunks (zarr-python loses data on concurrent writes of one chunk), and two runs with different world sizes
deal the same units differently. A writer therefore holds `<cache>.locks/rank<r>-of-<w>.lock` under an
exclusive `flock`, and refuses to start while a lock of another world size is held. The lock file holds the
holder's pid, host and start time, for messages only: whether a lock is held is the kernel's answer, and the
kernel releases it when its holder dies in any way (SIGKILL included), so there is no stale lock to reclaim.

The cache is named by its resolved real path (symlinks, `..` and relative paths resolved), so every spelling
of one directory takes the same lock. The locks live beside the cache, not inside it, so they are no part of
the Zarr hierarchy.

On S3 (`s3://`) the lock is an object `<cache>.locks/rank<r>-of-<w>.lock` created by a conditional PUT
(`If-None-Match: *`): of two writers exactly one creates it. An object store cannot tell whether its holder
still runs, so a lock left by a killed writer stays until it is deleted (the message names the object).
Stores without a conditional create (gs://, http, memory://, ...) cannot guarantee one writer: a run there
stops unless `cache.allow_no_lock: true` says that the user guarantees it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

ACQUIRE_TRIES = 50  # attempts while another writer is releasing (unlinking) the same lock file
EXCLUSIVE_CREATE = ("s3", "s3a")  # fsspec protocols whose PUT can be made conditional on absence


class WriterLockError(RuntimeError):
    """Another live process is writing the cache; the message names it and what to do."""


def lock_dir(cache_path: str) -> Path | None:
    """`<real path of the cache>.locks` for a local cache, None for a remote one."""
    if "://" in cache_path and not cache_path.startswith("file://"):
        return None
    local = Path(cache_path.removeprefix("file://")).expanduser().resolve()
    return local.with_name(local.name + ".locks")


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        holder = None
    if not isinstance(holder, dict):
        return f"{path} (holder not yet recorded)"
    return f"{path} (pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')})"


def _world_of(path: Path) -> int | None:
    """The world size in a lock file name `rank<r>-of-<w>.lock`."""
    try:
        return int(path.name.removesuffix(".lock").split("-of-")[1])
    except (IndexError, ValueError):
        return None


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on the file now at `path` (created if absent), or None if another
    process holds it. A holder that releases unlinks the file, so after locking, the fd must still be the
    file at `path`; otherwise the lock is on an orphan and the attempt is repeated."""
    for _ in range(ACQUIRE_TRIES):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # the directory was removed by a writer releasing its lock just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise WriterLockError(f"could not take the writer lock {path}: it is being created and removed continuously")


def _is_held(path: Path) -> bool:
    """Whether a live process holds the lock at `path` (a lock nobody holds is removed on the way)."""
    fd = _try_lock(path)
    if fd is None:
        return True
    path.unlink(missing_ok=True)
    os.close(fd)
    return False


def acquire(cache_path: str, rank: int, world_size: int, allow_no_lock: bool = False) -> tuple | None:
    """Take the writer lock of (cache, rank, world size); returns what `release` gives back (None where the
    store cannot lock and `allow_no_lock` is set).

    Raises WriterLockError naming the holder when a live process holds it, or holds a lock of the same
    cache under another world size."""
    directory = lock_dir(cache_path)
    if directory is None:
        return _acquire_remote(cache_path, rank, world_size, allow_no_lock)
    path = directory / f"rank{rank}-of-{world_size}.lock"
    fd = _try_lock(path)
    if fd is None:
        raise WriterLockError(
            f"cache {cache_path} is already being written by rank {rank} of {world_size}: lock "
            f"{_holder_text(path)}. Two writers of the same units would corrupt it: wait for that run to finish "
            f"(it can be resumed later), or stop it; the lock is released when it exits, killed or not")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    held = (path, fd)
    for other in sorted(directory.glob("rank*-of-*.lock")):
        if _world_of(other) in (None, world_size):
            continue
        if _is_held(other):
            text = _holder_text(other)
            release(held)
            raise _other_world(cache_path, world_size, other, text)
    return held


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _other_world(cache_path: str, world_size: int, other, text: str) -> WriterLockError:
    return WriterLockError(
        f"cache {cache_path} is being written by a run with world size {_world_of(other)}: lock {text}. "
        f"A run with world size {world_size} would write the same units: use the same --world-size as "
        f"that run, or wait for it to finish")


def _acquire_remote(cache_path: str, rank: int, world_size: int, allow_no_lock: bool) -> tuple | None:
    from pipeline import storage

    fs, root = storage.filesystem(cache_path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in EXCLUSIVE_CREATE:
        if allow_no_lock:
            return None
        raise WriterLockError(
            f"cache {cache_path}: the store ({protocol}://) has no exclusive create, so two writers of this cache "
            f"could not be stopped from corrupting it. Put the cache on a local or shared filesystem or on S3, or, "
            f"if you make sure that one teacher-cache run per rank writes it, set cache.allow_no_lock: true")
    directory = root.rstrip("/") + ".locks"
    path = f"{directory}/rank{rank}-of-{world_size}.lock"
    url = fs.unstrip_protocol(path)
    try:
        fs.pipe_file(path, json.dumps(_me()).encode(), mode="create")  # If-None-Match: *
    except FileExistsError:
        raise WriterLockError(
            f"cache {cache_path} is already being written by rank {rank} of {world_size}: lock object "
            f"{_remote_holder(fs, path, url)}. Two writers of the same units would corrupt it: wait for that run to "
            f"finish (it can be resumed later). An object store cannot tell whether that run still lives: if it "
            f"was killed, delete {url} and resume") from None
    held = (fs, path)
    for other in sorted(fs.glob(f"{directory}/rank*-of-*.lock")):
        if _world_of(Path(other)) not in (None, world_size):
            text = _remote_holder(fs, other, fs.unstrip_protocol(other))
            release(held)
            raise _other_world(cache_path, world_size, Path(other), text)
    return held


def _remote_holder(fs, path: str, url: str) -> str:
    try:
        holder = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return f"{url} (holder unreadable)"
    return f"{url} (pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')})"


def release(held: tuple | None) -> None:
    """Give the lock back: remove the file while still holding it, then unlock (or delete the lock object)."""
    if held is None:
        return
    if not isinstance(held[1], int):
        fs, path = held
        fs.rm_file(path)
        return
    path, fd = held
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # the last writer out removes the directory
    except OSError:
        pass  # other locks are still in it
    os.close(fd)


@contextmanager
def writer_lock(cache_path: str, rank: int, world_size: int, allow_no_lock: bool = False):
    """Hold the writer lock of (cache, rank, world size) for the duration of the block; yields the lock
    file's path or object URL (None where the store cannot lock and `allow_no_lock` is set)."""
    held = acquire(cache_path, rank, world_size, allow_no_lock)
    try:
        if held is None:
            yield None
        elif isinstance(held[1], int):
            yield held[0]
        else:
            yield held[0].unstrip_protocol(held[1])
    finally:
        release(held)
