"""Building shards (digits, ImageFolder trees), shard lists for foreign shards, and the CLI."""

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_digits

from terminal import Terminal
from pipeline.cli import main
from pipeline.reader import ShardError, read_shard
from pipeline.shards import (build_shardlist, class_order, class_order_warning, load_class_map, load_shardlist,
                             write_imagefolder)


def all_samples(shardlist, decode=True):
    return [s for i in range(len(shardlist.shards)) for s in read_shard(shardlist, i, decode=decode)]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- digits


def test_digits_counts_classes_and_checksums(digits_shards):
    train = load_shardlist(digits_shards / "train" / "shardlist.json")
    val = load_shardlist(digits_shards / "val" / "shardlist.json")
    assert (train.num_samples, val.num_samples) == (1497, 300)
    assert [s.samples for s in train.shards] == [100] * 14 + [97]
    assert [s.samples for s in val.shards] == [100] * 3
    assert train.classes == val.classes == tuple(str(c) for c in range(10))
    assert json.loads((digits_shards / "class_map.json").read_text()) == {"classes": list(train.classes)}
    for entry in train.shards + val.shards:
        assert hashlib.sha256(Path(entry.url).read_bytes()).hexdigest() == entry.sha256


def test_digits_pixels_labels_and_stratified_split_match_sklearn(digits_shards):
    digits = load_digits()
    splits = {}
    for split in ("train", "val"):
        samples = all_samples(load_shardlist(digits_shards / split / "shardlist.json"))
        splits[split] = [int(s.key.removeprefix("digit")) for s in samples]
        for s, index in zip(samples, splits[split]):
            gray = np.kron(np.round(digits.images[index] * 255 / 16), np.ones((4, 4)))
            assert np.array_equal(np.asarray(s.image), np.repeat(gray[..., None], 3, axis=2).astype(np.uint8))
            assert s.label == digits.target[index]
    assert sorted(splits["train"] + splits["val"]) == list(range(len(digits.target)))  # disjoint, complete
    val_counts = np.bincount(digits.target[splits["val"]], minlength=10)
    assert np.all(np.abs(val_counts - 300 * np.bincount(digits.target) / len(digits.target)) <= 1)  # stratified


def test_digits_rebuild_gives_identical_bytes_and_drops_stale_shards(digits_shards, tmp_path):
    from pipeline.shards import write_digits

    write_digits(tmp_path, shard_size=100)
    assert tree_bytes(tmp_path) == tree_bytes(digits_shards)
    write_digits(tmp_path, shard_size=700)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "shardlist.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s.samples for s in load_shardlist(tmp_path / "train" / "shardlist.json").shards] == [700, 700, 97]


def test_shards_cli_builds_digits_from_a_manifest(tmp_path):
    manifest = tmp_path / "m.yaml"
    root = tmp_path / "digits"
    data = {"train": str(root / "train" / "shardlist.json"), "val": str(root / "val" / "shardlist.json"),
            "shard_size": 1000}
    manifest.write_text(yaml.safe_dump({"data": data}))
    result = CliRunner().invoke(main, ["shards", "--manifest", str(manifest), "--set", "data.shard_size=800"])
    assert result.exit_code == 0, result.output
    assert f"1497 samples in 2 shards, 10 classes -> {data['train']}" in result.output
    assert load_shardlist(data["val"]).num_samples == 300


