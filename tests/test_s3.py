"""The cache and the shards on a real S3 server: moto's server mode on 127.0.0.1 (a free port), started and
stopped here. Shards are read from it, the cache is written to it; the result equals a local cache array by
array; a SIGKILL and a resume give the same bytes as an uninterrupted run; the writer lock holds there."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import fault_script
from pipeline import cache, lock
from pipeline.manifest_loader import load
from pipeline.teacher_cache import run as fill_cache

pytest.importorskip("s3fs")
pytest.importorskip("moto")

TINY = "manifests/tiny.yaml"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint URL on 127.0.0.1, with the buckets `data` and `caches`; stopped after the module."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("data")
        fs.mkdir("caches")
        yield endpoint
    finally:
        server.kill()
        server.wait()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False, skip_instance_cache=True)


@pytest.fixture(scope="module")
def setup(s3, tmp_path_factory):
    """Tiny shards uploaded to s3://data/shards/, and a local reference cache of the same shards."""
    work = tmp_path_factory.mktemp("s3work")
    local = fault_script.tiny_overrides(work)
    fs = _fs(s3)
    for split in ("train", "val"):
        for path in sorted((work / "shards" / split).glob("*.tar")):
            fs.put_file(str(path), f"data/shards/{split}/{path.name}")
    options = json.dumps({"endpoint_url": s3})
    remote = ["data.train=s3://data/shards/train/part-{000000..000005}.tar", "data.val=s3://data/shards/val/*.tar",
              f"data.storage_options={options}", f"cache.storage_options={options}",
              f"teacher.checkpoint={work / 'teacher.pt'}", "cache.batch_size=4", "cache.device=cpu", "cache.epochs=3"]
    reference = str(work / "reference")
    fill_cache(load(TINY, local + ["cache.epochs=3", f"cache.path={reference}"]), progress=False)
    return {"remote": remote, "reference": reference, "work": work, "endpoint": s3}


def _arrays(path):
    root = cache.open_cache(path)
    return {f"{split}/{name}": arr[...] for split in cache.SPLITS for name, arr in root[split].arrays()}


def _objects(fs, prefix):
    """Every object of a cache, its bytes; the root zarr.json compared without its creation time."""
    out = {}
    for key in fs.find(prefix):
        data = fs.cat_file(key)
        if key == f"{prefix}/zarr.json":
            meta = json.loads(data)
            meta["attributes"].pop("created")
            data = json.dumps(meta, sort_keys=True).encode()
        out[key.removeprefix(prefix)] = data
    return out


def test_teacher_cache_and_student_steps_on_s3(setup, tmp_path):
    path = "s3://caches/one"
    m = load(TINY, setup["remote"] + [f"cache.path={path}", f"student.run_dir={tmp_path / 'run'}", "student.epochs=1",
                                      "student.device=cpu"])
    summary = fill_cache(m, progress=False)
    assert summary["units_skipped"] == 0 and summary["units_written"] == 2 + 6 * 3
    fs = _fs(setup["endpoint"])
    assert fs.exists("caches/one.shards/train.json")  # the scan, kept beside the cache on the same store
    assert not fs.exists("caches/one.locks")  # the lock object was given back
    got, want = _arrays(path), _arrays(setup["reference"])
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert zarr.open_group(path, mode="r").attrs["fingerprint"] == zarr.open_group(setup["reference"]).attrs["fingerprint"]
    assert cache.disk_usage(path) == sum(len(fs.cat_file(key)) for key in fs.find("caches/one"))

    from pipeline.train import train

    result = train(m, progress=False)
    assert result["steps"] == result["steps_per_epoch"] > 0
    assert (tmp_path / "run" / "result.json").is_file()


def test_a_second_writer_on_s3_is_refused_by_the_lock_object(setup):
    path = "s3://caches/locked"
    m = load(TINY, setup["remote"] + [f"cache.path={path}"])
    with lock.writer_lock(path, 0, 1) as held:
        assert held == "s3://caches/locked.locks/rank0-of-1.lock"
        with pytest.raises(lock.WriterLockError, match=re.escape(
                f"cache {path} is already being written by rank 0 of 1: lock object {held} (pid {os.getpid()} on host "
                f"{socket.gethostname()}")):
            fill_cache(m, progress=False)
        with pytest.raises(lock.WriterLockError, match=r"is being written by a run with world size 1"):
            fill_cache(load(TINY, setup["remote"] + [f"cache.path={path}"]), rank=1, world_size=2, progress=False)
    assert not _fs(setup["endpoint"]).exists("caches/locked")  # nothing was written


def test_a_store_without_exclusive_create_needs_the_explicit_flag(setup, tmp_path):
    m = load(TINY, setup["remote"] + ["cache.path=memory://nolock/cache"])
    with pytest.raises(lock.WriterLockError, match=re.escape("the store (memory://) has no exclusive create") +
                       r".*set cache\.allow_no_lock: true"):
        fill_cache(m, progress=False)


def test_sigkill_and_resume_on_s3_gives_the_bytes_of_an_uninterrupted_run(setup):
    whole, killed = "s3://caches/whole", "s3://caches/killed"
    fill_cache(load(TINY, setup["remote"] + [f"cache.path={whole}"]), progress=False)
    sets = [a for o in setup["remote"] + [f"cache.path={killed}"] for a in ("--set", o)]
    argv = [sys.executable, "-c", "import torch; torch.set_num_threads(1); from pipeline.cli import main; main()",
            "teacher-cache", "--manifest", TINY, *sets, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    total = 2 + 6 * 3
    for attempt in range(3):  # a run that outruns the kill is started again from nothing
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = 0
        while proc.poll() is None:
            done = _done(killed)
            if 3 <= done < total:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
        _fs(setup["endpoint"]).rm("caches/killed", recursive=True)
        _fs(setup["endpoint"]).rm("caches/killed.locks", recursive=True)
    assert proc.returncode == -signal.SIGKILL and 3 <= _done(killed) < total
    fs = _fs(setup["endpoint"])
    assert fs.exists("caches/killed.locks/rank0-of-1.lock")  # killed: the lock object stays
    m = load(TINY, setup["remote"] + [f"cache.path={killed}"])
    with pytest.raises(lock.WriterLockError, match=re.escape("if it was killed, delete "
                                                             "s3://caches/killed.locks/rank0-of-1.lock and resume")):
        fill_cache(m, progress=False)
    fs.rm_file("caches/killed.locks/rank0-of-1.lock")  # what the message says to do
    assert fill_cache(m, progress=False)["units_skipped"] >= 3
    assert _objects(fs, "caches/killed") == _objects(fs, "caches/whole")


def _done(path) -> int:
    try:
        root = zarr.open_group(path, mode="r")
        return int(cache.done_units(root, "train").sum() + cache.done_units(root, "val").sum())
    except Exception:  # not created yet, or its attributes not written yet
        return 0
