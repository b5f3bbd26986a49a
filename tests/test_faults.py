"""Faults during `teacher-cache`: SIGKILL at random moments, a full disk, a reader during the write, two
writers on one cache, an epoch extension cut short. Each ends in a cache equal, array by array, to one
written without trouble."""

import asyncio
import errno
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

import fault_script
from pipeline import cache, lock
from pipeline.manifest_loader import load
from pipeline.teacher_cache import run as fill_cache

TINY = "manifests/tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def overrides(work):
    return fault_script.tiny_overrides(work)


@pytest.fixture(scope="module")
def reference(work, overrides):
    """A cache written in one go, in this process."""
    path = str(work / "reference")
    fill_cache(load(TINY, overrides + [f"cache.path={path}"]), progress=False)
    return path


def _arrays(path) -> dict:
    """Every array of a cache, read with zarr alone."""
    root = zarr.open_group(path, mode="r")
    return {f"{split}/{name}": arr[...] for split in ("train", "val") for name, arr in root[split].arrays()}


def assert_same_cache(path, reference):
    a, b = _arrays(path), _arrays(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert (dict(zarr.open_group(path).attrs, created=None) == dict(zarr.open_group(reference).attrs, created=None))


def _manifest(overrides, path, *extra):
    return load(TINY, overrides + [f"cache.path={path}", *extra])


# --------------------------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_a_bit_identical_cache(work, overrides):
    report = fault_script.run_faults(TINY, overrides, work / "kills", kills=5, seed=0)
    assert report["kills"] == 5 and len(report["points"]) == 5
    assert report["reader_checks"] > 0  # a reader polled the cache while it was being written
    # independent of the driver's own comparison: every array, read with zarr alone
    assert_same_cache(report["faulted"], report["reference"])


# --------------------------------------------------------------------------------------------- disk full


def _failing_store(monkeypatch, fail_at: int, keys: list):
    """LocalStore.set raising ENOSPC on the `fail_at`-th chunk write (0-based), recording the chunk keys."""
    original = LocalStore.set

    async def set_or_fail(self, key, value):
        if "/c/" in key:
            keys.append(key)
            if len(keys) == fail_at + 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_or_fail)


def test_disk_full_during_a_unit_write_names_the_unit_and_the_run_resumes(tmp_path, overrides, reference,
                                                                           monkeypatch):
    path = str(tmp_path / "cache")
    keys = []
    # chunk writes per unit: val 5 + done, train epoch 0: 6 + done -> write 22 is the third of train (0, 1)
    with monkeypatch.context() as patch:
        _failing_store(patch, 22, keys)
        with pytest.raises(cache.CacheError) as failure:
            fill_cache(_manifest(overrides, path), progress=False)
    failed = keys[-1]
    epoch, group = map(int, re.match(r"train/\w+/c/(\d+)/(\d+)/", failed).groups())
    assert re.search(rf"writing train unit \(epoch {epoch}, shard group {group}, shards \[{group}\]\) failed: "
                     rf"\[Errno {errno.ENOSPC}\] No space left on device.* The unit is not marked complete and the "
                     rf"units completed before it are kept: free space on the cache's filesystem \(or fix the store\) "
                     rf"and resume `make teacher-cache`", str(failure.value))
    root = cache.open_cache(path)
    assert not cache.done_units(root, "train")[epoch, group]
    assert cache.done_units(root, "val").all()  # written before the disk filled
    assert not os.path.exists(path + ".locks")  # the lock was given back
    fill_cache(_manifest(overrides, path), progress=False)  # space again: resume
    assert_same_cache(path, reference)


# --------------------------------------------------------------------------------------------- readers


