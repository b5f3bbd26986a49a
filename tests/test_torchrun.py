"""Multi-node as torchrun runs it: teacher-cache as two "nodes" of one process each on localhost (static
rendezvous, gloo) writes the bytes of a single process; only rank 0 reports."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import zarr

import fault_script
from pipeline.manifest_loader import load
from pipeline.teacher_cache import run as fill_cache

TINY = "manifests/tiny.yaml"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chunks(path) -> dict:
    """Every file of a cache, its bytes (the root attributes without their creation time)."""
    out = {}
    for directory, _, files in os.walk(path):
        for name in files:
            full = os.path.join(directory, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    out.pop("zarr.json")
    return out


def test_two_torchrun_nodes_write_the_bytes_of_one_process(tmp_path):
    overrides = fault_script.tiny_overrides(tmp_path)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    fill_cache(load(TINY, overrides + [f"cache.path={single}"]), progress=False)

    port = _free_port()
    sets = [a for o in overrides + [f"cache.path={multi}"] for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python",
         sys.executable, "-c", "from pipeline.cli import main; main()", "teacher-cache", "--manifest", TINY, *sets],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-2000:] + err[-3000:]

    assert _chunks(multi) == _chunks(single)
    a, b = zarr.open_group(multi, mode="r"), zarr.open_group(single, mode="r")
    assert dict(a.attrs, created=None) == dict(b.attrs, created=None)
    for split in ("train", "val"):
        assert np.array_equal(a[split]["done"][...], b[split]["done"][...])
    # rank 0 reports; rank 1 prints no summary and no progress bar
    assert "cache: " + multi in outputs[0][0] and "rank 0/2" in outputs[0][0]
    assert "cache: " not in outputs[1][0] and "teacher-cache rank 1" not in outputs[1][1]
    assert "teacher-cache rank 0" in outputs[0][1]