def test_shards_cli_names_the_manifest_key_to_fix(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"data": {"train": "d/train/shardlist.json", "val": "elsewhere/val.json"}}))
    result = CliRunner().invoke(main, ["shards", "--manifest", str(manifest)])
    assert result.exit_code == 1
    assert "data.val='elsewhere/val.json'" in result.output and "set data.val='d/val/shardlist.json'" in result.output
    manifest.write_text(yaml.safe_dump({"data": {"builtin": "none"}}))
    result = CliRunner().invoke(main, ["shards", "--manifest", str(manifest)])
    assert result.exit_code == 2 and "data.builtin is 'none'" in result.output and "--src/--out" in result.output
    result = CliRunner().invoke(main, ["shards", "--manifest", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "missing.yaml does not exist" in result.output


# --------------------------------------------------------------------------------------------- image folders


def make_tree(root: Path) -> dict[str, tuple[bytes, str]]:
    """A small ImageFolder tree of distinct images; returns {relative path: (bytes, class name)}."""
    rng = np.random.default_rng(0)
    files = {"cat/a.jpg": "JPEG", "cat/b.png": "PNG", "cat/c.d.JPG": "JPEG", "dog/a.jpg": "JPEG",
             "dog/sub/x y.jpeg": "JPEG", "dog/c_d.jpg": "JPEG", "emu/e.webp": "WEBP", "emu/f.png": "PNG",
             "emu/g.png": "PNG", "emu/h.jpg": "JPEG"}
    out = {}
    for relative, fmt in files.items():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(buffer, format=fmt)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(buffer.getvalue())
        out[relative] = (buffer.getvalue(), relative.split("/")[0])
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    return out


def test_imagefolder_passes_bytes_through_with_their_own_suffix(tmp_path):
    source = make_tree(tmp_path / "src")
    shardlist = load_shardlist(write_imagefolder(tmp_path / "src", tmp_path / "out", shard_size=4))
    assert shardlist.classes == ("cat", "dog", "emu")
    assert [s.samples for s in shardlist.shards] == [4, 4, 2]
    by_bytes = {data: (relative, name) for relative, (data, name) in source.items()}
    samples = all_samples(shardlist, decode=False)
    assert sorted(by_bytes[s.image][0] for s in samples) == sorted(source)  # every file once, bytes unchanged
    assert all(shardlist.classes[s.label] == by_bytes[s.image][1] for s in samples)
    assert len({s.key for s in samples}) == len(samples) and not any("." in s.key for s in samples)
    for entry in shardlist.shards:
        with tarfile.open(entry.url) as tar:
            for member in tar.getmembers():
                assert (member.mtime, member.uid, member.gid, member.uname) == (0, 0, 0, "distill")
                key, suffix = member.name.split(".", 1)
                if suffix != "cls":
                    relative = by_bytes[tar.extractfile(member).read()][0]
                    assert suffix == Path(relative).suffix.lower().lstrip(".")
    assert load_class_map(tmp_path / "out" / "class_map.json") == ["cat", "dog", "emu"]


def test_imagefolder_shuffle_is_seeded_and_rebuild_is_byte_identical(tmp_path):
    make_tree(tmp_path / "src")

    def keys(out, seed):
        return [s.key for s in all_samples(load_shardlist(write_imagefolder(tmp_path / "src", out, 3, seed)), False)]

    first = keys(tmp_path / "a", 0)
    assert keys(tmp_path / "b", 0) == first
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert sorted(first) != first  # shuffled, not in folder order
    assert keys(tmp_path / "c", 1) != first and sorted(keys(tmp_path / "c", 1)) == sorted(first)


def test_shards_cli_builds_an_imagefolder_tree(tmp_path):
    make_tree(tmp_path / "src")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["shards", "--src", str(tmp_path / "src"), "--out", str(out), "--shard-size", "3"])
    assert result.exit_code == 0, result.output
    assert f"10 samples in 4 shards, 3 classes -> {out / 'shardlist.json'}" in result.output
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(4)]
    result = CliRunner().invoke(main, ["shards", "--src", str(tmp_path / "src")])
    assert result.exit_code == 2 and "--src needs --out" in result.output


def test_imagefolder_bad_sources_say_what_to_fix(tmp_path):
    with pytest.raises(ShardError, match=r"source .*nowhere is not a directory: pass --src an ImageFolder tree"):
        write_imagefolder(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ShardError, match=r"source .*flat is not an ImageFolder tree .*src/<class>/<image>"):
        write_imagefolder(tmp_path / "flat", tmp_path / "out")
    make_tree(tmp_path / "src")
    Image.new("RGB", (2, 2)).save(tmp_path / "src" / "dog" / "z.bmp")
    with pytest.raises(ShardError, match=r"has 1 images in formats the shards do not carry, e.g. .*dog/z\.bmp: convert"):
        write_imagefolder(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "dog" / "z.bmp").unlink()
    (tmp_path / "src" / "emu" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ShardError, match=r"source image .*emu/broken\.png does not open as an image .*replace or delete"):
        write_imagefolder(tmp_path / "src", tmp_path / "out")


