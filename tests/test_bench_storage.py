"""The storage section (`benchmarks/storage.py`, `measure(quick) -> (results, markdown)`): bytes per array
counted from the chunk files on disk, the K=10 / K=100 keys of results.json, and the tail samples' gradient
bias against the uniform fill."""

import dataclasses
import os

import numpy as np
import pytest
import torch
import zarr

from benchmarks import storage
from pipeline import views

torch.set_num_threads(1)
SMALL = dataclasses.replace(storage.QUICK, shards=2, positions=32, shards_per_unit=2, bias_views=4, bias_draws=200)


def test_bytes_per_array_are_the_chunk_files_on_disk(tmp_path):
    """Independent computation: walk each array's chunk files and add up their blocks (`du`) and sizes."""
    rng = np.random.default_rng(0)
    n = SMALL.shards * SMALL.positions
    logits = storage.imagenet_like_logits(rng, n, SMALL.classes)
    params = storage.imagenet_like_params(rng, SMALL.shards, SMALL.positions)
    entry = storage.cache_bytes(tmp_path, SMALL, 10, logits, params, tail=False)
    per_view = 0.0
    for name in ("topk_logratios", "topk_ids", "leftover_logit", "view", "digest", "done"):
        files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "k10" / "train" / name / "c") for f in fs]
        disk = sum(os.stat(f).st_blocks * 512 for f in files) / n
        apparent = sum(os.path.getsize(f) for f in files) / n
        assert entry["arrays"][name]["disk"] == pytest.approx(disk) and entry["arrays"][name]["apparent"] == pytest.approx(apparent)
        per_view += disk
    assert entry["total_disk"] == pytest.approx(per_view)
    raw = {name: entry["arrays"][name]["raw"] for name in ("topk_logratios", "topk_ids", "leftover_logit", "view", "digest")}
    assert raw == {"topk_logratios": 18, "topk_ids": 20, "leftover_logit": 2, "view": views.PARAM_BYTES, "digest": 4}
    root = zarr.open_group(str(tmp_path / "k10"), mode="r")
    assert root["train"]["topk_ids"].dtype == np.uint16 and root["train"]["topk_logratios"].shape[-1] == 9


def test_tail_draws_remove_the_uniform_fills_gradient_bias():
    bias = storage.gradient_bias(SMALL, tau=1.0)
    assert bias["tail_sq_error_over_sampling"] < 2.5  # within the sampling error of a mean over 200 draws
    assert bias["uniform_sq_error_over_sampling"] > 2 * bias["tail_sq_error_over_sampling"]
    assert bias["uniform_relative_bias"] > bias["tail_relative_bias"]


def test_measure_reports_the_keys_results_json_holds():
    results, text = storage.measure(quick=True)
    for k in (10, 100):
        assert results[f"bytes_per_view_k{k}_disk"] == results["storage"]["by_k"][str(k)]["total_disk"] > 0
        assert f"| {k} | **total** |" in text
