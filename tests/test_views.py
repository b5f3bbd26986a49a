"""The view recipe: keyed, order-free sampling; exact storage; every part against torchvision/timm."""

import json
import random
import zlib

import numpy as np
import pytest
import timm.data
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data.auto_augment import AugmentOp
from torchvision.transforms import InterpolationMode

from pipeline import views as V
from pipeline.manifest import ManifestError, ViewsCfg

PARTS = ("crop", "flip", "randaugment", "erasing", "mix")


def only(*parts, **changes) -> ViewsCfg:
    """A recipe with just `parts` switched on; `changes` set section fields, e.g. mix={"prob": 0.3}."""
    cfg = ViewsCfg()
    for part in PARTS:
        getattr(cfg, part).enabled = part in parts
    for section, fields in changes.items():
        for key, value in fields.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def noise_image(width, height, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_image(width, height) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width * 0.4) ** 2 + (y - height * 0.4) ** 2 < (height * 0.25) ** 2) * 200 + 20
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, disc], -1).astype(np.uint8))


def field(params, name):
    return float(params[V.PARAM_FIELDS.index(name)])


def with_fields(params, **values):
    out = params.copy()
    for name, value in values.items():
        out[V.PARAM_FIELDS.index(name)] = value
    return out


def render_view(cfg, images, epoch, shard, pos, size):
    """What the cache does for one view: params of p and of its partner q, then the mixed render."""
    params = V.sample_params(cfg, epoch, shard, pos, len(images), images[pos].size, size=size)
    q, _ = V.mix_target(params)
    partner = V.sample_params(cfg, epoch, shard, q, len(images), images[q].size, size=size)
    return params, V.render(images[pos], params, size, cfg, images[q], partner)


SIZE = 24  # the teacher resolution the tests sample cutmix boxes at
SHARD = [noise_image(40 + 3 * i, 36 - 2 * i, seed=i) for i in range(8)]


# --------------------------------------------------------------------------------------------- keying


def test_same_key_same_view_and_each_key_part_changes_it():
    cfg = ViewsCfg()
    params, view = render_view(cfg, SHARD, 2, 5, 3, 24)
    again_params, again_view = render_view(cfg, SHARD, 2, 5, 3, 24)
    assert np.array_equal(params, again_params) and np.array_equal(view, again_view)
    other_seed = ViewsCfg(seed=1)
    for changed_cfg, epoch, shard, pos in ((other_seed, 2, 5, 3), (cfg, 3, 5, 3), (cfg, 2, 6, 3), (cfg, 2, 5, 4)):
        other_params, other_view = render_view(changed_cfg, SHARD, epoch, shard, pos, 24)
        assert not np.array_equal(params, other_params)
        assert not np.array_equal(view, other_view)


def test_params_and_views_do_not_depend_on_call_order():
    cfg = ViewsCfg()
    forward = {p: render_view(cfg, SHARD, 0, 1, p, 16) for p in range(5)}
    V.sample_params(cfg, 0, 9, 0, 8, (40, 36), size=SIZE)  # an unrelated draw in between
    backward = {p: render_view(cfg, SHARD, 0, 1, p, 16) for p in reversed(range(5))}
    for p in range(5):
        assert np.array_equal(forward[p][0], backward[p][0])
        assert np.array_equal(forward[p][1], backward[p][1])


def test_switching_a_part_off_leaves_the_other_parts_draws_alone():
    # (the erasing noise seed is the crc32 of the whole record, so it is left out: the erasing box stands for its part)
    a_field_of = {"crop": "crop_x0", "flip": "flip", "randaugment": "ra0_op", "erasing": "erase_x1", "mix": "mix_lam"}
    full = [V.sample_params(ViewsCfg(), 0, 0, p, 8, (50, 40), size=SIZE) for p in range(8)]
    for part in PARTS:
        cfg = ViewsCfg()
        getattr(cfg, part).enabled = False
        reduced = [V.sample_params(cfg, 0, 0, p, 8, (50, 40), size=SIZE) for p in range(8)]
        for other, name in a_field_of.items():
            changed = [field(a, name) for a in full] != [field(b, name) for b in reduced]
            assert changed == (other == part), (part, name)


def test_global_rngs_change_nothing_and_rendering_does_not_advance_them():
    cfg = ViewsCfg()
    reference = [render_view(cfg, SHARD, 0, 0, p, 20) for p in range(len(SHARD))]
    for p in range(len(SHARD)):
        random.seed(p)
        np.random.seed(p + 100)
        torch.manual_seed(p + 200)
        random.random(), np.random.rand(), torch.rand(1)
        params, view = render_view(cfg, SHARD, 0, 0, p, 20)
        assert np.array_equal(params, reference[p][0]) and np.array_equal(view, reference[p][1])
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    for epoch in range(5):  # many views, so most RandAugment ops and erasing get rendered
        for p in range(len(SHARD)):
            render_view(cfg, SHARD, epoch, 0, p, 20)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


# --------------------------------------------------------------------------------------------- storage