def test_a_reader_during_the_write_sees_only_complete_units(tmp_path, overrides, reference, monkeypatch):
    """The writer runs in a thread with every store write slowed down; the reader opens the cache afresh
    again and again: each unit it sees done equals the reference, each unit not done is refused."""
    path = str(tmp_path / "cache")
    original = LocalStore.set

    async def slow_set(self, key, value):
        await asyncio.sleep(0.01)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", slow_set)
    expected = _arrays(reference)
    writer = threading.Thread(target=fill_cache, args=(_manifest(overrides, path),), kwargs={"progress": False})
    writer.start()
    seen_done, refused, partial = set(), 0, 0
    while writer.is_alive():
        try:
            root = cache.open_cache(path)
        except cache.CacheError:
            time.sleep(0.005)
            continue  # not created yet
        train_done = cache.done_units(root, "train")
        for epoch, group in zip(*np.nonzero(train_done)):
            slab = cache.read_slab(root, "train", int(epoch), int(group),
                                   ("topk_logprobs", "log_leftover", "digest", "view"))
            want = dict(zip(("topk_logprobs", "log_leftover"), cache.decode_answers(
                expected["train/topk_logratios"][epoch, group], expected["train/leftover_logit"][epoch, group])))
            for name, values in slab.items():
                if name in want:  # the answers as the reference's stored arrays decode
                    assert np.array_equal(values, want[name]), (epoch, group, name)
                    continue
                stored = cache.CODECS[name][0](values) if name in cache.CODECS else values  # the bytes on disk
                assert np.array_equal(stored, expected[f"train/{name}"][epoch, group]), (epoch, group, name)
            seen_done.add((int(epoch), int(group)))
        for epoch, group in zip(*np.nonzero(~train_done)):
            chunk = root["train"]["topk_logratios"]
            has_data = os.path.exists(cache.chunk_location(root, chunk, (int(epoch), int(group), 0, 0)))
            try:
                cache.read_slab(root, "train", int(epoch), int(group))
            except cache.CacheError as e:
                assert "is not complete" in str(e)
                refused += 1
                partial += has_data  # data written, done flag not yet: the window a reader must not use
            break
    writer.join()
    assert len(seen_done) >= 2 and refused >= 2 and partial >= 1
    assert_same_cache(path, reference)


# --------------------------------------------------------------------------------------------- two writers


def test_two_writers_started_at_once_cannot_corrupt_the_cache(tmp_path, overrides, reference):
    """The second writer starts while the first holds the lock (the first is stopped with SIGSTOP once its pid is
    in the lock file, so a loaded machine cannot let it finish first): the second is refused, the first goes
    on and writes the reference bytes."""
    path = str(tmp_path / "cache")
    launcher = fault_script.Launcher("fork", threads=1)
    argv = fault_script._argv(TINY, overrides, path)
    first = launcher.start(argv)
    lock_file = lock.lock_dir(path) / "rank0-of-1.lock"
    deadline = time.monotonic() + 120
    while f'"pid": {first.pid},' not in (lock_file.read_text() if lock_file.exists() else ""):
        assert launcher.alive(first) and time.monotonic() < deadline, "the first writer never took the lock"
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = launcher.start(argv)
        assert launcher.wait(second) == 1  # stopped at the lock
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert launcher.wait(first) == 0
    assert_same_cache(path, reference)


def _snapshot(path) -> dict:
    return {p: open(os.path.join(d, p), "rb").read() for d, _, files in os.walk(path) for p in files}


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, overrides, reference):
    path = tmp_path / "cache"
    shutil.copytree(reference, path)
    before = _snapshot(path)
    with lock.writer_lock(str(path), 0, 1) as held:
        with pytest.raises(lock.WriterLockError, match=re.escape(
                f"cache {path} is already being written by rank 0 of 1: lock {held} (pid {os.getpid()} on host "
                f"{socket.gethostname()}, since ") + r".*\)\. Two writers of the same units would corrupt it: wait for "
                r"that run to finish \(it can be resumed later\), or stop it; the lock is released when it exits"):
            fill_cache(_manifest(overrides, str(path), "cache.epochs=3"), progress=False)
    assert _snapshot(path) == before  # the refused writer touched nothing
    assert not (tmp_path / "cache.locks").exists()


