"""The shard reader: positions, bad input, the skip policy, and the epoch plan."""

import gzip
import io
import json
import math
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.reader import (ShardEntry, ShardError, ShardList, Span, dataloader_worker, decode_image, iter_epoch,
                             plan_epoch, rank_sample_count, read_shard)
from pipeline.shards import load_shardlist


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def tar_of(path, members):
    """A tar written with the standard library, member by member, in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_members(n, start=0):
    return [m for i in range(start, start + n) for m in ((f"k{i}.cls", str(i % 3).encode()), (f"k{i}.png", png(i)))]


def listed(tmp_path, shards, classes=("a", "b", "c")):
    """Write a shard list for (tar path, claimed sample count) pairs and load it."""
    entries = [{"url": str(p), "samples": n, "sha256": ""} for p, n in shards]
    path = tmp_path / "shardlist.json"
    path.write_text(json.dumps({"format": "distill-shardlist/1", "classes": list(classes), "shards": entries}))
    return load_shardlist(path)


# --------------------------------------------------------------------------------------------- reading


def test_read_shard_yields_tar_order_positions_labels_and_pixels(tmp_path):
    shard = tar_of(tmp_path / "s.tar", good_members(5))
    shardlist = listed(tmp_path, [(shard, 5)])
    samples = list(read_shard(shardlist, 0))
    assert [(s.shard, s.pos, s.key, s.label, s.padded) for s in samples] == [
        (0, i, f"k{i}", i % 3, False) for i in range(5)]
    for i, s in enumerate(samples):
        assert s.image.dtype == np.uint8 and s.image.shape[2] == 3
        assert np.array_equal(s.image, np.asarray(Image.open(io.BytesIO(png(i))).convert("RGB")))
    raw = list(read_shard(shardlist, 0, decode=False))
    assert [s.image for s in raw] == [png(i) for i in range(5)]
    middle = list(read_shard(shardlist, 0, start=1, stop=4, decode=False))
    assert [(s.pos, s.key, s.image) for s in middle] == [(s.pos, s.key, s.image) for s in raw[1:4]]


def test_read_shard_rejects_bad_arguments(tmp_path):
    shardlist = listed(tmp_path, [(tar_of(tmp_path / "s.tar", good_members(2)), 2)])
    with pytest.raises(ValueError, match=r"on_error='ignore' is not one of \['raise', 'skip'\]"):
        list(read_shard(shardlist, 0, on_error="ignore"))
    with pytest.raises(IndexError, match="shard index 3 is outside"):
        list(read_shard(shardlist, 3))
    with pytest.raises(IndexError, match=r"positions \[1, 3\) are outside shard .*s\.tar \(2 samples"):
        list(read_shard(shardlist, 0, start=1, stop=3))


BAD_SAMPLES = {
    "corrupt image": ([("bad.cls", b"1"), ("bad.png", png(1)[:40])], "do not decode as an image"),
    "no cls": ([("bad.png", png(1))], "has no `cls` member"),
    "cls not an integer": ([("bad.cls", b"cat"), ("bad.png", png(1))], "'cat', not an integer class id"),
    "label outside class map": ([("bad.cls", b"3"), ("bad.png", png(1))], r"label 3, outside the class map \(3 classes"),
    "negative label": ([("bad.cls", b"-1"), ("bad.png", png(1))], "label -1, outside the class map"),
    "no image": ([("bad.cls", b"1"), ("bad.txt", b"hello")], "has no image member"),
    "two images": ([("bad.cls", b"1"), ("bad.jpg", png(1)), ("bad.png", png(1))], "has several images"),
    "duplicate member": ([("bad.cls", b"1"), ("bad.png", png(1)), ("bad.png", png(2))], "has two `png` members"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_raises_naming_shard_and_key_then_skips(tmp_path, case):
    members, message = BAD_SAMPLES[case]
    shard = tar_of(tmp_path / "s.tar", good_members(1) + members + good_members(1, start=2))
    shardlist = listed(tmp_path, [(shard, 3)])
    with pytest.raises(ShardError, match=rf"shard {shard}: sample 'bad' \(position 1\) .*{message}"):
        list(read_shard(shardlist, 0))
    skipped = []
    kept = list(read_shard(shardlist, 0, on_error="skip", skipped=skipped))
    assert [(s.pos, s.key) for s in kept] == [(0, "k0"), (2, "k2")]  # the bad sample still uses position 1
    assert len(skipped) == 1 and skipped[0][:2] == (str(shard), "bad")
    assert re.search(message, skipped[0][2])


def test_duplicate_key_raises_at_its_second_position_and_skip_records_it(tmp_path):
    shard = tar_of(tmp_path / "s.tar", good_members(2) + good_members(1, start=0) + good_members(1, start=3))
    shardlist = listed(tmp_path, [(shard, 4)])
    with pytest.raises(ShardError, match=rf"shard {shard}: sample 'k0' \(position 2\) repeats the key of position 0"):
        list(read_shard(shardlist, 0))
    skipped = []
    kept = list(read_shard(shardlist, 0, start=1, on_error="skip", skipped=skipped))
    assert [s.pos for s in kept] == [1, 3]
    assert skipped == [(str(shard), "k0", "repeats the key of position 0: keys must be unique in a shard")]


def test_skip_records_every_bad_sample_with_stable_positions(tmp_path):
    members = (good_members(1) + [("nolabel.png", png(9))] + good_members(1, start=2)
               + [("broken.cls", b"0"), ("broken.png", b"not a png")] + good_members(1, start=4))
    shard = tar_of(tmp_path / "s.tar", members)
    skipped = []
    kept = list(read_shard(listed(tmp_path, [(shard, 5)]), 0, on_error="skip", skipped=skipped))
    assert [(s.pos, s.key) for s in kept] == [(0, "k0"), (2, "k2"), (4, "k4")]
    assert [(url, key) for url, key, _ in skipped] == [(str(shard), "nolabel"), (str(shard), "broken")]


def test_truncated_tar_raises_even_when_skipping(tmp_path):
    shard = tar_of(tmp_path / "s.tar", good_members(4))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    shardlist = listed(tmp_path, [(shard, 4)])
    for policy in ("raise", "skip"):
        with pytest.raises(ShardError, match=rf"shard {shard} (is truncated or not a tar file|ends after \d samples)"):
            list(read_shard(shardlist, 0, on_error=policy, skipped=[]))


def test_truncated_inside_a_member_names_the_last_key(tmp_path):
    shard = tar_of(tmp_path / "s.tar", good_members(2) + [("big.cls", b"0"), ("big.png", bytes(5000))])
    data = shard.read_bytes()
    shard.write_bytes(data[: data.index(bytes(600))] + bytes(1000))  # cut inside big.png's data
    with pytest.raises(ShardError, match=rf"shard {shard} is truncated or not a tar file \(reading failed after "
                                         r"sample 'big'.*copy it again"):
        list(read_shard(listed(tmp_path, [(shard, 3)]), 0))


def test_not_a_tar_raises(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match=rf"shard {shard} is truncated or not a tar file"):
        list(read_shard(listed(tmp_path, [(shard, 1)]), 0))


def test_empty_shard_raises(tmp_path):
    shard = tar_of(tmp_path / "s.tar", [])
    with pytest.raises(ShardError, match=rf"shard {shard} is empty \(no samples\): remove it and rebuild"):
        list(read_shard(listed(tmp_path, [(shard, 2)]), 0, on_error="skip"))


def test_sample_count_differing_from_the_list_raises(tmp_path):
    shard = tar_of(tmp_path / "s.tar", good_members(4))
    with pytest.raises(ShardError, match=rf"shard {shard} ends after 4 samples \(last key 'k3'\) but .*shardlist.json "
                                         r"lists 5: the shard is truncated or changed.*`make shardlist`"):
        list(read_shard(listed(tmp_path, [(shard, 5)]), 0))
    with pytest.raises(ShardError, match=rf"shard {shard} has more samples than the 3 that .* \(sample 'k3' at "
                                         r"position 3\).*`make shardlist`"):
        list(read_shard(listed(tmp_path, [(shard, 3)]), 0))
    # a range that ends before the extra sample has nothing to complain about
    assert [s.pos for s in read_shard(listed(tmp_path, [(shard, 3)]), 0, stop=2)] == [0, 1]


def test_shard_deleted_after_loading_the_list_raises(tmp_path):
    shard = tar_of(tmp_path / "s.tar", good_members(2))
    shardlist = listed(tmp_path, [(shard, 2)])
    shard.unlink()
    with pytest.raises(ShardError, match=rf"shard {shard} does not exist: .*`make shardlist`"):
        list(read_shard(shardlist, 0, on_error="skip"))


def test_reads_gzipped_shards(tmp_path):
    plain = tar_of(tmp_path / "s.tar", good_members(3))
    zipped = tmp_path / "s.tar.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    assert [s.key for s in read_shard(listed(tmp_path, [(zipped, 3)]), 0)] == ["k0", "k1", "k2"]


# --------------------------------------------------------------------------------------------- planning


def sized(*sizes):
    """A shard list of the given shard sizes; planning never opens the files."""
    return ShardList("sizes.json", ("a",), tuple(ShardEntry(f"s{i}.tar", n, "") for i, n in enumerate(sizes)))


UNEQUAL = sized(7, 30, 1, 16, 23, 5, 40, 2)
COMBOS = [(1, 1, 1), (2, 1, 1), (2, 2, 4), (3, 2, 4), (4, 3, 16), (5, 2, 7), (8, 1, 3), (3, 4, 100), (200, 1, 1)]


def positions(spans):
    return [(s.shard, p) for s in spans for p in range(s.start, s.stop)]


@pytest.mark.parametrize("world,workers,block", COMBOS)
def test_plan_covers_every_sample_exactly_once_with_equal_rank_counts(world, workers, block):
    shardlist = UNEQUAL
    everything = sorted((i, p) for i, e in enumerate(shardlist.shards) for p in range(e.samples))
    per_rank = rank_sample_count(shardlist, world, block)
    for epoch in (0, 1):
        plan = plan_epoch(shardlist, epoch, seed=3, world_size=world, num_workers=workers, block=block)
        assert len(plan) == world and all(len(rank) == workers for rank in plan)
        real = [p for rank in plan for worker in rank for s in worker if not s.padded for p in positions([s])]
        assert sorted(real) == everything  # exactly once
        for rank in plan:
            assert sum(len(positions(w)) for w in rank) == per_rank
            padded = [s for w in rank for s in w if s.padded]
            assert all(s.shard < len(shardlist.shards) and 0 <= s.start < s.stop for s in padded)
            own = len(positions([s for w in rank for s in w if not s.padded]))
            assert abs(own - shardlist.num_samples / world) < block + 1
            for worker in rank:
                assert abs(len(positions(worker)) - per_rank / workers) < block
            for s in (s for w in rank for s in w if not s.padded):  # spans are whole aligned blocks
                assert s.start % block == 0
                assert s.stop % block == 0 or s.stop == shardlist.shards[s.shard].samples


@pytest.mark.parametrize("world,workers,block", COMBOS)
def test_plan_reads_each_shard_as_one_ascending_run_in_a_shuffled_order(world, workers, block):
    plan = plan_epoch(UNEQUAL, 5, seed=0, world_size=world, num_workers=workers, block=block)
    sequence = [p for rank in plan for worker in rank for s in worker if not s.padded for p in positions([s])]
    shard_order = [shard for i, (shard, _) in enumerate(sequence) if i == 0 or sequence[i - 1][0] != shard]
    assert sorted(shard_order) == list(range(len(UNEQUAL.shards)))  # each shard visited in one run
    assert all(b == (a[0], a[1] + 1) for a, b in zip(sequence, sequence[1:]) if a[0] == b[0])


def test_rank_sample_count_matches_distributed_sampler_for_single_samples():
    from torch.utils.data import DistributedSampler

    total = UNEQUAL.num_samples
    for world in (1, 2, 3, 7, 200):
        expected = len(DistributedSampler(range(total), num_replicas=world, rank=0, shuffle=False))
        assert rank_sample_count(UNEQUAL, world, block=1) == expected
    assert rank_sample_count(UNEQUAL, 4, block=16) == min(total, math.ceil(total / 4) + 15)
    assert rank_sample_count(UNEQUAL, 1, block=16) == total


def test_plan_is_deterministic_and_changes_with_epoch_and_seed():
    def order(epoch, seed):
        plan = plan_epoch(UNEQUAL, epoch, seed, world_size=2, num_workers=2, block=4)
        return [positions(worker) for rank in plan for worker in rank]

    assert order(0, 0) == order(0, 0)
    assert order(1, 0) != order(0, 0)
    assert order(0, 1) != order(0, 0)
    assert sorted(sum(order(1, 0), [])) != sum(order(1, 0), [])  # not simply shard order
    spans = plan_epoch(UNEQUAL, 0, 0, world_size=1)[0][0]
    assert spans == [Span(s.shard, 0, UNEQUAL.shards[s.shard].samples) for s in spans]


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world_size=0 must be at least 1"):
        plan_epoch(UNEQUAL, 0, 0, world_size=0)
    with pytest.raises(ValueError, match="block=0 must be at least 1"):
        plan_epoch(UNEQUAL, 0, 0, world_size=1, block=0)
    with pytest.raises(ValueError, match="epoch=-1 must be at least 0"):
        plan_epoch(UNEQUAL, -1, 0, world_size=1)
    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, world_size=2\)"):
        next(iter_epoch(UNEQUAL, 0, 0, rank=2, world_size=2))
    with pytest.raises(ValueError, match=r"worker=1 must lie in \[0, num_workers=1\)"):
        next(iter_epoch(UNEQUAL, 0, 0, rank=0, world_size=1, worker=1))


def test_iter_epoch_over_real_shards_sees_every_sample_once(digits_shards):
    shardlist = load_shardlist(digits_shards / "val" / "shardlist.json")
    reference = {(s.shard, s.pos): (s.key, s.label, s.image)
                 for i in range(len(shardlist.shards)) for s in read_shard(shardlist, i, decode=False)}
    world, workers, block = 2, 2, 8
    seen, per_rank = [], []
    for rank in range(world):
        count = 0
        for worker in range(workers):
            for s in iter_epoch(shardlist, 1, 0, rank, world, worker, workers, block, decode=False):
                assert (s.key, s.label, s.image) == reference[(s.shard, s.pos)]
                count += 1
                if not s.padded:
                    seen.append((s.shard, s.pos))
        per_rank.append(count)
    assert sorted(seen) == sorted(reference)
    assert per_rank == [rank_sample_count(shardlist, world, block)] * world


def test_dataloader_worker_reports_torch_workers():
    import torch

    class Workers(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield dataloader_worker()

    assert dataloader_worker() == (0, 1)
    got = list(torch.utils.data.DataLoader(Workers(), batch_size=None, num_workers=2))
    assert sorted((int(w), int(n)) for w, n in got) == [(0, 2), (1, 2)]


# --------------------------------------------------------------------------------------------- decoding


def _encoded(img: Image.Image, fmt: str, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


def test_decode_image_gives_pils_rgb_pixels_for_every_kind_of_image():
    """Every stage decodes with `decode_image` (simplejpeg's libjpeg-turbo for YCbCr and greyscale JPEGs, PIL
    for the rest): the pixels must be PIL's `Image.open(...).convert("RGB")`, timm's decode, bit for bit."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((133, 97), Image.BICUBIC)
    noisy = Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8))
    cases = {f"jpeg {name} {sub}": _encoded(img, "JPEG", quality=q, subsampling=sub)
             for name, img in (("smooth", smooth), ("noisy", noisy))
             for sub, q in ((0, 95), (1, 90), (2, 75))}  # 4:4:4, 4:2:2, 4:2:0
    cases |= {
        "jpeg progressive": _encoded(smooth, "JPEG", quality=85, progressive=True),
        "jpeg greyscale": _encoded(smooth.convert("L"), "JPEG", quality=90),
        "jpeg cmyk": _encoded(smooth.convert("CMYK"), "JPEG", quality=90),
        "png rgba": _encoded(smooth.convert("RGBA"), "PNG"),
        "png palette": _encoded(smooth.convert("P"), "PNG"),
        "png greyscale": _encoded(smooth.convert("L"), "PNG"),
    }
    for name, data in cases.items():
        got = decode_image(data)
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert got.dtype == np.uint8 and got.shape == want.shape, name
        assert np.array_equal(got, want), name