def test_params_are_on_the_stored_grid_and_replay_from_their_cache_record():
    cfg = ViewsCfg()
    pixels = [n for n in V.PARAM_FIELDS if n[-2:] in ("x0", "y0", "x1", "y1")] + ["mix_cx", "mix_cy", "mix_cut", "grid"]
    integers = ["interp", "flip", "erase", "erase_seed", "mix_mode", "mix_partner"]
    integers += [f"ra{i}_{k}" for i in range(V.MAX_RA_OPS) for k in ("op", "sign")]
    for p in range(len(SHARD)):
        params = V.sample_params(cfg, 1, 0, p, len(SHARD), SHARD[p].size, size=SIZE)
        assert params.dtype == np.float32 and params.shape == (V.N_PARAMS,) and V.N_PARAMS == len(V.PARAM_FIELDS)
        assert np.array_equal(params.astype(np.float64).astype(np.float32), params)
        for name in pixels:
            assert field(params, name) == int(field(params, name)) and 0 <= field(params, name) <= 65535, name
        assert field(params, "grid") == SIZE
        for name in integers:
            assert field(params, name) == int(field(params, name)) and abs(field(params, name)) < 2**24, name
        # the record a cache would hold decodes to the same view
        stored = V.decode_params(np.frombuffer(V.encode_params(params).tobytes(), dtype=np.uint8))
        q, _ = V.mix_target(stored)
        partner = V.decode_params(V.encode_params(V.sample_params(cfg, 1, 0, q, len(SHARD), SHARD[q].size, size=SIZE)))
        _, view = render_view(cfg, SHARD, 1, 0, p, SIZE)
        replay = V.render(SHARD[p], stored, SIZE, cfg, SHARD[q], partner)
        assert V.view_digest(replay) == V.view_digest(view)


def test_describe_decodes_the_stored_fields():
    params = V.sample_params(ViewsCfg(), 0, 0, 3, 8, (40, 30), size=SIZE)
    d = V.describe(params)
    assert d["crop"]["box"] == [field(params, f"crop_{k}") for k in ("x0", "y0", "x1", "y1")]
    assert d["crop"]["interpolation"] == "bicubic"
    assert d["flip"] == bool(field(params, "flip"))
    applied = [i for i in range(V.MAX_RA_OPS) if field(params, f"ra{i}_op") >= 0]
    assert [op["op"] for op in d["randaugment"]] == [V.RA_OP_NAMES[int(field(params, f"ra{i}_op"))] for i in applied]
    assert (d["mix"] is None) == (field(params, "mix_mode") == 0)
    if d["mix"]:
        assert (d["mix"]["partner"], d["mix"]["lam"]) == V.mix_target(params)
    json.dumps(d)


def test_view_digest_covers_bytes_and_shape():
    view = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    digest = V.view_digest(view)
    assert digest == int(np.uint64(digest))
    assert V.view_digest(view.copy()) == digest
    changed = view.copy()
    changed[3, 3, 2] ^= 1
    assert V.view_digest(changed) != digest
    assert V.view_digest(view.reshape(2, 8, 3)) != digest
    strided = np.arange(96, dtype=np.uint8).reshape(4, 8, 3)[:, ::2]
    assert V.view_digest(strided) == V.view_digest(np.ascontiguousarray(strided))


def test_recipe_is_plain_data_that_tracks_the_config():
    recipe = V.recipe(ViewsCfg())
    assert json.loads(json.dumps(recipe)) == recipe
    assert recipe["version"] == V.RECIPE_VERSION and recipe["param_fields"] == list(V.PARAM_FIELDS)
    assert "PosterizeIncreasing" in recipe["randaugment"]["ops"] and recipe["randaugment"]["magnitude"] == 9
    plain = ViewsCfg()
    plain.randaugment.spec = "rand-m9-mstd0.5"
    assert V.recipe(plain) != recipe and "Posterize" in V.recipe(plain)["randaugment"]["ops"]
    assert "randaugment" not in V.recipe(only("crop"))


# --------------------------------------------------------------------------------------------- parts


def test_everything_off_at_the_source_size_is_the_source():
    cfg = only()
    image = noise_image(24, 24)
    params = V.sample_params(cfg, 0, 0, 0, 1, image.size, size=SIZE)
    assert np.array_equal(V.render(image, params, 24, cfg), np.asarray(image))
    gray = image.convert("L")
    assert np.array_equal(V.render(gray, params, 24, cfg), np.asarray(gray.convert("RGB")))


def test_crop_off_is_a_plain_resize():
    for interpolation, mode in (("bicubic", InterpolationMode.BICUBIC), ("bilinear", InterpolationMode.BILINEAR)):
        cfg = only(crop={"enabled": False, "interpolation": interpolation})
        image = noise_image(30, 22)
        params = V.sample_params(cfg, 0, 0, 0, 1, image.size, size=SIZE)
        assert np.array_equal(V.render(image, params, 16, cfg), np.asarray(TF.resize(image, [16, 16], interpolation=mode)))


def test_flip_only_mirrors_the_source_when_flip_is_set():
    cfg = only("flip")
    image = noise_image(20, 20)
    seen = set()
    for p in range(12):
        params = V.sample_params(cfg, 0, 0, p, 12, image.size, size=SIZE)
        flip = field(params, "flip")
        expected = np.fliplr(np.asarray(image)) if flip else np.asarray(image)
        assert np.array_equal(V.render(image, params, 20, cfg), expected)
        seen.add(flip)
    assert seen == {0.0, 1.0}