# --------------------------------------------------------------------------------------------- foreign shards


def gnu_tar(directory: Path, tar_path: Path, names: list[str]) -> Path:
    subprocess.run(["tar", "--sort=name", "--format=gnu", "-cf", str(tar_path), "-C", str(directory), *names],
                   check=True)
    return tar_path


def make_plain_dir(directory: Path, keys: list[str], labels: list[int]) -> None:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True)
    for key, label in zip(keys, labels):
        Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(directory / f"{key}.jpg", quality=95)
        (directory / f"{key}.cls").write_text(f"{label}\n")


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_gnu_tar_shards_are_listed_and_read_back(tmp_path):
    plain = tmp_path / "plain"
    keys = [f"img{i:03d}" for i in range(7)]
    labels = [3, 0, 4, 1, 4, 2, 0]
    make_plain_dir(plain, keys, labels)
    shards = tmp_path / "shards"
    shards.mkdir()
    gnu_tar(plain, shards / "a.tar", [f"{k}.{s}" for k in keys[:4] for s in ("cls", "jpg")])
    gnu_tar(plain, shards / "b.tar", [f"{k}.{s}" for k in keys[4:] for s in ("cls", "jpg")])

    listing = build_shardlist([shards / "a.tar", shards / "b.tar"], out=tmp_path / "list.json")
    assert listing["classes"] == ["0", "1", "2", "3", "4"]
    assert [(e["url"], e["samples"]) for e in listing["shards"]] == [("shards/a.tar", 4), ("shards/b.tar", 3)]
    assert listing["shards"][1]["sha256"] == hashlib.sha256((shards / "b.tar").read_bytes()).hexdigest()

    samples = all_samples(load_shardlist(tmp_path / "list.json"))
    assert [(s.key, s.label) for s in samples] == list(zip(keys, labels))
    for s in samples:
        with Image.open(plain / f"{s.key}.jpg") as source:
            assert np.array_equal(np.asarray(s.image), np.asarray(source.convert("RGB")))

    result = CliRunner().invoke(main, ["shardlist", str(shards / "*.tar")])
    assert result.exit_code == 0, result.output
    assert "7 samples in 2 shards, 5 classes" in result.output
    written = json.loads((shards / "shardlist.json").read_text())
    assert [e["url"] for e in written["shards"]] == ["a.tar", "b.tar"]
    assert [e["sha256"] for e in written["shards"]] == [e["sha256"] for e in listing["shards"]]

    (tmp_path / "names.json").write_text(json.dumps({"classes": ["zero", "one", "two", "three", "four", "five"]}))
    result = CliRunner().invoke(main, ["shardlist", "--out", str(tmp_path / "named.json"), "--class-map",
                                       str(tmp_path / "names.json"), str(shards / "{a,b}.tar")])
    assert result.exit_code == 0, result.output
    assert load_shardlist(tmp_path / "named.json").classes[4] == "four"


