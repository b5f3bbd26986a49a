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

from pipeline import cache, views
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
    logits = cache.decode_answers(raw["train"]["topk_logratios"][EPOCH, SHARD, POS],
                                  raw["train"]["leftover_logit"][EPOCH, SHARD, POS])[0].astype(np.float64)
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
    assert ("train unit (epoch 1, shard group 2, shards [2]) is not complete: resume `make teacher-cache "
            "MANIFEST=manifests/tiny.yaml SET='data.train=" in result.output)  # the user's manifest and overrides


def test_outputs_go_next_to_the_cache_and_leave_its_size_alone(tiny_cache, tmp_path):
    from pipeline import cache

    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache.cache_path, copy)

    def files():
        return {str(p.relative_to(copy)): p.stat().st_size for p in copy.rglob("*") if p.is_file()}

    before, size = files(), cache.disk_usage(str(copy))
    result = _invoke(tiny_cache, "--epoch", EPOCH, "--shard", SHARD, "--pos", POS, cache_path=copy)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache-views" / f"view-e{EPOCH}-s{SHARD}-p{POS}-teacher-16px.png").is_file()
    assert files() == before and cache.disk_usage(str(copy)) == size


def _first_position(raw, epoch, shard, want):
    for pos, params in enumerate(views.decode_params(raw["train"]["view"][epoch, shard])):
        if raw["train"]["digest"][epoch, shard, pos] and want(views.describe(params)):
            return pos
    raise AssertionError("the tiny cache has no such view")


def test_the_figure_shows_boxes_views_ops_and_the_top_k_read_independently(tiny_cache, tmp_path):
    """Every element of the figure, checked against the raw Zarr arrays decoded here."""
    from matplotlib.patches import Rectangle

    from pipeline.inspect_view import figure, inspect

    raw = zarr.open_group(str(tiny_cache.cache_path), mode="r")
    pos = _first_position(raw, 0, 0, lambda d: d["mix"] and d["mix"]["mode"] == "cutmix" and d["erase"])
    m = tiny_cache.manifest()
    view = inspect(tiny_cache.open(), load_shardlist(m.data.train), 0, 0, pos, student_size=8)
    fig = figure(view, "caches/tiny")
    params = views.decode_params(raw["train"]["view"][0, 0])
    d = views.describe(params[pos])
    partner = d["mix"]["partner"]
    samples = {s.pos: s for s in read_shard(load_shardlist(m.data.train), 0)}
    source, partner_source = samples[pos].image, samples[partner].image  # decoded (H, W, 3) RGB pixels

    suptitle = fig.get_suptitle()
    assert all(f in suptitle for f in ("caches/tiny", "epoch 0", "shard 0", f"position {pos}", samples[pos].key))
    source_ax, partner_ax, teacher_ax, student_ax, text_ax, bars_ax = fig.axes

    def boxes(ax):
        return [(r.get_x(), r.get_y(), r.get_width(), r.get_height(), r.get_edgecolor()[:3])
                for r in ax.patches if isinstance(r, Rectangle)]

    def expected_box(box, scale):  # a pixel box drawn `scale` times enlarged, pixel edges at -0.5
        return pytest.approx((box[0] * scale - 0.5, box[1] * scale - 0.5, (box[2] - box[0]) * scale,
                              (box[3] - box[1]) * scale))

    np.testing.assert_array_equal(source_ax.images[0].get_array(), np.asarray(source))
    assert [b[:4] for b in boxes(source_ax)] == [expected_box(d["crop"]["box"], 1)]  # pixels of the source
    pd = views.describe(params[partner])
    np.testing.assert_array_equal(partner_ax.images[0].get_array(), np.asarray(partner_source))
    assert [b[:4] for b in boxes(partner_ax)] == [expected_box(pd["crop"]["box"], 1)]
    for ax, size in ((teacher_ax, 16), (student_ax, 8)):
        image = ax.images[0]
        assert image.get_interpolation() == "nearest"
        assert image.get_array().shape[:2] == (size, size)
        drawn = [b[:4] for b in boxes(ax)]
        assert expected_box(d["erase"]["box"], size / d["grid"]) in drawn  # pixels of the teacher's view
        assert expected_box(d["mix"]["box"], size / d["grid"]) in drawn
    np.testing.assert_array_equal(teacher_ax.images[0].get_array(), view.teacher_view)

    text = text_ax.texts[0].get_text()
    for op in d["randaugment"]:
        assert f"{op['op']}  magnitude {op['magnitude']:.3g}" in text
    assert f"lam {d['mix']['lam']:.4f}" in text and samples[partner].key in text

    probs = [p for *_, p in view.topk]  # checked against the raw arrays in the first test of this file
    widths = [bar.get_width() for bar in bars_ax.patches if isinstance(bar, Rectangle) and bar.get_height() > 0.5]
    np.testing.assert_allclose(widths[:len(probs)], probs, rtol=1e-6)
    assert sum(widths) == pytest.approx(1.0, abs=1e-3)  # with the leftover bar (K < C) or without it (K = C)
    ids = raw["train"]["topk_ids"][0, 0, pos]
    assert [t.get_text() for t in bars_ax.get_yticklabels()][:len(ids)] == [str(i) for i in ids]


def test_the_command_writes_the_figure_beside_the_exact_pngs(tiny_cache, tmp_path):
    result = _invoke(tiny_cache, "--epoch", EPOCH, "--shard", SHARD, "--pos", POS, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    figure_png = tmp_path / f"view-e{EPOCH}-s{SHARD}-p{POS}-figure.png"
    assert f"wrote {figure_png}" in result.output
    with Image.open(figure_png) as image:
        assert image.format == "PNG" and image.size == (1500, 850)


def test_an_unmixed_view_at_one_size_says_so_in_place_of_the_missing_panels(tiny_cache):
    import dataclasses

    from pipeline.inspect_view import figure, inspect

    m = tiny_cache.manifest()
    view = inspect(tiny_cache.open(), load_shardlist(m.data.train), EPOCH, SHARD, POS)
    assert view.student_view is None  # the tiny student renders at the teacher's 16 px
    unmixed = dataclasses.replace(view, partner_key=None, partner_label_id=None, partner_source=None,
                                  partner_params=None, params=view.params | {"mix": None})
    texts = [t.get_text() for ax in figure(unmixed, "c").axes for t in ax.texts]
    assert "no mix partner\n(this view is not mixed)" in texts
    assert "the student sees the view\nat the teacher's size" in texts
    assert any(f"mix: no    label: {view.label!r}" in t for t in texts)