def test_crop_matches_torchvision_resized_crop_on_the_pixel_box():
    image = noise_image(53, 37)
    width, height = image.size
    for interpolation in ("bicubic", "bilinear", "random"):
        cfg = only("crop", crop={"interpolation": interpolation})
        for p in range(10):
            params = V.sample_params(cfg, 0, 0, p, 10, image.size, size=SIZE)
            x0, y0, x1, y1 = V.describe(params)["crop"]["box"]
            box = np.array([x0, y0, x1, y1])
            assert box.dtype.kind == "i"  # the stored box is an integer pixel box of the source
            left, top, w, h = box[0], box[1], box[2] - box[0], box[3] - box[1]
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            assert 0.08 * width * height - (w + h) <= w * h  # scale >= 0.08 up to the rounding of w and h
            mode = InterpolationMode(V.describe(params)["crop"]["interpolation"])
            expected = TF.resized_crop(image, int(top), int(left), int(h), int(w), [12, 12], interpolation=mode)
            assert np.array_equal(V.render(image, params, 12, cfg), np.asarray(expected))
            # the stages render from decoded pixels (reader.decode_image), handing PIL only the crop box
            assert np.array_equal(V.render(np.asarray(image), params, 12, cfg), np.asarray(expected))


def test_decoded_pixels_and_pil_images_render_the_same_views_and_eval_views():
    image = noise_image(53, 37)
    pixels = np.asarray(image)
    assert V.image_size(pixels) == image.size == (53, 37)
    cfg = ViewsCfg()
    for p in range(8):
        params = V.sample_params(cfg, 0, 0, p, 8, image.size, size=SIZE)
        assert np.array_equal(V.render_unmixed(pixels, params, 20, cfg), V.render_unmixed(image, params, 20, cfg))
    assert np.array_equal(V.eval_view(pixels, 16, 0.875), V.eval_view(image, 16, 0.875))


def test_crop_falls_back_to_the_centre_crop_of_a_thin_image():
    # 200x10: every attempt needs h >= sqrt(0.08 * 2000 * 3/4) > 10, so torchvision's centre crop at ratio 4/3
    params = V.sample_params(only("crop"), 0, 0, 0, 1, (200, 10), size=SIZE)
    x0, y0, x1, y1 = V.describe(params)["crop"]["box"]
    assert (x0, x1, y0, y1) == (93, 106, 0, 10)
    # but a crop exactly as wide as the image is accepted (torchvision's `w <= width`), at a random top
    square = only("crop", crop={"scale": (0.5, 0.5), "ratio": (1.0, 1.0)})
    tops = {V.describe(V.sample_params(square, 0, 0, p, 20, (10, 20), size=SIZE))["crop"]["box"][1] for p in range(20)}
    assert len(tops) > 3


@pytest.mark.parametrize("name", V.RA_OP_NAMES)
def test_each_randaugment_op_matches_timm(name):
    """A view whose only op is `name` equals timm's AugmentOp at the same magnitude; for signed ops a stored
    sign of +1 is timm's un-negated argument and -1 its negated one."""
    cfg = only("randaugment")
    image = smooth_image(24, 24)
    base = V.sample_params(cfg, 0, 0, 0, 1, image.size, size=SIZE)
    base = with_fields(base, **{f"ra{i}_op": -1 for i in range(V.MAX_RA_OPS)})
    signs = (1, -1) if name in V._SIGNED_LEVEL_TO_ARG else (0,)
    ours = {sign: V.render(image, with_fields(base, ra0_op=V.RA_OP_NAMES.index(name), ra0_mag=7.25, ra0_sign=sign), 24, cfg)
            for sign in signs}
    hparams = {**V.RA_HPARAMS, "interpolation": Image.Resampling.BICUBIC}
    op = AugmentOp(name, prob=1.0, magnitude=7.25, hparams=hparams)
    matched = set()
    for trial in range(16):
        # with prob 1, no magnitude noise and a fixed resample, timm's only draw is _randomly_negate's
        random.seed(trial)
        sign = (-1 if random.random() > 0.5 else 1) if signs != (0,) else 0
        random.seed(trial)
        assert np.array_equal(np.asarray(op(image)), ours[sign]), (name, sign)
        matched.add(sign)
    assert matched == set(signs)
    assert all(not np.array_equal(view, np.asarray(image)) for view in ours.values())  # the op does act here
    assert len({view.tobytes() for view in ours.values()}) == len(signs)  # and the two signs differ


def test_randaugment_spec_sections_take_effect():
    fixed = only("randaugment", randaugment={"spec": "rand-m5-n3-p1.0"})
    plain_ops = set(V.parse_randaugment("rand-m5-n3-p1.0").ops)
    for p in range(30):
        ops = V.describe(V.sample_params(fixed, 0, 0, p, 30, (20, 20), size=SIZE))["randaugment"]
        assert len(ops) == 3 and all(op["magnitude"] == 5 for op in ops)
        assert {op["op"] for op in ops} <= plain_ops and "Posterize" in plain_ops and "PosterizeIncreasing" not in plain_ops
    uniform = only("randaugment", randaugment={"spec": "rand-m4-mstd101-p1"})
    mags = [op["magnitude"] for p in range(100) for op in V.describe(V.sample_params(uniform, 0, 0, p, 100, (20, 20), size=SIZE))["randaugment"]]
    assert 0 <= min(mags) < 1 and 3 < max(mags) <= 4 and 1.6 < np.mean(mags) < 2.4