def test_build_shardlist_errors_name_the_shard(tmp_path):
    make_plain_dir(tmp_path / "plain", ["k0", "k1"], [0, 7])
    shard = gnu_tar(tmp_path / "plain", tmp_path / "s.tar", ["k0.cls", "k0.jpg", "k1.cls", "k1.jpg"])
    with pytest.raises(ShardError, match=rf"shard {shard}: sample 'k1' has label 7, outside the 3 given classes"):
        build_shardlist([shard], classes=["a", "b", "c"])
    with pytest.raises(ShardError, match=rf"shard {tmp_path / 'gone.tar'} does not exist"):
        build_shardlist([tmp_path / "gone.tar"])
    with pytest.raises(ShardError, match=rf"shard {shard} is given twice"):
        build_shardlist([shard, shard])
    with pytest.raises(ShardError, match="no shards given"):
        build_shardlist([])
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(ShardError, match=rf"shard {empty} is empty \(no samples\)"):
        build_shardlist([shard, empty])
    unlabelled = gnu_tar(tmp_path / "plain", tmp_path / "u.tar", ["k0.jpg", "k1.jpg"])
    with pytest.raises(ShardError, match=rf"no sample in {unlabelled}... has an integer `cls`.*--class-map"):
        build_shardlist([unlabelled])
    negative = tmp_path / "negative.tar"
    with tarfile.open(negative, "w") as tar:
        for name, data in (("k0.cls", b"1"), ("k0.jpg", b"x"), ("k1.cls", b"-2"), ("k1.jpg", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match=rf"shard {negative}: sample 'k1' has label -2; class ids are 0 or more"):
        build_shardlist([negative])
    result = CliRunner().invoke(main, ["shardlist", str(tmp_path / "nothing-*.tar")])
    assert result.exit_code == 1 and "no file matches" in result.output and "nothing-*.tar" in result.output
    (tmp_path / "other").mkdir()
    shutil.copy(shard, tmp_path / "other" / "t.tar")
    result = CliRunner().invoke(main, ["shardlist", str(shard), str(tmp_path / "other" / "t.tar")])
    assert result.exit_code == 2 and "several directories" in result.output


def test_load_shardlist_errors_say_how_to_rebuild(tmp_path, digits_shards):
    with pytest.raises(ShardError, match=r"shard list .*absent\.json does not exist: rebuild it with `make shards`"):
        load_shardlist(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ShardError, match=r"bad\.json is not valid JSON"):
        load_shardlist(bad)
    bad.write_text(json.dumps({"format": "other/2", "classes": ["a"], "shards": []}))
    with pytest.raises(ShardError, match=r"has format 'other/2', not 'distill-shardlist/1'"):
        load_shardlist(bad)
    bad.write_text(json.dumps({"format": "distill-shardlist/1", "classes": [], "shards": []}))
    with pytest.raises(ShardError, match=r"`classes` must be a non-empty list"):
        load_shardlist(bad)
    bad.write_text(json.dumps({"format": "distill-shardlist/1", "classes": ["a"],
                               "shards": [{"url": "x.tar", "samples": 0, "sha256": ""}]}))
    with pytest.raises(ShardError, match=r"shards\[0\] = .* needs a url, samples >= 1 and a sha256"):
        load_shardlist(bad)

    copy = tmp_path / "val"
    shutil.copytree(digits_shards / "val", copy)
    (copy / "val-000001.tar").unlink()
    with pytest.raises(ShardError, match=rf"shard list {copy / 'shardlist.json'} lists shard {copy / 'val-000001.tar'}, "
                                         r"which does not exist: .*`make shardlist`"):
        load_shardlist(copy / "shardlist.json")


def test_load_class_map_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(["x", "y"]))
    assert load_class_map(path) == ["x", "y"]
    path.write_text(json.dumps({"names": ["x"]}))
    with pytest.raises(ShardError, match=r"class map .*c\.json has no list of class names"):
        load_class_map(path)


def test_shard_size_must_be_positive(tmp_path):
    from pipeline.shards import write_digits

    with pytest.raises(ValueError, match="shard_size=0 must be at least 1"):
        write_digits(tmp_path, shard_size=0)


def write_labelled_shard(path: Path, labels: list[int]) -> Path:
    """A shard of tiny PNGs with the given labels, in that order."""
    from webdataset import TarWriter

    rng = np.random.default_rng(0)
    with TarWriter(str(path)) as sink:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"s{i:05d}", "png": buf.getvalue(), "cls": str(label).encode()})
    return path


def test_class_order_statistics_match_a_direct_count():
    rng = np.random.default_rng(3)
    for labels in ([0] * 5 + [1] * 3 + [None] + [1, 2, 2], list(rng.integers(0, 4, 200))):
        same, shuffled, longest = class_order(labels, 4)
        pairs = list(zip(labels, labels[1:]))
        assert same == sum(a == b and b is not None for a, b in pairs) / len(pairs)
        counts = [sum(x == c for x in labels) for c in range(4)]
        assert shuffled == pytest.approx(sum((n / sum(counts)) ** 2 for n in counts))
        runs, run = [], 1
        for a, b in pairs:
            run = run + 1 if a == b and b is not None else 1
            runs.append(run)
        assert longest == max(runs)