def test_both_stages_decode_jpegs_with_simplejpeg(tmp_path, monkeypatch):
    """Stage 1 reads its shards with `read_shard` (decoding), the student re-decodes the encoded bytes it keeps
    (`student_data.EncodedImages`): both go through simplejpeg, to the same pixels."""
    import simplejpeg

    from pipeline import reader
    from pipeline.student_data import EncodedImages

    calls, decode_jpeg = [], simplejpeg.decode_jpeg

    def counted(data, *args, **kwargs):
        calls.append(len(data))
        return decode_jpeg(data, *args, **kwargs)

    monkeypatch.setattr(reader.simplejpeg, "decode_jpeg", counted)
    rng = np.random.default_rng(1)
    photos = [_encoded(Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)), "JPEG") for i in range(3)]
    shardlist = listed(tmp_path, [(tar_of(tmp_path / "s.tar", [m for i, p in enumerate(photos)
                                                                for m in ((f"k{i}.cls", b"1"), (f"k{i}.jpg", p))]), 3)])
    stage_1 = [s.image for s in read_shard(shardlist, 0)]
    assert calls == [len(p) for p in photos]
    student = EncodedImages({s.pos: s.image for s in read_shard(shardlist, 0, decode=False)}, "s.tar")
    assert all(np.array_equal(student[pos], pixels) for pos, pixels in enumerate(stage_1))
    assert calls == [len(p) for p in photos] * 2


def test_decode_image_refuses_truncated_and_foreign_bytes_as_pil_does():
    data = _encoded(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    for bad in (data[: len(data) // 2], b"not an image at all"):
        with pytest.raises(OSError):
            decode_image(bad)