def test_erasing_replaces_only_its_box_with_replayable_noise():
    image = noise_image(32, 32)
    for mode in ("pixel", "const"):
        cfg = only("erasing", erasing={"prob": 1.0, "mode": mode})
        params = V.sample_params(cfg, 0, 0, 0, 1, image.size, size=SIZE)
        erase = V.describe(params)["erase"]
        x0, y0, x1, y1 = (V.grid_px(v, SIZE, 32) for v in erase["box"])  # the box of the teacher's view, at 32 px
        view = V.render(image, params, 32, cfg)
        assert np.array_equal(V.render(image, params, 32, cfg), view)
        outside = np.ones((32, 32), bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(view[outside], np.asarray(image)[outside])
        box = view[y0:y1, x0:x1].reshape(-1, 3)
        assert box.size > 0
        if mode == "const":
            assert np.all(box == [min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN])
        else:  # per-pixel normal noise around the ImageNet mean, in uint8
            assert np.allclose(box.mean(0), 255 * np.asarray(IMAGENET_DEFAULT_MEAN), atol=20)
            assert len(np.unique(box[:, 0])) > 10


def test_one_set_of_params_gives_the_same_geometry_at_any_size():
    image = smooth_image(96, 80)

    def down(view):
        return np.asarray(Image.fromarray(view).resize((32, 32), Image.Resampling.BOX)).astype(float)

    for cfg, limit in ((only("crop", "flip"), 3.0), (only("crop", "flip", "randaugment"), None)):
        for p in range(10):
            params = V.sample_params(cfg, 0, 0, p, 10, image.size, size=SIZE)
            control = V.sample_params(cfg, 0, 0, (p + 1) % 10, 10, image.size, size=SIZE)
            large, small = down(V.render(image, params, 64, cfg)), V.render(image, params, 32, cfg)
            gap = np.abs(large - small).mean()
            control_gap = np.abs(large - V.render(image, control, 32, cfg)).mean()
            assert gap < (limit if limit else 0.5 * control_gap), (p, gap, control_gap)


# --------------------------------------------------------------------------------------------- mixing


def mixed_view(cfg, mode):
    """The first position of SHARD whose params mix with `mode`, with its view and both unmixed views."""
    for p in range(len(SHARD)):
        params, view = render_view(cfg, SHARD, 0, 0, p, 24)
        if (V.describe(params)["mix"] or {}).get("mode") == mode:
            q, _ = V.mix_target(params)
            partner = V.sample_params(cfg, 0, 0, q, len(SHARD), SHARD[q].size, size=SIZE)
            return params, view, V.render_unmixed(SHARD[p], params, 24, cfg), V.render_unmixed(SHARD[q], partner, 24, cfg)
    raise AssertionError(f"no {mode} view in the shard")


def test_cutmix_box_comes_from_the_partner_and_the_rest_from_the_sample():
    cfg = only("crop", "flip", "mix", mix={"mixup_alpha": 0.0})
    params, view, own, other = mixed_view(cfg, "cutmix")
    x0, y0, x1, y1 = (V.grid_px(v, SIZE, 24) for v in V.describe(params)["mix"]["box"])
    inside = np.zeros((24, 24), bool)
    inside[y0:y1, x0:x1] = True
    assert inside.any() and not inside.all()
    assert np.array_equal(view[inside], other[inside]) and np.array_equal(view[~inside], own[~inside])
    assert not np.array_equal(own[inside], other[inside])
    _, lam = V.mix_target(params)
    assert abs(lam - (1 - inside.mean())) < 2 / 24 + 2 / 24  # lam is the box's share at any resolution, up to a pixel row


def test_mixup_is_the_rounded_blend():
    cfg = only("crop", "mix", mix={"cutmix_alpha": 0.0})
    params, view, own, other = mixed_view(cfg, "mixup")
    _, lam = V.mix_target(params)
    blend = lam * own.astype(np.float64) + (1 - lam) * other.astype(np.float64)
    assert 0 < lam < 1 and np.all(np.abs(view - blend) <= 0.5 + 1e-4)


def _first_with_mode(cfg, mode, shard_len=16):
    for p in range(shard_len):
        params = V.sample_params(cfg, 0, 0, p, shard_len, (40, 40), size=SIZE)
        if V.MIX_MODES[int(field(params, "mix_mode"))] == mode:
            return params
    raise AssertionError(f"no {mode} view")


def test_mix_alone_blends_or_pastes_exactly_as_the_params_say():
    rng = np.random.default_rng(0)
    own, other = (rng.integers(0, 256, (12, 20, 3), dtype=np.uint8) for _ in range(2))
    kept = own.copy(), other.copy()
    # mixup: the float32 blend rounded to the nearest integer, computed here without the library
    params = _first_with_mode(ViewsCfg(), "mixup")
    lam = np.float32(field(params, "mix_lam"))
    expected = np.rint(lam * own.astype(np.float32) + (np.float32(1) - lam) * other.astype(np.float32)).astype(np.uint8)
    mixed = V.mix(own, other, params)
    assert mixed.dtype == np.uint8 and np.array_equal(mixed, expected) and 0 < lam < 1
    # cutmix: the box (x scaled by the width, y by the height) from the partner, the rest from the view
    params = _first_with_mode(ViewsCfg(), "cutmix")
    x0, y0, x1, y1 = V.describe(params)["mix"]["box"]
    top, bottom, left, right = (V.grid_px(v, SIZE, side) for v, side in ((y0, 12), (y1, 12), (x0, 20), (x1, 20)))
    box = np.zeros((12, 20), bool)
    box[top:bottom, left:right] = True
    mixed = V.mix(own, other, params)
    assert box.any() and not box.all()
    assert np.array_equal(mixed[box], other[box]) and np.array_equal(mixed[~box], own[~box])
    # no mix: the view itself; the inputs are never changed
    lone = V.sample_params(ViewsCfg(), 0, 0, 0, 1, (8, 8), size=SIZE)
    assert V.mix(own, other, lone) is own
    assert np.array_equal(own, kept[0]) and np.array_equal(other, kept[1])


def test_render_is_render_unmixed_then_mix():
    cfg = ViewsCfg()
    modes = set()
    for p in range(len(SHARD)):
        params, view = render_view(cfg, SHARD, 1, 3, p, 20)
        q, _ = V.mix_target(params)
        partner = V.sample_params(cfg, 1, 3, q, len(SHARD), SHARD[q].size, size=20)
        parts = V.render_unmixed(SHARD[p], params, 20, cfg), V.render_unmixed(SHARD[q], partner, 20, cfg)
        assert np.array_equal(V.mix(*parts, params), view)
        modes.add(V.describe(params)["mix"]["mode"] if V.describe(params)["mix"] else "none")
    assert modes == {"mixup", "cutmix"}


def test_shard_views_render_each_unmixed_view_once_and_equal_render(monkeypatch):
    cfg = ViewsCfg()
    cfg.mix.window = 4  # two windows in the shard
    n = len(SHARD)
    params = {p: V.sample_params(cfg, 0, 7, p, n, SHARD[p].size, size=SIZE) for p in range(n)}
    # a partner skipped as a bad sample: the view mixes with itself, as stage 1 did
    q = V.mix_target(params[5])[0]
    images = {p: SHARD[p] for p in range(n) if p != q}
    expected = {}
    for p in images:
        partner = V.mix_target(params[p])[0]
        partner = p if partner not in images else partner
        expected[p] = V.render(SHARD[p], params[p], 16, cfg, SHARD[partner], params[partner])
    rendered = []
    render_unmixed = V._render_unmixed  # what ShardViews calls, with the params decoded once
    monkeypatch.setattr(V, "_render_unmixed",
                        lambda image, p, size, c: rendered.append(p) or render_unmixed(image, p, size, c))
    shard_views = V.ShardViews(images, params, 16, cfg)
    for p in images:
        assert np.array_equal(shard_views.view(p), expected[p]), p
    assert shard_views.partner(5) == 5 and V.mix_target(params[5])[0] != 5
    assert len(rendered) == len(images)  # one unmixed view per position, however many mix with it


def test_param_statistics_follow_the_recipe():
    cfg = ViewsCfg()
    shard_len, window = 37, cfg.mix.window  # blocks [0,16) [16,32) [32,37)
    draws = [(p, V.sample_params(cfg, e, s, p, shard_len, (4000, 3000), size=SIZE))
             for e in range(9) for s in range(6) for p in range(shard_len)]  # 1,998 views
    d = [V.describe(params) for _, params in draws]
    assert abs(np.mean([v["flip"] for v in d]) - 0.5) < 0.045
    assert abs(np.mean([v["erase"] is not None for v in d]) - 0.25) < 0.04
    lone = [V.mix_window(cfg, e, s, p, shard_len) for e in range(9) for s in range(6) for p in range(shard_len)]
    modes = [v["mix"]["mode"] for v, (a, b) in zip(d, lone) if b - a > 1]  # mix prob 1.0; a window of one never mixes
    assert all(v["mix"] is None for v, (a, b) in zip(d, lone) if b - a == 1)
    assert abs(modes.count("cutmix") / len(modes) - 0.5) < 0.045
    assert abs(np.mean([v["mix"]["lam"] for v in d if v["mix"] and v["mix"]["mode"] == "mixup"]) - 0.5) < 0.04
    for v in d:
        x0, y0, x1, y1 = v["crop"]["box"]
        assert 0.08 - 1e-3 <= (x1 - x0) * (y1 - y0) / (4000 * 3000) <= 1
        assert 3 / 4 - 1e-2 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 1e-2
        if v["mix"] and v["mix"]["mode"] == "cutmix":  # whole pixels at the teacher's size, lam = their share
            x0, y0, x1, y1 = v["mix"]["box"]
            assert v["mix"]["lam"] == float(np.float32(1 - (x1 - x0) * (y1 - y0) / SIZE**2))  # derived, not stored
            if 0 < x0 and x1 < SIZE and 0 < y0 and y1 < SIZE:  # timm's rand_bbox: a square of side sqrt(1 - lam)
                assert x1 - x0 == y1 - y0
    for (p, _), v, (a, b) in zip(draws, d, lone):  # the partner: another position less than a window away
        assert v["mix"] is None or (a <= v["mix"]["partner"] < b and v["mix"]["partner"] != p and b - a <= window)
    ra = [op for v in d for op in v["randaugment"]]
    assert abs(len(ra) / len(d) - 1.0) < 0.06  # 2 ops, each applied with prob 0.5
    assert set(op["op"] for op in ra) == set(V.parse_randaugment(cfg.randaugment.spec).ops)
    mags = np.array([op["magnitude"] for op in ra])
    assert mags.min() >= 0 and mags.max() <= 10 and abs(mags.mean() - 9) < 0.05 and abs(mags.std() - 0.5) < 0.05
    signed = [op["sign"] for op in ra if op["op"] in V._SIGNED_LEVEL_TO_ARG]
    assert set(signed) == {-1, 1} and abs(np.mean(signed)) < 0.1
    assert all(op["sign"] == 0 for op in ra if op["op"] not in V._SIGNED_LEVEL_TO_ARG)


def test_mix_probability_single_alpha_and_lone_samples():
    rare = only("mix", mix={"prob": 0.3})
    mixed = [V.mix_target(V.sample_params(rare, 0, s, p, 16, (8, 8), size=SIZE))[1] < 1 for s in range(20) for p in range(16)]
    assert abs(np.mean(mixed) - 0.3) < 0.06
    mixup_only = only("mix", mix={"cutmix_alpha": 0.0})
    assert {V.describe(V.sample_params(mixup_only, 0, 0, p, 16, (8, 8), size=SIZE))["mix"]["mode"] for p in range(16)} == {"mixup"}
    # a shard of one sample: it mixes with nobody, and its target is itself
    lone = V.sample_params(ViewsCfg(), 0, 0, 0, 1, (8, 8), size=SIZE)
    assert V.describe(lone)["mix"] is None and V.mix_target(lone) == (0, 1.0)
    assert np.array_equal(V.render(SHARD[0], lone, 8, ViewsCfg()), V.render_unmixed(SHARD[0], lone, 8, ViewsCfg()))


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("spec, fragment", [
    ("auto-m9-mstd0.5", "first section must be 'rand', got 'auto'"),
    ("rand-m9-x3", "section 'x3' is not supported"),
    ("rand-m9-tweights", "section 'tweights' is not supported"),
    ("rand-m-inc1", "section 'm' has no valid number"),
    ("rand-m9-p0.5.1", r"section 'p0.5.1' has no valid number"),
    ("rand-m9-n5", "section 'n5' asks for 5 ops"),
    ("rand-m9-p1.5", "section 'p1.5' is a probability"),
    ("rand-m9-inc2", "section 'inc2' must be inc0 or inc1"),
])
def test_bad_randaugment_spec_names_the_section(spec, fragment):
    cfg = ViewsCfg()
    cfg.randaugment.spec = spec
    with pytest.raises(ManifestError, match=f"views.randaugment.spec='{spec}'.*{fragment}"):
        V.sample_params(cfg, 0, 0, 0, 1, (8, 8), size=SIZE)


def test_an_op_set_this_recipe_version_cannot_store_is_refused(monkeypatch):
    monkeypatch.setattr(V, "rand_augment_choices", lambda name, increasing: ["Rotate", "Cutout"])
    V.parse_randaugment.cache_clear()
    try:
        with pytest.raises(ManifestError, match=r"timm's op set holds \['Cutout'\], which this recipe version cannot store"):
            V.parse_randaugment("rand-m9")
    finally:
        V.parse_randaugment.cache_clear()


def test_bad_recipe_values_name_the_key():
    no_alpha = only("mix", mix={"mixup_alpha": 0.0, "cutmix_alpha": 0.0})
    with pytest.raises(ManifestError, match="views.mix.mixup_alpha and views.mix.cutmix_alpha are both 0"):
        V.sample_params(no_alpha, 0, 0, 0, 2, (8, 8), size=SIZE)
    with pytest.raises(ManifestError, match=r"views.mix.mixup_alpha=-1.0 .* must be >= 0"):
        V.recipe(only("mix", mix={"mixup_alpha": -1.0}))
    with pytest.raises(ManifestError, match="views.seed=-1 must be a non-negative integer"):
        V.sample_params(ViewsCfg(seed=-1), 0, 0, 0, 1, (8, 8), size=SIZE)
    with pytest.raises(ManifestError, match=r"views.crop.ratio=\[1.5, 1.0\] must satisfy"):
        V.sample_params(only("crop", crop={"ratio": (1.5, 1.0)}), 0, 0, 0, 1, (8, 8), size=SIZE)


def test_bad_sample_keys_name_the_view():
    cfg = ViewsCfg()
    with pytest.raises(ValueError, match=r"view \(epoch 0, shard 2, position 5\): shard_len=5 must exceed the position"):
        V.sample_params(cfg, 0, 2, 5, 5, (8, 8), size=SIZE)
    with pytest.raises(ValueError, match=r"epoch=-1 must lie in \[0, 2\*\*24\)"):
        V.sample_params(cfg, -1, 0, 0, 1, (8, 8), size=SIZE)
    with pytest.raises(ValueError, match=r"position 0\): source size 70000x30 is outside .* downscale the image"):
        V.sample_params(cfg, 0, 0, 0, 1, (70000, 30), size=SIZE)


def test_bad_params_and_missing_partner_are_reported():
    cfg = ViewsCfg()
    params = V.sample_params(cfg, 0, 0, 0, 8, (8, 8), size=SIZE)
    with pytest.raises(ValueError, match=r"float32 vector of 31 values .* got shape \(30,\) dtype float32"):
        V.render(SHARD[0], params[:-1], 8, cfg)
    with pytest.raises(ValueError, match=r"got shape \(31,\) dtype float64"):
        V.describe(params.astype(np.float64))
    with pytest.raises(ValueError, match=r"field mix_mode=7.0 is not a valid code .* another recipe version"):
        V.mix_target(with_fields(params, mix_mode=7))
    with pytest.raises(ValueError, match=r"field ra0_op=nan is not a valid code"):
        V.describe(with_fields(params, ra0_op=np.nan))
    q, _ = V.mix_target(params)
    with pytest.raises(ValueError, match=f"with the sample at position {q} of the same shard: pass .* partner_image"):
        V.render(SHARD[0], params, 8, cfg)
    with pytest.raises(ValueError, match=r"cutmix of a \(8, 8, 3\) view with a partner view of shape \(4, 4, 3\): "
                                         r"render both at the same size"):
        V.mix(np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8), _first_with_mode(cfg, "cutmix"))
    with pytest.raises(ValueError, match="view_digest takes the uint8 view .* got dtype float32"):
        V.view_digest(np.zeros((2, 2, 3), np.float32))


