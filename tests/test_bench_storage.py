"""The storage section (`benchmarks/storage.py`, `measure(quick) -> (results, markdown)`): bytes per field
from the chunk files, the codec candidates and the codec rule."""

import os

import numpy as np
import pytest
import torch
import zarr

from benchmarks import storage

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    work = tmp_path_factory.mktemp("storage")
    result, text = storage.measure(True, work)
    return work, result, text


def test_storage_accounts_bytes_per_field_from_the_chunk_files(measured):
    """Independent computation: walk each array's chunk files of the K=100 cache the section wrote."""
    work, result, text = measured
    entry = result["by_k"]["100"]
    views = result["views"]
    for name in storage.STORED_FIELDS:
        chunk_dir = work / "storage" / "k100" / "train" / name / "c"
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(chunk_dir) for f in files)
        assert entry["bytes_per_view"][name] == pytest.approx(size / views)
    assert entry["raw_bytes_per_view"] == {"topk_logits": 200, "topk_ids": 200, "lse": 4, "view": 4 * 31, "digest": 8}
    assert entry["tinyvit"] == 404
    assert entry["total"] == pytest.approx(sum(entry["bytes_per_view"].values()))
    root = zarr.open_group(str(work / "storage" / "k100"), mode="r")
    assert root["train"]["topk_ids"].dtype == np.uint16 and root["train"]["topk_logits"].shape[-1] == 100
    assert text.startswith("## 4. Storage") and "K=10 with every field" in text


def test_codec_candidates_read_back_unchanged_and_report_sizes(tmp_path):
    values = np.random.default_rng(0).normal(size=(2, 50, 7)).astype(np.float32)
    found = storage.compare_codecs(tmp_path, "view", values, (2, 50, 7))
    assert "transpose+blosc-zstd5-shuffle" in found and storage.REFERENCE_CODEC in found
    for numbers in found.values():
        assert 0 < numbers["bytes_per_view"] < 2 * 7 * 4  # about the raw 28 bytes, plus headers
    lse = storage.compare_codecs(tmp_path, "lse", values[..., 0], (2, 50))
    assert not any(name.startswith("transpose") for name in lse)  # one number per view: nothing to transpose


def _entry(sizes: dict, encode: dict, decode: dict) -> dict:
    return {"bytes_per_view": {"view": sizes[storage.REFERENCE_CODEC]},
            "candidates": {"view": {c: {"bytes_per_view": sizes[c], "encode_views_per_s": encode[c],
                                        "decode_views_per_s": decode[c]} for c in sizes}}}


def test_codec_choice_is_the_smallest_that_keeps_half_the_speed():
    ref = storage.REFERENCE_CODEC
    sizes = {ref: 40.0, "small-but-slow": 30.0, "smaller": 35.0, "tiny-gain": 39.9}
    encode = {ref: 100.0, "small-but-slow": 10.0, "smaller": 60.0, "tiny-gain": 500.0}
    decode = {c: 100.0 for c in sizes}
    best = storage.best_codecs({"by_k": {"10": _entry(sizes, encode, decode)}})["view"]
    assert best["codec"] == "smaller" and best["bytes_per_view_summed"] == 35.0
    assert best["smallest_overall"] == "small-but-slow" and best["in_use_summed"] == 40.0
    sizes["smaller"] = 39.9  # saves less than 1%: the reference stays
    assert storage.best_codecs({"by_k": {"10": _entry(sizes, encode, decode)}})["view"]["codec"] == ref