def test_shards_written_in_class_order_are_warned_about_with_the_fix(tmp_path):
    classes = 10
    rng = np.random.default_rng(0)
    shuffled = [write_labelled_shard(tmp_path / f"mixed-{i}.tar", list(rng.integers(0, classes, 200))) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shuffled shard raises no warning
        build_shardlist(shuffled)
    ordered = [write_labelled_shard(tmp_path / f"sorted-{i}.tar", sorted(rng.integers(0, classes, 200)))
               for i in range(2)]
    with pytest.warns(UserWarning, match=r"sorted-0\.tar looks written in class order.*make shards SRC=.*"
                                         r"\(2 of 4 shards look like this\)"):
        build_shardlist(shuffled + ordered)
    # a shard holding one class of many (an ImageFolder dump cut in order) is the worst case
    assert class_order_warning("one.tar", [7] * 50, classes) is not None
    assert class_order_warning("few.tar", [7] * 10, classes) is None  # shorter than a mix window
    assert class_order_warning("binary.tar", list(rng.integers(0, 2, 300)), 2) is None


def test_teacher_cache_warns_about_a_class_ordered_first_shard_before_loading_the_teacher(tmp_path, monkeypatch):
    from pipeline import teacher_cache
    from pipeline.manifest_loader import load

    ordered = [write_labelled_shard(tmp_path / f"sorted-{i}.tar", [i * 5 + j // 20 for j in range(100)])
               for i in range(2)]
    for shards, name in ((ordered, "train.json"), (ordered[1:], "val.json")):
        with pytest.warns(UserWarning, match="looks written in class order"):
            build_shardlist(shards, tmp_path / name, classes=[str(c) for c in range(10)])

    class Stop(Exception):
        pass

    def no_teacher(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(teacher_cache, "load_teacher", no_teacher)
    m = load("manifests/tiny.yaml", [f"data.train={tmp_path / 'train.json'}", f"data.val={tmp_path / 'val.json'}",
                                     f"cache.path={tmp_path / 'cache'}"])
    with pytest.warns(UserWarning, match=r"sorted-0\.tar looks written in class order: 96% of neighbouring samples "
                                         r"share a label .* runs 20 samples in a row"), pytest.raises(Stop):
        teacher_cache.run(m, progress=False)

def test_adjacent_samples_sharing_a_key_are_refused_not_merged(tmp_path):
    """Ten samples where the 5th and 6th share a key: webdataset's grouping would read nine. The list refuses
    the shard, naming it and the key, instead of counting nine."""
    shard = tmp_path / "dup.tar"
    keys = [f"k{i}" for i in range(10)]
    keys[5] = keys[4]
    with tarfile.open(shard, "w") as tar:
        for i, key in enumerate(keys):
            for suffix, data in (("cls", str(i % 3).encode()), ("jpg", _jpeg(i))):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert len(keys) == 10 and len(set(keys)) == 9
    with pytest.raises(ShardError, match=rf"shard {shard}: sample 'k4' \(position 4\) has two `cls` members: "
                                         r"two samples in a row share the key 'k4'"):
        build_shardlist([shard])
    result = CliRunner().invoke(main, ["shardlist", str(shard)])
    assert result.exit_code == 1 and "share the key 'k4'" in result.output and "Traceback" not in result.output


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed * 20, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("terminal, progress, shown", [(True, True, True), (True, False, False), (False, True, False)])
def test_sharding_shows_a_bar_on_a_terminal_only(tmp_path, monkeypatch, terminal, progress, shown):
    make_tree(tmp_path / "src")
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    write_imagefolder(tmp_path / "src", tmp_path / "out", 3, progress=progress)
    assert ("shards: 100%" in err.getvalue() and "10/10" in err.getvalue()) is shown
    assert shown or err.getvalue() == ""