# --------------------------------------------------------------------------------------------- mix partners


def _partners(cfg, epochs, shard_len, shard=0):
    """partners[e][p]: the position p mixes with in cache epoch e (p itself when unmixed)."""
    return [[V.mix_target(V.sample_params(cfg, e, shard, p, shard_len, (8, 8), size=SIZE))[0]
             for p in range(shard_len)] for e in range(epochs)]


def test_mix_partners_change_with_the_epoch_within_two_windows():
    cfg = only("mix")
    window, shard_len = cfg.mix.window, 64
    partners = _partners(cfg, 32, shard_len)
    inner = range(window, shard_len - window)  # positions with 2 (W - 1) neighbours on both sides

    def distinct(epochs):
        return np.mean([len({partners[e][p] for e in range(epochs)} - {p}) for p in inner])

    growth = [distinct(e) for e in (1, 2, 4, 8, 32)]
    assert growth[0] == 1 and all(a < b for a, b in zip(growth, growth[1:])), growth
    # a window aligned the same way every epoch caps this at W - 1; the README promises up to 2 (W - 1)
    assert window - 1 < growth[-1] <= 2 * (window - 1), growth
    # every partner is less than a window away (a reader holding p's windows holds it)
    assert all(abs(partners[e][p] - p) < window for e in range(32) for p in range(shard_len))
    # the windows really move: their starts are not all multiples of W
    starts = {V.mix_window(cfg, e, 0, 20, shard_len)[0] for e in range(32)}
    assert len(starts) > 4 and any(s % window for s in starts)


