"""cache.SlabReader: exactly read_slab's arrays (several shards per unit, train epochs, val, labels), each unit
checked and decoded once for a run of its shards, and read_slab's errors word for word."""

from pathlib import Path

import numpy as np
import pytest

from pipeline import cache
from pipeline.views import N_PARAMS, PARAM_BYTES, decode_params

EPOCHS, SHARDS, POSITIONS, K, CLASSES, PER_UNIT = 2, 5, 6, 3, 20, 2  # train groups {0, 1}, {2, 3}, {4}
VAL_SHARDS, VAL_POSITIONS = 3, 4
ALL_FIELDS = ("topk_logprobs", "topk_ids", "log_leftover", "digest", "view", "labels")


def _layouts():
    common = {"top_k": K, "num_classes": CLASSES, "shards_per_unit": PER_UNIT}
    return {"train": cache.CacheLayout(shards=SHARDS, positions=POSITIONS, n_params=N_PARAMS, epochs=EPOCHS, **common),
            "val": cache.CacheLayout(shards=VAL_SHARDS, positions=VAL_POSITIONS, n_params=0, epochs=None, **common)}


def _values(rng, split):
    """What the cache holds, written independently of the reader: {field: [E, S, P, ...] or [S, P, ...]}."""
    e = () if split == "val" else (EPOCHS,)
    s, p = (VAL_SHARDS, VAL_POSITIONS) if split == "val" else (SHARDS, POSITIONS)
    out = {"topk_logratios": -np.abs(rng.normal(size=e + (s, p, K - 1))).astype(np.float16),  # the stored form
           "topk_ids": rng.integers(CLASSES, size=e + (s, p, K)).astype(np.uint16),
           "leftover_logit": rng.integers(2**16, size=e + (s, p)).astype(np.uint16),
           "digest": rng.integers(1, 2**32, size=e + (s, p)).astype(np.uint32),
           "labels": rng.integers(CLASSES, size=(s, p)).astype(np.int32)}
    # what readers hand back: the answers decoded (`cache.decode_answers`, an independent formula in test_cache_format)
    out["topk_logprobs"], out["log_leftover"] = cache.decode_answers(out["topk_logratios"], out["leftover_logit"])
    if split == "train":  # any stored record decodes to a vector that encodes back to it
        out["view"] = decode_params(rng.integers(256, size=e + (s, p, PARAM_BYTES)).astype(np.uint8))
        assert out["view"].shape[-1] == N_PARAMS
    return out


def _fill(path, skip=()) -> dict:
    """A cache with every unit written except those in `skip` ((split, epoch, group)); returns its values."""
    layouts = _layouts()
    root = cache.create(str(path), layouts, {"classes": [str(c) for c in range(CLASSES)], "top_k": K})
    rng = np.random.default_rng(0)
    values = {split: _values(rng, split) for split in cache.SPLITS}
    for split, layout in layouts.items():
        for epoch in [None] if split == "val" else range(EPOCHS):
            for group in range(layout.groups):
                if (split, epoch, group) not in skip:
                    _write(root, values, split, epoch, group)
    return values


def _write(root, values, split, epoch, group):
    rows = _layouts()[split].group_shards(group)
    data = {name: (v if epoch is None or name == "labels" else v[epoch])[rows.start:rows.stop]
            for name, v in values[split].items() if name not in cache.STORED_AS}  # the answers in their stored form
    cache.write_unit(root, split, epoch, group, data)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    path = tmp_path_factory.mktemp("read") / "cache"
    return path, _fill(path)


def _assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), name


def test_the_reader_gives_read_slabs_arrays_in_any_order(filled):
    path, values = filled
    root = cache.open_cache(str(path))
    reader = cache.SlabReader(root, "train")
    # all shards of both epochs in a shuffled order (units left and come back), then a run in order
    keys = [(e, s) for e in range(EPOCHS) for s in range(SHARDS)]
    order = [keys[i] for i in np.random.default_rng(1).permutation(len(keys))] + keys
    for epoch, shard in order:
        for fields in (cache.SLAB_FIELDS, ALL_FIELDS, ("log_leftover", "labels"), ("view",)):
            got = reader.read(epoch, shard, fields)
            _assert_same(got, cache.read_slab(root, "train", epoch, shard, fields))
            # and both are what was written
            for name in fields:
                stored = values["train"][name]
                np.testing.assert_array_equal(got[name], stored[shard] if name == "labels" else stored[epoch, shard])
    assert reader.read(0, 3).keys() == set(cache.SLAB_FIELDS)  # read_slab's default fields


def test_val_reads_like_read_slab_and_skips_fields_it_has_not(filled):
    path, values = filled
    root = cache.open_cache(str(path))
    reader = cache.SlabReader(root, "val")
    for shard in (2, 0, 1, 1):
        got = reader.read(None, shard, ALL_FIELDS)
        assert "view" not in got  # val views are the eval transform: no parameters stored
        _assert_same(got, cache.read_slab(root, "val", None, shard, ALL_FIELDS))
        for name, stored in values["val"].items():
            if name not in cache.ANSWER_ARRAYS:  # readers hand out the decoded answers
                np.testing.assert_array_equal(got[name], stored[shard])