def test_every_spelling_of_one_cache_takes_the_same_lock(tmp_path, monkeypatch):
    """A symlink alias, `a/../a`, a relative path and a file:// URL all name the one lock of the real directory."""
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    spellings = [str(tmp_path / "alias" / "cache"), str(tmp_path / "real" / ".." / "real" / "cache"),
                 "real/cache", "./alias/../alias/cache", f"file://{tmp_path}/real/cache"]
    with lock.writer_lock(str(tmp_path / "real" / "cache"), 0, 1) as held:
        assert held == tmp_path / "real" / "cache.locks" / "rank0-of-1.lock"
        for spelling in spellings:
            with pytest.raises(lock.WriterLockError, match=re.escape(f"cache {spelling} is already being written "
                                                                     f"by rank 0 of 1: lock {held} (pid {os.getpid()}")):
                with lock.writer_lock(spelling, 0, 1):
                    pass
    for spelling in spellings:  # once given back, each spelling takes it
        with lock.writer_lock(spelling, 0, 1) as held:
            assert held == tmp_path / "real" / "cache.locks" / "rank0-of-1.lock"
    assert not (tmp_path / "real" / "cache.locks").exists()


def test_a_writer_with_another_world_size_is_refused(tmp_path, overrides):
    path = str(tmp_path / "cache")
    with lock.writer_lock(path, 1, 2):
        with pytest.raises(lock.WriterLockError, match=r"is being written by a run with world size 2: lock .*rank1-of-2"
                                                       r"\.lock \(pid \d+ .*\)\. A run with world size 1 would write "
                                                       r"the same units: use the same --world-size as that run"):
            fill_cache(_manifest(overrides, path), progress=False)
        with lock.writer_lock(path, 0, 2):  # the other rank of the same world: fine
            pass
    assert not os.path.exists(path)


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path, overrides, reference):
    """The kernel releases a flock when its holder dies, SIGKILL included: the lock file left behind is no
    obstacle, whatever it says, and a live holder in another process is refused."""
    path = tmp_path / "cache"
    shutil.copytree(reference, path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline import lock; "
        f"lock.acquire({str(path)!r}, 0, 1); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.WriterLockError, match=re.escape(f"(pid {holder.pid} on host {socket.gethostname()}")):
            fill_cache(_manifest(overrides, str(path)), progress=False)
    finally:
        holder.kill()
        holder.wait()
    stale = tmp_path / "cache.locks" / "rank0-of-1.lock"
    assert stale.exists()  # killed: it never gave the lock back
    assert fill_cache(_manifest(overrides, str(path)), progress=False)["units_skipped"] > 0
    assert not stale.parent.exists()  # taken over, then given back
    assert_same_cache(path, reference)


# --------------------------------------------------------------------------------------------- growing a cache


def test_an_extension_cut_short_while_growing_the_arrays_resumes(tmp_path, overrides, reference):
    """More cache epochs grow every train array; a run killed after growing some of them must grow the rest."""
    path = str(tmp_path / "cache")
    fill_cache(_manifest(overrides, path, "cache.epochs=1"), progress=False)
    root = zarr.open_group(path, mode="r+")
    root["train"]["done"].resize((2,) + root["train"]["done"].shape[1:])  # the kill came after this one array
    root["train"]["leftover_logit"].resize((2,) + root["train"]["leftover_logit"].shape[1:])
    fill_cache(_manifest(overrides, path, "cache.epochs=2"), progress=False)
    assert_same_cache(path, reference)


# --------------------------------------------------------------------------------------------- topology


def test_the_cache_is_bit_identical_for_one_or_two_ranks_and_zero_or_two_workers(tmp_path, overrides, reference):
    """Units go to ranks and workers by index and teacher batches never cross a shard, so the numbers cannot
    depend on the topology: two independent rank jobs, or two loader workers, write the reference cache."""
    ranks = str(tmp_path / "two-ranks")
    for rank in (1, 0):  # in either order: each job writes only its own units
        fill_cache(_manifest(overrides, ranks), rank=rank, world_size=2, progress=False)
    assert_same_cache(ranks, reference)
    workers = str(tmp_path / "two-workers")
    fill_cache(_manifest(overrides, workers, "cache.workers=2"), progress=False)
    assert_same_cache(workers, reference)