def test_partner_labels_follow_the_shards_label_distribution():
    cfg = only("mix")
    rng = np.random.default_rng(0)
    shard_len, classes = 1024, 5
    labels = rng.choice(classes, size=shard_len, p=[0.4, 0.3, 0.15, 0.1, 0.05])  # a shuffled, skewed shard
    partners = np.array(_partners(cfg, 4, shard_len, shard=3))
    mixed = partners != np.arange(shard_len)
    got = np.bincount(labels[partners[mixed]], minlength=classes) / mixed.sum()
    want = np.bincount(labels, minlength=classes) / shard_len
    assert np.abs(got - want).sum() / 2 < 0.03, (got, want)  # total variation; ~0.01 expected at 4k draws


def test_windows_covering_holds_every_partner_of_a_span():
    cfg = only("mix", mix={"window": 7})
    shard_len = 50
    partners = _partners(cfg, 6, shard_len)
    rng = np.random.default_rng(1)
    for e in range(6):
        assert [p for a, b in V.mix_windows(cfg, e, 0, shard_len) for p in range(a, b)] == list(range(shard_len))
        for _ in range(20):
            start = int(rng.integers(shard_len))
            stop = int(rng.integers(start + 1, shard_len + 1))
            lo, hi = V.windows_covering(cfg, e, 0, start, stop, shard_len)
            assert all(lo <= partners[e][p] < hi for p in range(start, stop))
            assert lo > start - 7 and hi < stop + 7


