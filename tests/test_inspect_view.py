"""inspect-view: the PNG holds exactly the view the teacher saw (re-rendered here independently and checked
against the stored digest), the printout holds the teacher's top-K, and bad requests say what to do."""

import re
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from pipeline import views
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist
from stages.inspect_view import inspect_view
from tiny import BAD

torch.set_num_threads(1)

EPOCH, SHARD, POS = 1, 2, 5


def _invoke(tiny_cache, *args, cache_path=None, sets=()):
    argv = ["--manifest", "manifests/tiny.yaml"]
    for override in tiny_cache.manifest_overrides() + list(sets):
        argv += ["--set", override]
    argv += ["--cache", str(cache_path or tiny_cache.cache_path), *map(str, args)]
    return CliRunner().invoke(inspect_view, argv)


def _rerender(tiny_cache, raw, size):
    m = tiny_cache.manifest()
    params = views.decode_params(raw["train"]["view"][EPOCH, SHARD])
    samples = {s.pos: s for s in read_shard(load_shardlist(m.data.train), SHARD)}
    partner, _ = views.mix_target(params[POS])
    return views.render(samples[POS].image, params[POS], size, m.views, partner_image=samples[partner].image,
                        partner_params=params[partner]), samples[POS], samples[partner]


def test_png_is_the_teachers_view_and_the_top_k_is_printed(tiny_cache, tmp_path):
    result = _invoke(tiny_cache, "--epoch", EPOCH, "--shard", SHARD, "--pos", POS, "--student-size", 8,
                     "--out", tmp_path)
    assert result.exit_code == 0, result.output
    raw = zarr.open_group(str(tiny_cache.cache_path), mode="r")
    teacher_png = tmp_path / f"view-e{EPOCH}-s{SHARD}-p{POS}-teacher-16px.png"
    pixels = np.array(Image.open(teacher_png))
    expected, sample, partner = _rerender(tiny_cache, raw, 16)
    np.testing.assert_array_equal(pixels, expected)
    assert (views.view_digest(pixels) or 1) == int(raw["train"]["digest"][EPOCH, SHARD, POS])
    student = np.array(Image.open(tmp_path / f"view-e{EPOCH}-s{SHARD}-p{POS}-student-8px.png"))
    np.testing.assert_array_equal(student, _rerender(tiny_cache, raw, 8)[0])

    out = result.output
    assert f"sample {sample.key!r} (label {sample.label}, mixed with {partner.key!r})" in out
    assert "matches the stored one: this is exactly the view the teacher saw" in out
    assert re.search(r"mix: \{\"mode\": \"(mixup|cutmix)\", \"partner\": %d" % partner.pos, out)
    logits = raw["train"]["topk_logprobs"][EPOCH, SHARD, POS].astype(np.float64)
    ids = raw["train"]["topk_ids"][EPOCH, SHARD, POS]
    probs = np.exp(logits)
    lines = [line for line in out.splitlines() if re.match(r"\s+\d+\. class", line)]
    assert len(lines) == len(ids) == 10
    for line, class_id, logit, prob in zip(lines, ids, logits, probs):
        assert re.search(rf"class\s+{class_id} {class_id}\s+log p\s+{logit:.4f}\s+p {prob:.4f}", line), line


def test_a_digest_mismatch_is_reported(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache_path, copy)
    zarr.open_group(str(copy), mode="r+")["train"]["digest"][EPOCH, SHARD, POS] = 12345
    result = _invoke(tiny_cache, "--epoch", EPOCH, "--shard", SHARD, "--pos", POS, "--out", tmp_path / "out",
                     cache_path=copy)
    assert result.exit_code == 1
    assert "differs from the stored 0x0000000000003039: the PNG is NOT the view the teacher saw" in result.output
    assert (tmp_path / "out" / f"view-e{EPOCH}-s{SHARD}-p{POS}-teacher-16px.png").is_file()


@pytest.mark.parametrize("where, message", [
    ((0, 0, 40), r"position 40 is outside train shard 0 \(40 samples, positions 0..39\)"),
    ((2, 0, 0), r"epoch 2 is outside the cache's 2 epochs \(0..1\)"),
    ((0, 3, 0), r"shard 3 is outside the cache's 3 train shards \(0..2\)"),
    ((0, *BAD), r"cache epoch 0, shard 1, position 3 holds no view: the sample was skipped as bad"),
])
def test_bad_requests_say_what_to_do(tiny_cache, tmp_path, where, message):
    epoch, shard, pos = where
    result = _invoke(tiny_cache, "--epoch", epoch, "--shard", shard, "--pos", pos, "--out", tmp_path)
    assert result.exit_code == 1
    assert re.search(message, result.output), result.output


def test_other_shards_and_incomplete_units_are_refused(tiny_cache, tmp_path):
    result = _invoke(tiny_cache, "--epoch", 0, "--shard", 0, "--pos", 0, "--out", tmp_path,
                     sets=[f"data.train={tiny_cache.val}"])
    assert result.exit_code == 1
    assert re.search(r"train shard 0 of .*val/shardlist.json is part-000000.tar \(20 samples, .*but the cache was "
                     r"built from part-000000.tar \(40 samples.*pass the manifest whose data.train", result.output)
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache_path, copy)
    zarr.open_group(str(copy), mode="r+")["train"]["done"][1, 2] = 0
    result = _invoke(tiny_cache, "--epoch", 1, "--shard", 2, "--pos", 0, "--out", tmp_path, cache_path=copy)
    assert result.exit_code == 1
    assert ("train unit (epoch 1, shard group 2, shards [2]) is not complete: resume `make teacher-cache`"
            in result.output)
