"""Data as WebDataset URLs: brace patterns, globs, lists, file://, pipe: (opt-in only), timm's _info.json; the
scan kept beside the cache and reused; checksums checked on every whole-shard read, in stage 1 and stage 2."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

import fault_script
from pipeline import storage
from pipeline.manifest_loader import load
from pipeline.reader import ShardError, read_shard
from pipeline.shards import data_shardlist, load_shardlist
from pipeline.teacher_cache import run as fill_cache

TINY = "manifests/tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("storage")
    fault_script.tiny_overrides(work)  # shards/{train,val}/part-NNNNNN.tar + shardlist.json, teacher.pt
    return work


def _overrides(work, tmp_path, train, val=None):
    val = val if val is not None else str(work / "shards" / "val" / "part-{000000..000001}.tar")
    return [f"data.train={json.dumps(train)}", f"data.val={json.dumps(val)}", f"teacher.checkpoint={work / 'teacher.pt'}",
            "cache.batch_size=4", "cache.device=cpu", f"cache.path={tmp_path / 'cache'}"]


def _expected(work, split="train"):
    """The project's own shard list of the same shards: counts and sha256 computed independently."""
    listing = load_shardlist(work / "shards" / split / "shardlist.json")
    return [(Path(s.url).name, s.samples, hashlib.sha256(Path(s.url).read_bytes()).hexdigest()) for s in listing.shards]


def _entries(shardlist):
    return [(Path(s.url).name, s.samples, s.sha256) for s in shardlist.shards]


def test_brace_glob_list_and_file_urls_name_the_same_shards(work, tmp_path):
    train = work / "shards" / "train"
    specs = [str(train / "part-{000000..000005}.tar"), str(train / "part-*.tar"), f"file://{train}/part-0000*.tar",
             [str(train / f"part-{i:06d}.tar") for i in range(6)]]
    for i, spec in enumerate(specs):
        m = load(TINY, _overrides(work, tmp_path / str(i), spec))
        shardlist = data_shardlist(m, "train")
        assert _entries(shardlist) == _expected(work), spec
        assert shardlist.classes == tuple(str(c) for c in range(10))
        kept = json.loads((tmp_path / str(i) / "cache.shards" / "train.json").read_text())
        assert kept["source"]["spec"] == spec  # kept beside the cache, with the spec it was made from


def test_the_scan_is_kept_and_not_repeated(work, tmp_path, monkeypatch):
    m = load(TINY, _overrides(work, tmp_path, str(work / "shards" / "train" / "part-*.tar")))
    first = data_shardlist(m, "train")
    import pipeline.shards

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    monkeypatch.setattr(pipeline.shards, "scan_shard", no_scan)
    assert data_shardlist(m, "train") == first
    other = load(TINY, _overrides(work, tmp_path, str(work / "shards" / "train" / "part-00000[0-2].tar")))
    with pytest.raises(AssertionError, match="scanned again"):  # another spec: another scan
        data_shardlist(other, "train")


def test_pipe_urls_need_an_explicit_opt_in(work, tmp_path, monkeypatch):
    monkeypatch.delenv(storage.PIPE_ENV, raising=False)
    spec = f"pipe:cat {work / 'shards' / 'train'}/part-{{000000..000005}}.tar"
    m = load(TINY, _overrides(work, tmp_path, spec))
    with pytest.raises(ShardError, match=re.escape("is a `pipe:` URL, which runs a shell command: if you trust the "
                                                   "command, allow it with `data.allow_pipe: true` in the manifest "
                                                   f"(or {storage.PIPE_ENV}=1 in the environment)")):
        data_shardlist(m, "train")
    assert not (tmp_path / "cache.shards").exists()
    allowed = load(TINY, _overrides(work, tmp_path, spec) + ["data.allow_pipe=true"])
    shardlist = data_shardlist(allowed, "train")
    assert [(s.samples, s.sha256) for s in shardlist.shards] == [(n, sha) for _, n, sha in _expected(work)]
    assert len(list(read_shard(shardlist, 2))) == 8