def test_shard_views_with_moving_windows_equal_render():
    cfg = ViewsCfg()
    n = len(SHARD)
    for epoch in range(3):
        params = {p: V.sample_params(cfg, epoch, 2, p, n, SHARD[p].size, size=SIZE) for p in range(n)}
        rendered = V.ShardViews(dict(enumerate(SHARD)), params, SIZE, cfg)
        for p in range(n):
            q, _ = V.mix_target(params[p])
            assert np.array_equal(rendered.view(p), V.render(SHARD[p], params[p], SIZE, cfg, SHARD[q], params[q]))


# --------------------------------------------------------------------------------------------- cutmix lambda


def test_cutmix_box_and_lambda_are_timms():
    from timm.data.mixup import cutmix_bbox_and_lam

    rng = np.random.default_rng(0)
    for k in range(300):
        size, lam = int(rng.integers(5, 240)), float(rng.beta(1.0, 1.0))
        np.random.seed(k)
        (yl, yu, xl, xu), timm_lam = cutmix_bbox_and_lam((3, size, size), lam)
        np.random.seed(k)  # the same centre timm drew: randint(0, H), then randint(0, W)
        cy, cx = np.random.randint(0, size), np.random.randint(0, size)
        box, ours = V.cutmix_box(lam, cy, cx, size)
        assert box == (yl, yu, xl, xu) and ours == timm_lam


