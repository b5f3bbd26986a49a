"""The writer lock: at most one `teacher-cache` process fills a cache's units for a given (rank, world size).

Units are dealt to ranks by index, so two processes with the same rank and world size would write the same
chunks (zarr-python loses data on concurrent writes of one chunk), and two runs with different world sizes
deal the same units differently. A writer therefore holds `<cache>.locks/rank<r>-of-<w>.lock`, created
exclusively (O_EXCL semantics: a hard link that fails if the name exists) and holding its pid, host and start
time, and refuses to start while a lock of another world size is held. The locks live beside the cache, not
inside it, so they are no part of the Zarr hierarchy.

A lock left by a killed writer is reclaimed when its pid no longer runs on this host; on another host
liveness cannot be checked, so the message names the file to delete. Caches on object stores (`s3://...`)
take no lock: exclusive creation has no meaning there.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

RECLAIM_TRIES = 50  # attempts while another process is reclaiming the same stale lock
RECLAIM_WAIT_S = 0.05


class WriterLockError(RuntimeError):
    """Another live process is writing the cache; the message names it and what to do."""


def lock_dir(cache_path: str) -> Path | None:
    """`<cache>.locks` for a local cache, None for a remote one."""
    if "://" in cache_path and not cache_path.startswith("file://"):
        return None
    return Path(cache_path.removeprefix("file://").rstrip("/") + ".locks")


def _holder(path: Path) -> dict | None:
    """The lock's content, or None when it is gone; {} when it is not a lock this module wrote."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict) -> bool:
    """False only when the holder is certainly gone: a pid of this host that no longer runs."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, under another user
        return True
    return True


def _describe(path: Path, holder: dict) -> str:
    if not holder:
        return f"{path} (unreadable: not written by distill)"
    return f"{path} (pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')})"


def _create_exclusive(path: Path, content: dict) -> bool:
    """Create `path` holding `content` unless it exists. The content is written to a private file first and
    hard-linked into place (atomic and exclusive, like O_EXCL), so a lock is never seen half-written."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{content['token']}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(content))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _reclaim(path: Path, stale: dict) -> None:
    """Remove a stale lock. A guard file taken with O_EXCL makes the re-read-and-delete atomic with respect
    to other reclaimers, so a lock taken fresh by one of them is never deleted by another."""
    guard = path.with_name(path.name + ".reclaim")
    if not _create_exclusive(guard, _me()):
        holder = _holder(guard)
        if holder and not _alive(holder):
            guard.unlink(missing_ok=True)  # a reclaimer killed inside the guard
        time.sleep(RECLAIM_WAIT_S)
        return
    try:
        if _holder(path) == stale:
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": os.urandom(8).hex()}


def _world_of(path: Path) -> int | None:
    """The world size in a lock file name `rank<r>-of-<w>.lock`."""
    try:
        return int(path.name.removesuffix(".lock").split("-of-")[1])
    except (IndexError, ValueError):
        return None


def acquire(cache_path: str, rank: int, world_size: int) -> Path | None:
    """Take the writer lock of (cache, rank, world size); returns its path (None for a remote cache).

    Raises WriterLockError naming the holder when a live process holds it, or holds a lock of the same
    cache under another world size."""
    directory = lock_dir(cache_path)
    if directory is None:
        return None
    path = directory / f"rank{rank}-of-{world_size}.lock"
    me = _me()
    for _ in range(RECLAIM_TRIES):
        directory.mkdir(parents=True, exist_ok=True)
        try:
            if _create_exclusive(path, me):
                break
        except FileNotFoundError:
            continue  # the directory was removed by a writer releasing its lock just now
        holder = _holder(path)
        if holder is None:
            continue  # released a moment ago
        if _alive(holder):
            raise WriterLockError(
                f"cache {cache_path} is already being written by rank {rank} of {world_size}: lock "
                f"{_describe(path, holder)}. Two writers of the same units would corrupt it: wait for that run "
                f"to finish (it can be resumed later), or, if no such process exists any more, delete {path}")
        try:
            _reclaim(path, holder)
        except FileNotFoundError:
            continue  # the directory went with the stale lock's release: try again
    else:
        raise WriterLockError(f"could not take the writer lock {path}: other processes keep reclaiming it; "
                              f"make sure one teacher-cache job per rank runs on cache {cache_path}")
    for other in sorted(directory.glob("rank*-of-*.lock")):
        if _world_of(other) in (None, world_size):
            continue
        holder = _holder(other)
        if holder is not None and _alive(holder):
            release(path)
            raise WriterLockError(
                f"cache {cache_path} is being written by a run with world size {_world_of(other)}: lock "
                f"{_describe(other, holder)}. A run with world size {world_size} would write the same units: "
                f"use the same --world-size as that run, wait for it to finish, or, if no such process exists "
                f"any more, delete {other}")
    return path


def release(path: Path | None) -> None:
    """Remove the lock if it is still this process's own."""
    if path is None:
        return
    holder = _holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # the last writer out removes the directory
        except OSError:
            pass  # other locks are still in it


@contextmanager
def writer_lock(cache_path: str, rank: int, world_size: int):
    """Hold the writer lock of (cache, rank, world size) for the duration of the block."""
    path = acquire(cache_path, rank, world_size)
    try:
        yield path
    finally:
        release(path)