def test_a_directory_with_timms_info_json(work, tmp_path):
    data = tmp_path / "imagenet-wds"
    shutil.copytree(work / "shards" / "train", data)
    for path in (work / "shards" / "val").glob("*.tar"):
        shutil.copy(path, data / f"val-{path.name}")
    train, val = _expected(work), _expected(work, "val")
    info = {"name": "tiny", "splits": {
        "train": {"name": "train", "num_samples": sum(n for _, n, _ in train),
                  "filenames": [f for f, _, _ in train], "shard_lengths": [n for _, n, _ in train]},
        "validation": {"name": "validation", "num_samples": sum(n for _, n, _ in val),
                       "filenames": [f"val-{f}" for f, _, _ in val], "shard_lengths": [n for _, n, _ in val]}}}
    (data / "_info.json").write_text(json.dumps(info))
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [str(c) for c in range(10)]}))
    m = load(TINY, _overrides(work, tmp_path, str(data), str(data)) + [f"data.class_map={tmp_path / 'classes.json'}"])
    assert _entries(data_shardlist(m, "train")) == train
    assert _entries(data_shardlist(m, "val")) == [(f"val-{f}", n, sha) for f, n, sha in val]
    bare = load(TINY, _overrides(work, tmp_path / "bare", str(data)))
    with pytest.raises(ShardError, match=r"takes its counts from _info\.json, which names no classes: set data\.class_map"):
        data_shardlist(bare, "train")


def test_a_shard_replaced_after_listing_stops_stage_1_and_stage_2(work, tmp_path):
    """Same sample count, other bytes: the recorded sha256 no longer matches; both stages name the shard, both
    hashes and the fix."""
    data = tmp_path / "data"
    shutil.copytree(work / "shards", data)
    spec = str(data / "train" / "part-{000000..000005}.tar")
    m = load(TINY, _overrides(work, tmp_path, spec, str(data / "val" / "part-*.tar")) + ["cache.epochs=1"])
    fill_cache(m, progress=False)
    recorded = data_shardlist(m, "train").shards[1].sha256
    replaced = data / "train" / "part-000001.tar"
    fault_script.write_tiny_shards(tmp_path / "other", (6,), 500)  # 6 other digits, like part-000001's 6
    shutil.copy(tmp_path / "other" / "part-000000.tar", replaced)
    now = hashlib.sha256(replaced.read_bytes()).hexdigest()
    message = re.escape(f"shard {replaced} has sha256 {now}, but {recorded} was recorded when the shards were listed: "
                        f"the shard changed since. Restore the original shard")
    with pytest.raises(ShardError, match=message):
        fill_cache(load(TINY, _overrides(work, tmp_path, spec, str(data / "val" / "part-*.tar"))
                        + ["cache.epochs=2"]), progress=False)
    from pipeline.train import train

    with pytest.raises(ShardError, match=message):
        train(load(TINY, _overrides(work, tmp_path, spec, str(data / "val" / "part-*.tar"))
                   + ["cache.epochs=1", "student.epochs=1", f"student.run_dir={tmp_path / 'run'}", "student.device=cpu",
                      "student.shuffle_buffer=4"]), progress=False)


def test_a_missing_shard_in_a_brace_pattern_is_named(work, tmp_path):
    spec = str(work / "shards" / "train" / "part-{000000..000006}.tar")  # one shard more than there are
    m = load(TINY, _overrides(work, tmp_path, spec))
    with pytest.raises(ShardError, match=re.escape(f"shard {work / 'shards' / 'train' / 'part-000006.tar'} does not "
                                                   f"exist")):
        data_shardlist(m, "train")
    assert not (tmp_path / "cache.shards").exists()


def test_http_urls_through_fsspec(work, tmp_path):
    """Shards served over HTTP by a server on 127.0.0.1: listed and read as local ones are."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(work / "shards"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        m = load(TINY, _overrides(work, tmp_path, f"{base}/train/part-{{000000..000005}}.tar"))
        shardlist = data_shardlist(m, "train")
        assert _entries(shardlist) == _expected(work)
        assert shardlist.shards[0].url == f"{base}/train/part-000000.tar"
        local = load_shardlist(work / "shards" / "train" / "shardlist.json")
        for i in range(len(shardlist.shards)):
            got = [(s.key, s.label, s.image.tobytes()) for s in read_shard(shardlist, i)]
            assert got == [(s.key, s.label, s.image.tobytes()) for s in read_shard(local, i)]
    finally:
        server.shutdown()
        server.server_close()