@pytest.mark.parametrize("size", [24, 37])
def test_stored_cutmix_lambda_is_the_pixel_share_the_teacher_saw(size):
    cfg = only("mix", mix={"mixup_alpha": 0.0})
    own, other = Image.new("RGB", (30, 20), (0, 0, 0)), Image.new("RGB", (30, 20), (255, 255, 255))
    checked = 0
    for p in range(16):
        params = V.sample_params(cfg, 0, 0, p, 16, own.size, size=size)
        q, lam = V.mix_target(params)
        if q == p:
            continue
        partner = V.sample_params(cfg, 0, 0, q, 16, other.size, size=size)
        view = V.render(own, params, size, cfg, other, partner)
        partner_share = float((view == 255).all(-1).mean())
        assert lam == float(np.float32(1.0 - partner_share))  # the pixel share, derived from the stored box
        checked += 1
    assert checked > 8


# --------------------------------------------------------------------------------------------- erasing noise


def test_erasing_noise_is_timms_normal_noise_up_to_clipping_and_rounding():
    """timm's RandomErasing (pixel mode) writes N(0, 1) into the normalised tensor; the stored uint8 noise,
    normalised with ImageNet's statistics, matches it but for the clipped tails and the 1/255 rounding."""
    from timm.data.random_erasing import RandomErasing

    torch.manual_seed(0)
    random.seed(0)
    eraser = RandomErasing(probability=1.0, mode="pixel", device="cpu")
    timm_values = []
    while sum(v.size for v in timm_values) < 200_000:
        img = torch.full((3, 64, 64), 1e9)  # anything erased is no longer 1e9
        out = eraser(img)
        timm_values.append(out[out != 1e9].numpy().astype(np.float64))
    timm_values = np.concatenate(timm_values)
    cfg = only("erasing", erasing={"prob": 1.0})
    ours = []
    for p in range(400):
        params = V.sample_params(cfg, 0, 0, p, 400, (64, 64), size=64)
        view = V.render_unmixed(Image.new("RGB", (64, 64), (1, 2, 3)), params, 64, cfg)
        erased = np.any(view != (1, 2, 3), axis=-1)  # the erase box (a noise pixel equal to (1, 2, 3) is ~1e-7 likely)
        z = (view[erased] / 255.0 - np.asarray(IMAGENET_DEFAULT_MEAN)) / np.asarray(timm.data.IMAGENET_DEFAULT_STD)
        ours.append(z.ravel())
    ours = np.concatenate(ours)
    grid = np.linspace(-1.9, 1.9, 39)  # inside the unclipped range of every channel
    gap = max(abs(np.mean(ours <= g) - np.mean(timm_values <= g)) for g in grid)
    assert gap < 0.02, gap  # rounding (one uint8 step is 0.017 in normalised units) and sampling noise
    assert abs(ours.std() - timm_values.std()) < 0.05 and abs(ours.mean()) < 0.03
    stats = V.erasing_noise_stats(200_000)
    assert 0.02 < stats["clipped_share"] < 0.045 and 0.95 < stats["std"] < 0.99 and stats["ks_vs_normal"] < 0.025


def test_erasing_noise_levels_have_the_rounded_normals_probabilities_and_a_frozen_stream():
    """The table maps 16-bit uniforms to uint8 levels with the probabilities of the rounded, clipped normal (float64
    truth from scipy, to within one draw in 2**16); the draws are PCG64's raw stream, which numpy keeps frozen, so
    a view's noise is the same under every numpy: its crc32 is pinned here and moves only with the recipe version."""
    from scipy.stats import norm

    table = V._noise_table()
    for c, (mean, std) in enumerate(zip(IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)):
        edges = norm.cdf(((np.arange(1, 256) - 0.5) / 255.0 - mean) / std)
        truth = np.diff(np.concatenate([[0.0], edges, [1.0]]))
        share = np.bincount(table[c], minlength=256) / table.shape[1]
        assert np.abs(share - truth).max() <= 1.0 / table.shape[1] + 1e-12
    assert V.RECIPE_VERSION == "views/4" and zlib.crc32(V._noise_u8(12345, 7, 9).tobytes()) == 3359065979
    assert np.array_equal(V._noise_u8(12345, 7, 9), V._noise_u8(12345, 7, 9))
    assert not np.array_equal(V._noise_u8(12345, 7, 9), V._noise_u8(12346, 7, 9))


def test_a_model_with_other_normalisation_is_warned_about_the_noise():
    cfg = ViewsCfg()
    assert V.erasing_noise_warning(cfg, IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD, "teacher x") is None
    text = V.erasing_noise_warning(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "student vit_x")
    assert "student vit_x normalises with mean (0.5, 0.5, 0.5)" in text and "about 0.45" in text
    assert V.erasing_noise_warning(only("crop"), (0.5,) * 3, (0.5,) * 3, "student") is None
