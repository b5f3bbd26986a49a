"""The Fashion-MNIST reader against IDX bytes written here by hand (struct, not numpy), and its shards."""

import gzip
import struct

import numpy as np
import pytest

from pipeline import fashion_mnist as fm
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist


def idx_bytes(type_code: int, fmt: str, shape: tuple[int, ...], values: list) -> bytes:
    """An IDX file built from the format's definition: 0 0 type ndim, big-endian sizes, big-endian values."""
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + struct.pack(f">{len(values)}{fmt}", *values)


def write_fake_set(directory, n_train=80, n_test=30, seed=0, gzipped=True):
    """The four standard files with random 28x28 images; returns {split: (images, labels)} as written."""
    rng = np.random.default_rng(seed)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = np.arange(n) % 10
        image_name, label_name = fm.FILES[split]
        for name, data in ((image_name, idx_bytes(0x08, "B", (n, 28, 28), images.ravel().tolist())),
                           (label_name, idx_bytes(0x08, "B", (n,), labels.tolist()))):
            if gzipped:
                (directory / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)
        truth[split] = (images, labels)
    return truth


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_gives_the_values_and_shape_of_the_bytes(tmp_path, compress):
    values = [1, -2, 300, -40000, 7, 8]
    data = idx_bytes(0x0C, "i", (2, 3), values)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    got = fm.read_idx(path)
    assert got.shape == (2, 3)
    assert got.ravel().tolist() == values
    floats = idx_bytes(0x0D, "f", (4,), [0.5, -1.25, 3.0, 1e-3])
    path.write_bytes(floats)
    assert fm.read_idx(path).tolist() == list(struct.unpack(">4f", floats[8:]))


def test_read_idx_names_the_file_when_it_is_truncated_or_not_idx(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(idx_bytes(0x08, "B", (2, 2, 2), list(range(8)))[:-1])
    with pytest.raises(fm.FashionMNISTError, match=r"bad-idx3-ubyte.*shape \(2, 2, 2\).*truncated"):
        fm.read_idx(path)
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(fm.FashionMNISTError, match="bad-idx3-ubyte is not an IDX file"):
        fm.read_idx(path)


def test_the_installed_files_match_their_raw_bytes():
    """Debian's files (when installed): the header's sizes and the first and last image are the raw bytes."""
    if not (fm.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{fm.DEBIAN_PACKAGE} is not installed")
    raw = gzip.decompress((fm.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert struct.unpack(">4B3I", raw[:16]) == (0, 0, 8, 3, 10000, 28, 28)
    images, labels = fm.load("test", fm.DEBIAN_DIR)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert images[0].tobytes() == raw[16:16 + 784]
    assert images[-1].tobytes() == raw[-784:]
    raw_labels = gzip.decompress((fm.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert labels.tolist() == list(raw_labels[8:])
    assert np.bincount(labels).tolist() == [1000] * 10


def test_missing_files_name_both_ways_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(fm.FashionMNISTError, match=r"FASHION_MNIST_DIR=.*nowhere is not a directory") as e:
        fm.load("train")
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "train-images-idx3-ubyte.gz" in str(e.value)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    with pytest.raises(fm.FashionMNISTError, match=r"has no train-images-idx3-ubyte\.gz.*apt-get install.*FASHION_MNIST_DIR"):
        fm.load("train")


def test_mismatched_image_and_label_files_are_named(tmp_path):
    write_fake_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(0x08, "B", (3,), [0, 1, 2])))
    with pytest.raises(fm.FashionMNISTError, match="t10k-labels-idx1-ubyte.gz.*does not match"):
        fm.load("test", tmp_path)


@pytest.mark.parametrize("gzipped", [True, False])
def test_shards_hold_disjoint_splits_with_the_original_pixels(tmp_path, monkeypatch, gzipped):
    source = tmp_path / "src"
    source.mkdir()
    truth = write_fake_set(source, gzipped=gzipped)
    monkeypatch.setenv(fm.ENV_VAR, str(source))
    paths = fm.write_fashion_mnist(tmp_path / "out", shard_size=16, train_size=40, val_size=20, seed=3)
    keys = {}
    for split, path in paths.items():
        shardlist = load_shardlist(path)
        assert list(shardlist.classes) == fm.CLASSES
        keys[split] = []
        for shard in range(len(shardlist.shards)):
            for sample in read_shard(shardlist, shard):
                source_split = "test" if split == "test" else "train"
                index = int(sample.key.removeprefix(source_split))
                images, labels = truth[source_split]
                assert sample.label == labels[index]
                pixels = np.asarray(sample.image)
                assert pixels.shape == (28, 28, 3) and (pixels == images[index][..., None]).all()
                keys[split].append(sample.key)
    assert len(keys["train"]) == 40 and len(keys["val"]) == 20 and len(keys["test"]) == 30
    assert not set(keys["train"]) & set(keys["val"])
    assert np.bincount([int(k[5:]) % 10 for k in keys["val"]]).tolist() == [2] * 10  # stratified
    again = fm.write_fashion_mnist(tmp_path / "again", shard_size=16, train_size=40, val_size=20, seed=3)
    assert all(load_shardlist(again[s]).shards[0].sha256 == load_shardlist(paths[s]).shards[0].sha256 for s in paths)


def test_the_shards_command_builds_the_builtin_or_says_how_to_get_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stages.shards import shards

    data = tmp_path / "data"
    args = ["--manifest", "manifests/demo.yaml", "--set", "data.train_size=30", "--set", "data.val_size=20"]
    for split in ("train", "val", "test"):
        args += ["--set", f"data.{split}={data / split / 'shardlist.json'}"]
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "missing"))
    outcome = CliRunner().invoke(shards, args)
    assert outcome.exit_code == 1 and "Traceback" not in outcome.output
    assert "apt-get install dataset-fashion-mnist" in outcome.output and "FASHION_MNIST_DIR" in outcome.output
    source = tmp_path / "src"
    source.mkdir()
    write_fake_set(source)
    monkeypatch.setenv(fm.ENV_VAR, str(source))
    outcome = CliRunner().invoke(shards, args)
    assert outcome.exit_code == 0, outcome.output
    assert [load_shardlist(data / s / "shardlist.json").num_samples for s in ("train", "val", "test")] == [30, 20, 30]
