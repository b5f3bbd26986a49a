"""Shared fixtures."""

import pytest
import torch

from pipeline.shards import write_digits
from tiny import TinyCache


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """The built-in digits set, built once per session with 100 samples per shard.

    Returns the output directory: train/shardlist.json (15 shards, 1,497 samples), val/shardlist.json
    (3 shards, 300 samples) and class_map.json. Treat it as read-only."""
    out = tmp_path_factory.mktemp("digits")
    write_digits(out, shard_size=100)
    return out


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """manifests/tiny.yaml with its shards, teacher and a filled cache (tests/tiny.py); treat it as read-only."""
    return TinyCache(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a few shared cores, more make the tiny teacher many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