def test_a_run_of_one_units_shards_checks_and_decodes_it_once(filled, monkeypatch):
    path, _ = filled
    root = cache.open_cache(str(path))
    reader = cache.SlabReader(root, "train")
    arrays = {array for name in cache.SLAB_FIELDS for array in cache.STORED_AS.get(name, (name,))}
    unit_keys = {f"train/{name}/c/1/1" + "/0" * (root["train"][name].ndim - 2) for name in arrays}
    fetched, asked = [], []  # chunk keys read from the store, and asked about (existence)
    get, exists = root.store.get, root.store.exists
    monkeypatch.setattr(root.store, "get", lambda key, *a, **kw: fetched.append(key) or get(key, *a, **kw))
    monkeypatch.setattr(root.store, "exists", lambda key: asked.append(key) or exists(key))
    first = reader.read(1, 2)
    reader.read(1, 3)
    # both shards of unit (epoch 1, group 1): its done flag and each chunk fetched once, each chunk asked about once
    assert sorted(fetched) == sorted(unit_keys | {"train/done/c/1/1"})
    assert sorted(asked) == sorted(unit_keys)
    first["log_leftover"][:] = -1  # slabs are the caller's own: changing one changes nothing the reader hands out later
    np.testing.assert_array_equal(reader.read(1, 2)["log_leftover"], cache.read_slab(root, "train", 1, 2)["log_leftover"])
    fetched.clear(), asked.clear()
    reader.read(0, 2)
    reader.read(1, 2)  # back to a unit read before: decoded again, not checked again
    assert sorted(fetched) == sorted({k.replace("/c/1/", "/c/0/") for k in unit_keys} | unit_keys | {"train/done/c/0/1"})
    assert sorted(asked) == sorted(k.replace("/c/1/", "/c/0/") for k in unit_keys)


def _errors(root, split, epoch, shard, fields=cache.SLAB_FIELDS) -> tuple[str, str]:
    """The messages of read_slab and of a fresh reader on the same read."""
    with pytest.raises(cache.CacheError) as by_function:
        cache.read_slab(root, split, epoch, shard, fields)
    with pytest.raises(cache.CacheError) as by_reader:
        cache.SlabReader(root, split).read(epoch, shard, fields)
    return str(by_function.value), str(by_reader.value)


def test_a_unit_not_done_is_refused_until_it_is_done(tmp_path):
    path = tmp_path / "cache"
    values = _fill(path, skip={("train", 1, 1), ("train", 0, 2)})
    root = cache.open_cache(str(path))
    function, reader_message = _errors(root, "train", 1, 3)
    assert function == reader_message
    assert "train unit (epoch 1, shard group 1, shards [2, 3]) is not complete: resume `make teacher-cache`" in function
    # epoch-1 labels come from the epoch-0 unit, which is not done for group 2
    function, reader_message = _errors(root, "train", 1, 4, ("log_leftover", "labels"))
    assert function == reader_message and "train unit (epoch 0, shard group 2, shards [4]) is not complete" in function
    reader = cache.SlabReader(root, "train")
    with pytest.raises(cache.CacheError, match=r"epoch 1, shard group 1, shards \[2, 3\]\) is not complete"):
        reader.read(1, 2)
    _write(cache.open_cache(str(path), mode="r+"), values, "train", 1, 1)  # finished meanwhile: now it reads
    np.testing.assert_array_equal(reader.read(1, 2)["view"], values["train"]["view"][1, 2])


def test_missing_and_corrupt_chunks_give_read_slabs_errors(tmp_path):
    path = tmp_path / "cache"
    _fill(path)
    root = cache.open_cache(str(path))
    arrays = dict(root["train"].arrays())
    Path(cache.chunk_location(root, arrays["leftover_logit"], (0, 1, 0))).unlink()
    function, reader_message = _errors(root, "train", 0, 2)
    assert function == reader_message
    assert ("train/leftover_logit chunk (0, 1, 0)" in function and "of train unit (epoch 0, shard group 1, shards [2, 3]), "
            "which is marked complete, is missing; zarr would read it as zeros" in function)
    chunk = Path(cache.chunk_location(root, arrays["view"], (1, 0, 0, 0)))
    data = bytearray(chunk.read_bytes())
    data[20] ^= 0x10
    chunk.write_bytes(bytes(data))
    function, reader_message = _errors(root, "train", 1, 1)
    assert function == reader_message
    assert ("train/view chunk (1, 0, 0, 0)" in function and "is corrupt" in function
            and "it belongs to train unit (epoch 1, shard group 0, shards [0, 1])" in function)
    reader = cache.SlabReader(root, "train")  # the other fields and units still read
    _assert_same(reader.read(1, 1, ("log_leftover", "digest")), cache.read_slab(root, "train", 1, 1, ("log_leftover", "digest")))
    # epoch-1 labels are epoch 0's: their missing chunk is named as the epoch-0 unit's
    Path(cache.chunk_location(root, arrays["labels"], (1, 0))).unlink()
    function, reader_message = _errors(root, "train", 1, 3, ("log_leftover", "labels"))
    assert function == reader_message
    assert "train/labels chunk (1, 0)" in function and "of train unit (epoch 0, shard group 1, shards [2, 3])" in function
    done_flag = Path(cache.chunk_location(root, arrays["done"], (1, 2)))
    done_flag.write_bytes(done_flag.read_bytes()[:-1])  # a torn done flag
    function, reader_message = _errors(root, "train", 1, 4)
    assert function == reader_message and "train/done chunk (1, 2)" in function and "is corrupt" in function
    val = dict(root["val"].arrays())
    Path(cache.chunk_location(root, val["labels"], (1, 0))).unlink()
    function, reader_message = _errors(root, "val", None, 2, ("digest", "labels"))
    assert function == reader_message and "val/labels chunk (1, 0)" in function and "is missing" in function
