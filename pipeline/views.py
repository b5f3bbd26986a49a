"""The view recipe: explicit, stored per-view augmentation parameters and the renderer that replays them.

A view of (cache epoch e, shard s, position p) is drawn by `sample_params` from generators seeded by
(seed, e, s, p) alone, one generator per part (crop, flip, RandAugment, erasing, mix), so switching a part
off leaves the others' draws unchanged. The draws are written into a float32 vector (`PARAM_FIELDS`) and
snapped to the grid the cache stores them on (`PARAM_ENCODING`: the crop box in whole pixels of the source, the
erasing and cutmix boxes in whole pixels of the teacher's view (`grid`), codes and flags as one byte, RandAugment
magnitudes in steps of 1/16 of a level, the mix partner's position in three bytes), so `decode_params(encode_params(v))
== v` bit for bit and the teacher renders from the very values the student later decodes. Two fields are not stored
but follow from the others (`DERIVED_FIELDS`): the cutmix lambda is the box's pixel share, and the erasing noise
seed is the crc32 of the view's stored record. `render_unmixed`, `mix` and `render` (the two composed) read only that vector (and the
recipe constants in the config) and draw no random numbers: the erasing noise comes from numpy's PCG64 bit
generator seeded by the derived `erase_seed`, whose raw stream numpy keeps frozen across versions. So a view rendered from
the decoded cache entry is the view the teacher saw, at any output resolution.

The pixel operations are torchvision's (`resized_crop`'s crop then PIL resize, done on the crop box of the
decoded pixels; `hflip`) and timm's RandAugment ops
(`timm.data.auto_augment.NAME_TO_OP`) called with explicit arguments; the order and the sampling follow
DeiT's timm pipeline: RandomResizedCrop, flip, RandAugment, random erasing, then mixup/cutmix with a partner
drawn inside a window of the same shard whose alignment changes with the epoch (`mix_window`). Where timm draws
in pixels, so does the sampler: the crop box in the source (torchvision's RandomResizedCrop), the erasing box and
the cutmix box in the teacher's view (timm's RandomErasing and rand_bbox); a view rendered at another size scales
those boxes to it.

Mix partners. The positions of shard s in cache epoch e are cut into windows of `views.mix.window` (W)
consecutive positions starting at an offset drawn from (seed, e, s) alone; a view's partner is drawn uniformly
from the other positions of its window. A reader that holds the whole windows around the positions it wants
(`windows_covering`) always holds both images, whatever the loader topology, and an image's partners change
with the epoch: its candidates over all epochs are its 2(W - 1) nearest shard neighbours, where a fixed
alignment would tie it to the same W - 1 forever. Shards are shuffled when written (`make shards`), so
neighbours are random images of the shard; `shards.class_order_warning` flags shards written in class order.

Cutmix lambda is the pixel-area fraction of the box at the teacher's resolution, as timm's
`cutmix_bbox_and_lam` computes it: the box is stored as timm's draw (centre and side in pixels at that size), so
the teacher's render replays that exact pixel box and the lambda follows from it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP, rand_augment_choices
from torchvision.transforms import InterpolationMode

from pipeline.manifest import ManifestError, ViewsCfg, to_dict

# views/2: epoch-dependent mix windows, cutmix box drawn in teacher pixels (timm's lambda correction)
# views/3: boxes stored in whole pixels (crop: source; erasing, cutmix: the teacher's view), erasing drawn in
# pixels as timm's RandomErasing does, the noise seed and the cutmix lambda derived instead of stored
# views/4: the erasing noise drawn as uint16 uniforms mapped to uint8 pixels by the inverse CDF (same distribution)
RECIPE_VERSION = "views/4"

MAX_RA_OPS = 4  # RandAugment slots in the parameter vector; a spec asking for more ops is refused
MAX_SIDE = 65535  # pixel coordinates (source and view sides) are stored as uint16
MAX_INT = 2**24  # integers (positions, seeds) stay exact in float32 below this
LAM_STEP = 1.0 / 1023  # the mixup lambda is stored as a multiple of this (10 bits)

INTERPOLATIONS = ("bilinear", "bicubic")  # stored as an index; "random" in the config picks one per view
MIX_MODES = ("none", "mixup", "cutmix")

# Stable op table: a stored `ra*_op` is an index into this tuple, whatever order timm lists its sets in.
RA_OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate",
    "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing", "SolarizeAdd",
    "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing",
    "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

# timm's level->arg for the ops whose sign it draws with the global `random` (`_randomly_negate`), written
# as functions of the signed fraction s = +-level/10 in timm's operation order so the floats are bit-equal.
_SIGNED_LEVEL_TO_ARG = {
    "Rotate": lambda s, hp: (s * 30.0,),
    "ShearX": lambda s, hp: (s * 0.3,),
    "ShearY": lambda s, hp: (s * 0.3,),
    "TranslateXRel": lambda s, hp: (s * hp["translate_pct"],),
    "TranslateYRel": lambda s, hp: (s * hp["translate_pct"],),
    "ColorIncreasing": lambda s, hp: (max(0.1, 1.0 + s * 0.9),),
    "ContrastIncreasing": lambda s, hp: (max(0.1, 1.0 + s * 0.9),),
    "BrightnessIncreasing": lambda s, hp: (max(0.1, 1.0 + s * 0.9),),
    "SharpnessIncreasing": lambda s, hp: (max(0.1, 1.0 + s * 0.9),),
}
LEVEL_DENOM = 10.0  # timm's magnitude scale: level m maps to the fraction m / 10

# DeiT's RandAugment hparams (timm create_transform): fill with the ImageNet mean as uint8.
IMG_MEAN_U8 = tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)
RA_HPARAMS = {"translate_pct": 0.45, "img_mean": IMG_MEAN_U8}

# timm RandomErasing defaults (DeiT): area fraction and log aspect-ratio range, 10 attempts.
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))

CROP_ATTEMPTS = 10
ERASE_ATTEMPTS = 10

_PART_CROP, _PART_FLIP, _PART_RA, _PART_ERASE, _PART_MIX, _PART_WINDOW = range(6)

PARAM_FIELDS: tuple[str, ...] = (
    ("crop_x0", "crop_y0", "crop_x1", "crop_y1", "interp", "flip")
    + tuple(f"ra{i}_{k}" for i in range(MAX_RA_OPS) for k in ("op", "mag", "sign"))
    + ("erase", "erase_x0", "erase_y0", "erase_x1", "erase_y1", "erase_seed")
    + ("mix_mode", "mix_partner", "mix_lam", "mix_cx", "mix_cy", "mix_cut", "grid")
)
N_PARAMS = len(PARAM_FIELDS)
_FIELD = {name: i for i, name in enumerate(PARAM_FIELDS)}

# How each field is stored in the cache: (bytes, scale, offset), value = (unsigned little-endian int + offset) * scale.
# Pixel coordinates (crop: of the source; erasing box, cutmix centre and side: of the teacher's view, `grid` px a
# side): uint16. Codes, flags and signs: one byte (offset -1 lets -1 mean "no op"). RandAugment magnitudes: one
# byte, steps of 1/16 of a level in [0, 16) (timm's level scale is 0-10; a step is an eighth of DeiT's magnitude
# std 0.5, a rotation of 0.19 degrees; Posterize and Solarize floor the level to a few integer arguments anyway).
# The mix partner's position: three bytes (below 2**24 = MAX_INT). The mixup lambda: two bytes, steps of 1/1023
# (a step moves a blended uint8 pixel by at most a quarter of a level, the label weight by 0.1%: finer steps
# would not change what the renderer writes). Zero bytes: the derived fields below.
_PX = (2, 1.0, 0)
_CODE = (1, 1.0, 0)
PARAM_ENCODING: dict[str, tuple[int, float, int]] = {
    **{f"{box}_{c}": _PX for box in ("crop", "erase") for c in ("x0", "y0", "x1", "y1")},
    "mix_cx": _PX, "mix_cy": _PX, "mix_cut": _PX, "grid": _PX,
    "interp": _CODE, "flip": _CODE, "erase": _CODE, "mix_mode": _CODE,
    **{f"ra{i}_op": (1, 1.0, -1) for i in range(MAX_RA_OPS)},
    **{f"ra{i}_sign": (1, 1.0, -1) for i in range(MAX_RA_OPS)},
    **{f"ra{i}_mag": (1, 1.0 / 16, 0) for i in range(MAX_RA_OPS)},
    "erase_seed": (0, 1.0, 0), "mix_partner": (3, 1.0, 0), "mix_lam": (2, LAM_STEP, 0),
}
# Fields that follow from the stored bytes instead of taking any (`decode_params` fills them in):
# erase_seed = crc32 of the view's stored record less the lambda's bytes, low 24 bits (0 when the view is not
# erased): the noise needs a seed no other view shares, not a particular one; mix_lam of a cutmix = 1 - box
# pixels / grid**2 (timm's correction) and of an unmixed view 1.0, so only a mixup's lambda is stored.
DERIVED_FIELDS = ("erase_seed", "mix_lam")
PARAM_BYTES = sum(PARAM_ENCODING[f][0] for f in PARAM_FIELDS)  # bytes of one stored view record
_PIXEL_FIELDS = tuple(name for name in PARAM_FIELDS if PARAM_ENCODING[name] == _PX)
_LAM_AT = sum(PARAM_ENCODING[f][0] for f in PARAM_FIELDS[:PARAM_FIELDS.index("mix_lam")])
_LAM_BYTES = list(range(_LAM_AT, _LAM_AT + PARAM_ENCODING["mix_lam"][0]))


# --------------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment spec string (`rand-m9-mstd0.5-inc1`)."""

    ops: tuple[str, ...]  # the op set choices are drawn from (with replacement)
    num_ops: int
    magnitude: int
    magnitude_std: float  # 0: fixed magnitude; inf: uniform in [0, magnitude]
    magnitude_max: int | None  # clip bound; None means timm's default of 10
    prob: float
    increasing: bool


_RA_SECTIONS = "m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>"


@functools.lru_cache(maxsize=32)
def parse_randaugment(spec: str) -> RandAugmentSpec:
    """Parse a timm RandAugment spec with timm's conventions; anything unsupported raises and names the
    section. Weighted/named op sets (`t...`) are refused: timm draws those without replacement."""
    where = f"views.randaugment.spec={spec!r}"
    sections = spec.split("-")
    if sections[0] != "rand":
        raise ManifestError(f"{where}: the first section must be 'rand', got {sections[0]!r} (e.g. 'rand-m9-mstd0.5-inc1')")
    values: dict = {}
    for section in sections[1:]:
        key, raw = (re.split(r"(\d.*)", section) + [""])[:2]
        convert = {"m": int, "n": int, "mmax": int, "inc": int, "p": float, "mstd": float}.get(key)
        if convert is None:
            raise ManifestError(f"{where}: section {section!r} is not supported; valid sections are {_RA_SECTIONS}")
        try:
            values[key] = convert(raw)
        except ValueError:
            raise ManifestError(f"{where}: section {section!r} has no valid number; valid sections are {_RA_SECTIONS}") from None
    if not 0 <= values.get("n", 2) <= MAX_RA_OPS:
        raise ManifestError(f"{where}: section 'n{values['n']}' asks for {values['n']} ops; between 0 and {MAX_RA_OPS} are supported")
    if not 0.0 <= values.get("p", 0.5) <= 1.0:
        raise ManifestError(f"{where}: section 'p{values['p']}' is a probability and must lie in [0, 1]")
    if values.get("inc", 0) not in (0, 1):
        raise ManifestError(f"{where}: section 'inc{values['inc']}' must be inc0 or inc1")
    mstd = values.get("mstd", 0.0)
    increasing = bool(values.get("inc", 0))
    # timm's default op set for this spec (the name only matters for 't' sets, which are refused above)
    ops = tuple(rand_augment_choices("default", increasing=increasing))
    unknown = [op for op in ops if op not in RA_OP_NAMES]
    if unknown:
        raise ManifestError(f"{where}: timm's op set holds {unknown}, which this recipe version cannot store")
    return RandAugmentSpec(
        ops=ops, num_ops=values.get("n", 2), magnitude=values.get("m", 10),
        magnitude_std=float("inf") if mstd > 100 else mstd,  # timm: mstd > 100 means uniform sampling
        magnitude_max=values.get("mmax"), prob=values.get("p", 0.5), increasing=increasing,
    )


def check(cfg: ViewsCfg) -> None:
    """Checks of the view recipe that the manifest loader does not make; each names the key to change."""
    if cfg.seed < 0:
        raise ManifestError(f"views.seed={cfg.seed} must be a non-negative integer")
    lo, hi = cfg.crop.ratio
    if not 0 < lo <= hi:
        raise ManifestError(f"views.crop.ratio={[lo, hi]} must satisfy 0 < min <= max")
    mix = cfg.mix
    if mix.mixup_alpha < 0 or mix.cutmix_alpha < 0:
        raise ManifestError(f"views.mix.mixup_alpha={mix.mixup_alpha} and views.mix.cutmix_alpha={mix.cutmix_alpha} must be >= 0")
    if mix.enabled and mix.mixup_alpha == 0 and mix.cutmix_alpha == 0:
        raise ManifestError("views.mix is enabled but views.mix.mixup_alpha and views.mix.cutmix_alpha are both 0: "
                            "set one above 0 (DeiT: 0.8 and 1.0) or set views.mix.enabled=false")
    if cfg.randaugment.enabled:
        parse_randaugment(cfg.randaugment.spec)


def recipe(cfg: ViewsCfg) -> dict:
    """The recipe as plain JSON-able data for the cache attributes."""
    check(cfg)
    config = to_dict(cfg)
    config.pop("repeats", None)  # how the student replays the views, not which views the cache holds
    out = {
        "version": RECIPE_VERSION,
        "config": config,
        "param_fields": list(PARAM_FIELDS),
        "derived_fields": {"erase_seed": "crc32(record without the mix_lam bytes) & 0xFFFFFF when erased, else 0",
                           "mix_lam": "cutmix: 1 - box pixels / grid**2; none: 1.0; mixup: stored"},
        "param_encoding": {name: list(PARAM_ENCODING[name]) for name in PARAM_FIELDS},
        "interpolations": list(INTERPOLATIONS),
        "ra_op_names": list(RA_OP_NAMES),
        "ra_hparams": {"translate_pct": RA_HPARAMS["translate_pct"], "img_mean": list(IMG_MEAN_U8)},
        "erasing": {"area": list(ERASE_AREA), "aspect": [0.3, 1.0 / 0.3], "noise_space": "imagenet",
                    "pixel_noise": "per value a uint16 u from PCG64(erase_seed).random_raw (little-endian, 4 a draw), "
                                   "mapped to the uint8 level v with Phi(z_v) <= (u + 0.5) / 65536 < Phi(z_v+1), "
                                   "z_v = ((v - 0.5) / 255 - imagenet_mean) / imagenet_std"},
        "mixup_rounding": "rint(lam * a + (1 - lam) * b) in float32",
        "mix_windows": "window offset = default_rng([seed, epoch, shard, 5]).integers(window); partner uniform "
                       "over the other positions of the window",
        "cutmix_box": "timm rand_bbox at the teacher's size (grid), stored as its centre (mix_cx, mix_cy) and side "
                      "(mix_cut); lam = 1 - box pixels / grid**2 (cutmix_bbox_and_lam)",
        "erasing_box": "timm RandomErasing's draw in pixels of the teacher's view (grid)",
    }
    if cfg.randaugment.enabled:
        ra = parse_randaugment(cfg.randaugment.spec)
        out["randaugment"] = {
            "ops": list(ra.ops), "num_ops": ra.num_ops, "magnitude": ra.magnitude, "prob": ra.prob,
            "magnitude_sampling": "uniform" if math.isinf(ra.magnitude_std) else "normal" if ra.magnitude_std > 0 else "fixed",
            "magnitude_std": 0.0 if math.isinf(ra.magnitude_std) else ra.magnitude_std,
            "magnitude_max": ra.magnitude_max if ra.magnitude_max is not None else LEVEL_DENOM,
        }
    return out


# --------------------------------------------------------------------------------------------- sampling


def _sample_crop(rng: np.random.Generator, cfg: ViewsCfg, width: int, height: int) -> dict:
    """torchvision's RandomResizedCrop.get_params (10 attempts, then the centre-crop fallback), stored as the
    box in pixels of the source image."""
    interp = cfg.crop.interpolation
    interp_code = int(rng.integers(len(INTERPOLATIONS))) if interp == "random" else INTERPOLATIONS.index(interp)
    left, top, w, h = 0, 0, width, height
    if cfg.crop.enabled:
        area = width * height
        log_ratio = (math.log(cfg.crop.ratio[0]), math.log(cfg.crop.ratio[1]))
        for _ in range(CROP_ATTEMPTS):
            target_area = area * rng.uniform(*cfg.crop.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                break
        else:
            in_ratio = width / height
            lo, hi = cfg.crop.ratio
            if in_ratio < lo:
                w, h = width, int(round(width / lo))
            elif in_ratio > hi:
                w, h = int(round(height * hi)), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
    return {"crop_x0": left, "crop_y0": top, "crop_x1": left + w, "crop_y1": top + h, "interp": interp_code}


def _sample_randaugment(rng: np.random.Generator, cfg: ViewsCfg) -> dict:
    """timm RandAugment: `num_ops` ops chosen with replacement, each applied with prob p, magnitude noise,
    clip to [0, mmax or 10], and the sign timm's `_randomly_negate` would draw, drawn here instead."""
    out = {f"ra{i}_{k}": 0.0 for i in range(MAX_RA_OPS) for k in ("op", "mag", "sign")}
    out.update({f"ra{i}_op": -1 for i in range(MAX_RA_OPS)})
    if not cfg.randaugment.enabled:
        return out
    ra = parse_randaugment(cfg.randaugment.spec)
    for i in range(ra.num_ops):
        name = ra.ops[int(rng.integers(len(ra.ops)))]
        applied = rng.random() <= ra.prob
        if math.isinf(ra.magnitude_std):
            magnitude = rng.uniform(0, ra.magnitude)
        elif ra.magnitude_std > 0:
            magnitude = rng.normal(ra.magnitude, ra.magnitude_std)
        else:
            magnitude = float(ra.magnitude)
        magnitude = max(0.0, min(magnitude, ra.magnitude_max or LEVEL_DENOM))
        sign = -1 if rng.random() > 0.5 else 1
        if applied:
            out[f"ra{i}_op"] = RA_OP_NAMES.index(name)
            out[f"ra{i}_mag"] = float(np.float32(magnitude))
            out[f"ra{i}_sign"] = sign if name in _SIGNED_LEVEL_TO_ARG else 0
    return out


def _sample_erase(rng: np.random.Generator, cfg: ViewsCfg, size: int) -> dict:
    """timm RandomErasing's draw on a size x size view (area 0.02-1/3 of it, log aspect 0.3-1/0.3, whole pixels,
    10 attempts, no erase when all fail). The noise seed is derived from the stored record (`DERIVED_FIELDS`)."""
    out = {"erase": 0, "erase_x0": 0, "erase_y0": 0, "erase_x1": 0, "erase_y1": 0, "erase_seed": 0}
    if not cfg.erasing.enabled or rng.random() > cfg.erasing.prob:
        return out
    for _ in range(ERASE_ATTEMPTS):
        target_area = rng.uniform(*ERASE_AREA) * size * size
        aspect = math.exp(rng.uniform(*ERASE_LOG_ASPECT))
        h, w = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if w < size and h < size:
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            return {"erase": 1, "erase_x0": left, "erase_y0": top, "erase_x1": left + w, "erase_y1": top + h,
                    "erase_seed": 0}
    return out


@functools.lru_cache(maxsize=4096)
def _window_offset(seed: int, epoch: int, shard: int, window: int) -> int:
    return int(np.random.default_rng([seed, epoch, shard, _PART_WINDOW]).integers(window))


def mix_window(cfg: ViewsCfg, epoch: int, shard: int, pos: int, shard_len: int) -> tuple[int, int]:
    """[start, stop): the mix window holding `pos` in cache epoch `epoch`. Windows are `cfg.mix.window`
    positions long, start at an offset drawn from (seed, epoch, shard), and are cut at the shard's ends."""
    window = cfg.mix.window
    offset = _window_offset(cfg.seed, epoch, shard, window)
    start = offset + (pos - offset) // window * window
    return max(0, start), min(shard_len, start + window)


def windows_covering(cfg: ViewsCfg, epoch: int, shard: int, start: int, stop: int, shard_len: int) -> tuple[int, int]:
    """[start, stop) widened to whole mix windows of `epoch`: the positions a reader must hold so that every
    view in [start, stop) finds its partner."""
    if start >= stop:
        return start, stop
    return mix_window(cfg, epoch, shard, start, shard_len)[0], mix_window(cfg, epoch, shard, stop - 1, shard_len)[1]


def mix_windows(cfg: ViewsCfg, epoch: int, shard: int, shard_len: int) -> list[tuple[int, int]]:
    """The mix windows of a whole shard in cache epoch `epoch`, in order."""
    out, pos = [], 0
    while pos < shard_len:
        out.append(mix_window(cfg, epoch, shard, pos, shard_len))
        pos = out[-1][1]
    return out


def cutmix_pixels(cut, cy, cx, size) -> tuple:
    """timm's `rand_bbox` box (yl, yh, xl, xh) on a size x size image, from its side and centre: of one view
    (ints) or of many at once (integer arrays, as `decode_params` derives their lambdas)."""
    return (np.clip(cy - cut // 2, 0, size), np.clip(cy + (cut + 1) // 2, 0, size),
            np.clip(cx - cut // 2, 0, size), np.clip(cx + (cut + 1) // 2, 0, size))


def _box_lam(box: tuple, size):
    """1 - the box's share of the size x size pixels (timm's corrected lambda), in float64."""
    yl, yh, xl, xh = box
    return 1.0 - (yh - yl) * (xh - xl) / (np.float64(size) * size)


def cutmix_box(lam: float, cy: int, cx: int, size: int) -> tuple[tuple[int, int, int, int], float]:
    """timm's `rand_bbox` + `cutmix_bbox_and_lam` (correct_lam=True) on a size x size image, given the box
    centre it would draw: ((yl, yh, xl, xh) in pixels, lam = 1 - box area / image area)."""
    box = cutmix_pixels(int(size * math.sqrt(1.0 - lam)), cy, cx, size)
    return box, _box_lam(box, size)


def _sample_mix(rng: np.random.Generator, cfg: ViewsCfg, window: tuple[int, int], pos: int, size: int) -> dict:
    """timm Mixup per element: mix with prob `prob`, cutmix vs mixup by `switch_prob`, lam ~ Beta(alpha,
    alpha); cutmix draws timm's box in pixels at the teacher's `size` and corrects lam to its pixel area. The
    partner is drawn uniformly from the other positions of p's mix `window`; a window of one does not mix."""
    out = {"mix_mode": 0, "mix_partner": pos, "mix_lam": 1.0, "mix_cx": 0, "mix_cy": 0, "mix_cut": 0}
    mix = cfg.mix
    start, stop = window
    if not mix.enabled or stop - start < 2 or rng.random() >= mix.prob:
        return out
    if mix.mixup_alpha > 0 and mix.cutmix_alpha > 0:
        cutmix = rng.random() < mix.switch_prob
    else:
        cutmix = mix.cutmix_alpha > 0
    alpha = mix.cutmix_alpha if cutmix else mix.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partner = int(rng.integers(start, stop - 1))
    if partner >= pos:  # skip p itself
        partner += 1
    out.update(mix_mode=MIX_MODES.index("cutmix" if cutmix else "mixup"), mix_partner=partner)
    if cutmix:
        cy, cx = int(rng.integers(size)), int(rng.integers(size))  # timm: randint(0, H), randint(0, W)
        cut = int(size * math.sqrt(1.0 - lam))
        out.update(mix_cx=cx, mix_cy=cy, mix_cut=cut)
        lam = _box_lam(cutmix_pixels(cut, cy, cx, size), size)
    out["mix_lam"] = float(np.float32(lam))
    return out


def sample_params(cfg: ViewsCfg, epoch: int, shard: int, pos: int, shard_len: int,
                  src_size: tuple[int, int], *, size: int) -> np.ndarray:
    """The float32 (N_PARAMS,) parameter vector of the view of `pos` in `shard` at cache epoch `epoch`.
    `src_size` = (width, height) of the source image; `shard_len` bounds the mix window; `size` is the
    teacher's resolution, at which the cutmix box is drawn in whole pixels (so lam is its exact area)."""
    check(cfg)
    where = f"view (epoch {epoch}, shard {shard}, position {pos})"
    for name, value in (("epoch", epoch), ("shard", shard), ("pos", pos)):
        if not 0 <= value < MAX_INT:
            raise ValueError(f"{where}: {name}={value} must lie in [0, 2**24)")
    if not pos < shard_len <= MAX_INT:
        raise ValueError(f"{where}: shard_len={shard_len} must exceed the position and be at most 2**24")
    if not 0 < size <= MAX_SIDE:
        raise ValueError(f"{where}: view size {size} (the teacher's resolution) must lie in 1..{MAX_SIDE}")
    width, height = src_size
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ValueError(f"{where}: source size {width}x{height} is outside 1..{MAX_SIDE} px a side; crop boxes "
                         f"are stored as uint16 pixels: downscale the image")

    def rng(part: int) -> np.random.Generator:
        return np.random.default_rng([cfg.seed, epoch, shard, pos, part])

    values = {"flip": int(cfg.flip.enabled and rng(_PART_FLIP).random() < cfg.flip.prob)}
    values.update(_sample_crop(rng(_PART_CROP), cfg, width, height))
    values.update(_sample_randaugment(rng(_PART_RA), cfg))
    values.update(_sample_erase(rng(_PART_ERASE), cfg, size))
    values.update(_sample_mix(rng(_PART_MIX), cfg, mix_window(cfg, epoch, shard, pos, shard_len), pos, size))
    values["grid"] = size
    return quantise_params(np.array([values[f] for f in PARAM_FIELDS], dtype=np.float32))


# --------------------------------------------------------------------------------------------- storage encoding


def encode_params(params: np.ndarray, exact: bool = True) -> np.ndarray:
    """float32 parameter vectors [..., N_PARAMS] -> the cache's uint8 records [..., PARAM_BYTES] (`PARAM_ENCODING`,
    fields in PARAM_FIELDS order, each little-endian; the `DERIVED_FIELDS` take no bytes). `exact` refuses a
    vector that does not come back bit for bit from its record: a value off its field's grid, or a derived field
    that is not what the others give (the sampler snaps every value, so a stored record always decodes to the
    vector the teacher rendered from)."""
    params = np.asarray(params)
    if params.shape[-1:] != (N_PARAMS,):
        raise ValueError(f"view params must have {N_PARAMS} values on the last axis, got shape {params.shape}")
    out = np.empty(params.shape[:-1] + (PARAM_BYTES,), np.uint8)
    mixup = params[..., _FIELD["mix_mode"]] == MIX_MODES.index("mixup")
    at = 0
    for i, name in enumerate(PARAM_FIELDS):
        width, scale, offset = PARAM_ENCODING[name]
        if not width:
            continue
        value = params[..., i].astype(np.float64)
        if name == "mix_lam":  # only a mixup's lambda is stored
            value = np.where(mixup, value, 0.0)
        code = np.rint(value / scale - offset)
        bad = ~((code >= 0) & (code < 256**width))
        if bad.any():
            raise ValueError(f"view params field {name}={value[bad].flat[0]!r} is not storable: the cache holds "
                             f"{8 * width}-bit steps of {scale:g} (offset {offset}); quantise it with views.quantise_params")
        code = code.astype(np.uint32)
        for b in range(width):
            out[..., at + b] = (code >> (8 * b)) & 0xFF
        at += width
    if exact:  # a position with no view holds the fill, all zeros (grid 0): nothing to check there
        differ = (decode_params(out) != params.astype(np.float32)) & (params[..., _FIELD["grid"]] != 0)[..., None]
        if differ.any():
            i = int(np.flatnonzero(differ.reshape(-1, N_PARAMS).any(0))[0])
            name, value = PARAM_FIELDS[i], params[..., i][differ[..., i]].flat[0]
            width, scale, offset = PARAM_ENCODING[name]
            rule = ("it follows from the other fields (DERIVED_FIELDS)" if name in DERIVED_FIELDS else
                    f"the cache holds {8 * width}-bit steps of {scale:g} (offset {offset})")
            raise ValueError(f"view params field {name}={float(value)!r} is not storable: {rule}; quantise it with "
                             f"views.quantise_params")
    return out


def decode_params(records: np.ndarray) -> np.ndarray:
    """The cache's uint8 records [..., PARAM_BYTES] -> float32 parameter vectors [..., N_PARAMS], the
    `DERIVED_FIELDS` filled in."""
    records = np.asarray(records)
    if records.dtype != np.uint8 or records.shape[-1:] != (PARAM_BYTES,):
        raise ValueError(f"stored view records must be uint8 with {PARAM_BYTES} bytes on the last axis, got "
                         f"shape {records.shape} dtype {records.dtype}: the cache was written by another recipe version")
    out = np.empty(records.shape[:-1] + (N_PARAMS,), np.float32)
    at = 0
    for i, name in enumerate(PARAM_FIELDS):
        width, scale, offset = PARAM_ENCODING[name]
        code = np.zeros(records.shape[:-1], np.int64)
        for b in range(width):
            code |= records[..., at + b].astype(np.int64) << (8 * b)
        out[..., i] = (code + offset) * scale
        at += width
    _derive(out, records)
    return out


def _derive(out: np.ndarray, records: np.ndarray) -> None:
    """Fill in the `DERIVED_FIELDS` of decoded vectors `out` from the other fields and the records."""
    mode = out[..., _FIELD["mix_mode"]]
    cut, cy, cx, grid = (out[..., _FIELD[f]].astype(np.int64) for f in ("mix_cut", "mix_cy", "mix_cx", "grid"))
    with np.errstate(divide="ignore", invalid="ignore"):  # grid 0: a position with no view, not a cutmix
        box_lam = _box_lam(cutmix_pixels(cut, cy, cx, grid), grid)
    lam = out[..., _FIELD["mix_lam"]]
    lam[...] = np.where(mode == MIX_MODES.index("cutmix"), box_lam, np.where(mode == MIX_MODES.index("mixup"), lam, 1.0))
    seed = out[..., _FIELD["erase_seed"]]  # 0 from its zero bytes; set where the view is erased
    erased = np.flatnonzero(out[..., _FIELD["erase"]].ravel() == 1)
    if erased.size:  # the crc32 of the record without the lambda's bytes (which only a mixup uses)
        rows = np.delete(np.ascontiguousarray(records).reshape(-1, PARAM_BYTES)[erased], _LAM_BYTES, axis=1)
        seed.reshape(-1)[erased] = [zlib.crc32(row.tobytes()) & (MAX_INT - 1) for row in rows]


def quantise_params(params: np.ndarray) -> np.ndarray:
    """The vector with every field snapped to its stored grid (`PARAM_ENCODING`) and the derived fields set."""
    return decode_params(encode_params(params, exact=False))


# --------------------------------------------------------------------------------------------- decoding


def _decode(params: np.ndarray) -> dict:
    """The stored vector as {field: python number}, with the coded fields checked."""
    params = np.asarray(params)
    if params.shape != (N_PARAMS,) or params.dtype != np.float32:
        raise ValueError(f"view params must be a float32 vector of {N_PARAMS} values (from sample_params or the "
                         f"cache's view array), got shape {params.shape} dtype {params.dtype}")
    p = dict(zip(PARAM_FIELDS, params.tolist()))
    codes = [("interp", len(INTERPOLATIONS)), ("flip", 2), ("erase", 2), ("mix_mode", len(MIX_MODES))]
    codes += [(f"ra{i}_op", len(RA_OP_NAMES)) for i in range(MAX_RA_OPS)]
    for name, n in codes:
        value = p[name]
        if not value.is_integer() or not (-1 if name.endswith("_op") else 0) <= value < n:
            raise ValueError(f"view params field {name}={value} is not a valid code (0..{n - 1}): the vector is "
                             f"corrupt or was written by another recipe version than {RECIPE_VERSION}")
        p[name] = int(value)
    for name in _PIXEL_FIELDS + ("mix_partner", "erase_seed"):
        p[name] = int(p[name])
    if p["grid"] < 1:
        raise ValueError(f"view params field grid={p['grid']} (the teacher's view size) must be at least 1: the vector "
                         f"is corrupt or was written by another recipe version than {RECIPE_VERSION}")
    return p



def _ra_ops(p: dict) -> list[tuple[str, float, int]]:
    return [(RA_OP_NAMES[p[f"ra{i}_op"]], p[f"ra{i}_mag"], int(p[f"ra{i}_sign"]))
            for i in range(MAX_RA_OPS) if p[f"ra{i}_op"] >= 0]


def describe(params: np.ndarray) -> dict:
    """The parameters in words, for reports."""
    p = _decode(params)

    def box(prefix: str) -> list[int]:
        return [p[f"{prefix}_x0"], p[f"{prefix}_y0"], p[f"{prefix}_x1"], p[f"{prefix}_y1"]]

    mode = MIX_MODES[p["mix_mode"]]
    mix = None
    if mode != "none":
        mix = {"mode": mode, "partner": p["mix_partner"], "lam": p["mix_lam"]}
        if mode == "cutmix":
            yl, yh, xl, xh = map(int, cutmix_pixels(p["mix_cut"], p["mix_cy"], p["mix_cx"], p["grid"]))
            mix["box"] = [xl, yl, xh, yh]
    return {  # boxes as [x0, y0, x1, y1] pixels: the crop's of the source, the others' of the teacher's view
        "grid": p["grid"],
        "crop": {"box": box("crop"), "interpolation": INTERPOLATIONS[p["interp"]]},
        "flip": bool(p["flip"]),
        "randaugment": [{"op": name, "magnitude": mag, "sign": sign} for name, mag, sign in _ra_ops(p)],
        "erase": {"box": box("erase"), "seed": p["erase_seed"]} if p["erase"] else None,
        "mix": mix,
    }


def mix_target(params: np.ndarray) -> tuple[int, float]:
    """(partner position, lam): the view's label is lam * own label + (1 - lam) * the partner's.
    An unmixed view gives its own position and 1.0."""
    p = _decode(params)
    return p["mix_partner"], p["mix_lam"]


# --------------------------------------------------------------------------------------------- rendering


def grid_px(px: int, grid: int, n: int) -> int:
    """A pixel boundary of the teacher's grid x grid view on an n x n view (round half up; itself when n = grid)."""
    return (2 * px * n + grid) // (2 * grid)


def _apply_ra_op(img: Image.Image, name: str, magnitude: float, sign: int, resample: int) -> Image.Image:
    if name in _SIGNED_LEVEL_TO_ARG:
        args = _SIGNED_LEVEL_TO_ARG[name](sign * (magnitude / LEVEL_DENOM), RA_HPARAMS)
    else:
        level_fn = LEVEL_TO_ARG[name]
        args = level_fn(magnitude, RA_HPARAMS) if level_fn is not None else ()
    if name.startswith("Posterize") and args[0] <= 0:
        # timm maps magnitude 10 to 0 bits; Pillow >= 13 refuses that, older Pillow returned black: keep black
        return Image.new(img.mode, img.size)
    return NAME_TO_OP[name](img, *args, fillcolor=IMG_MEAN_U8, resample=resample)


def _erase(view: np.ndarray, p: dict, mode: str) -> None:
    size_h, size_w, grid = *view.shape[:2], p["grid"]
    top, bottom = grid_px(p["erase_y0"], grid, size_h), grid_px(p["erase_y1"], grid, size_h)
    left, right = grid_px(p["erase_x0"], grid, size_w), grid_px(p["erase_x1"], grid, size_w)
    if mode == "const":  # timm's zeros in normalised space: the mean colour
        view[top:bottom, left:right] = IMG_MEAN_U8
        return
    view[top:bottom, left:right] = _noise_u8(p["erase_seed"], bottom - top, right - left)


NOISE_DRAW_LEVELS = 1 << 16  # the erasing noise draws one uint16 per pixel and channel


@functools.cache
def _noise_table() -> np.ndarray:
    """(3, 65536) uint8: per channel, the pixel each 16-bit uniform draw u stands for, by the inverse CDF: the
    uint8 value that timm's N(0, 1) pixel-mode noise rounds to in ImageNet's normalised space. A draw maps to
    level v when Phi(z_v) <= (u + 1/2) / 65536 < Phi(z_{v+1}), z_v = ((v - 1/2) / 255 - mean) / std: the
    distribution of the rounded and clipped normal, to within 2**-16 per level."""
    centres = (np.arange(NOISE_DRAW_LEVELS) + 0.5) / NOISE_DRAW_LEVELS
    table = np.empty((3, NOISE_DRAW_LEVELS), np.uint8)
    for c, (mean, std) in enumerate(zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)):
        edges = [0.5 * (1.0 + math.erf(((v - 0.5) / 255.0 - mean) / std / math.sqrt(2.0))) for v in range(1, 256)]
        table[c] = np.searchsorted(np.asarray(edges), centres, side="right")
    return table


def _noise_u8(seed: int, height: int, width: int) -> np.ndarray:
    """timm's pixel-mode erasing noise (N(0, 1) per pixel and channel in the normalised space of a model with
    ImageNet's mean and std) as the uint8 pixels it rounds to, clipped to 0..255: a uint16 uniform draw per value
    mapped through `_noise_table`. The draws are the raw stream of numpy's PCG64 seeded by `seed` (bit
    generators and their seeding are frozen across numpy versions, unlike the Generator's methods), so a view
    replays bit for bit; a table lookup costs a sixth of drawing normals with `RandomState`."""
    count = height * width * 3
    draws = np.random.PCG64(seed).random_raw(-(-count // 4)).astype("<u8").view("<u2")[:count]
    draws = draws.reshape(height, width, 3)
    table, noise = _noise_table(), np.empty((height, width, 3), np.uint8)
    for c in range(3):
        noise[..., c] = table[c][draws[..., c]]
    return noise


def erasing_noise_stats(pixels: int = 1_000_000, seed: int = 0) -> dict:
    """How the uint8 erasing noise differs from timm's N(0, 1), measured in ImageNet's normalised space:
    the share of values clipped at 0 or 255, mean and standard deviation (timm: 0 and 1), the largest gap
    between its CDF and the standard normal's (Kolmogorov-Smirnov), and the rounding step."""
    u8 = _noise_u8(seed, 1, pixels).reshape(-1, 3)
    z = ((u8 / 255.0 - np.asarray(IMAGENET_DEFAULT_MEAN)) / np.asarray(IMAGENET_DEFAULT_STD)).ravel()
    clipped = float(np.mean((u8 == 0) | (u8 == 255)))
    values, counts = np.unique(z, return_counts=True)
    cdf = np.cumsum(counts) / z.size
    normal = np.array([0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in values])
    ks = float(max(np.abs(cdf - normal).max(), np.abs(cdf - counts / z.size - normal).max()))
    return {"clipped_share": clipped, "mean": float(z.mean()), "std": float(z.std()), "ks_vs_normal": ks,
            "rounding_step": float(1.0 / (255.0 * max(IMAGENET_DEFAULT_STD)))}


def erasing_noise_warning(cfg: ViewsCfg, mean, std, who: str) -> str | None:
    """A warning when pixel-mode erasing is on and the model consuming the views (`who`) normalises with
    other statistics than ImageNet's: the erasing noise is timm's N(0, 1) only in ImageNet's normalised space."""
    if not (cfg.erasing.enabled and cfg.erasing.mode == "pixel"):
        return None
    if np.allclose(mean, IMAGENET_DEFAULT_MEAN, atol=1e-3) and np.allclose(std, IMAGENET_DEFAULT_STD, atol=1e-3):
        return None
    scale = np.asarray(IMAGENET_DEFAULT_STD) / np.asarray(std)
    return (f"{who} normalises with mean {tuple(round(float(x), 4) for x in mean)} and std "
            f"{tuple(round(float(x), 4) for x in std)}, not ImageNet's: the random-erasing noise (N(0, 1) in "
            f"ImageNet's normalised space, stored as uint8 pixels) has a standard deviation of about "
            f"{float(scale.mean()):.2f} in its space instead of timm's 1; views.erasing.mode=const erases with "
            f"the mean colour instead")


def render_unmixed(image: np.ndarray | Image.Image, params: np.ndarray, size: int, cfg: ViewsCfg) -> np.ndarray:
    """The (size, size, 3) uint8 view before the mix: crop, flip, RandAugment, erasing, all from `params`.
    `cfg` supplies the recipe constants that are not per view (the erasing mode)."""
    return _render_unmixed(image, _decode(params), size, cfg)


def image_size(image: np.ndarray | Image.Image) -> tuple[int, int]:
    """(width, height) of a source image: decoded (H, W, 3) pixels (`reader.decode_image`) or a PIL image."""
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def _source_rgb(image: np.ndarray | Image.Image, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The source image (its `box`, (x0, y0, x1, y1) pixels, when given) as an RGB PIL image. From decoded
    pixels only the box is copied into PIL's layout; the pixels equal `Image.crop` of the PIL image."""
    if isinstance(image, np.ndarray):
        x0, y0, x1, y1 = box or (0, 0, image.shape[1], image.shape[0])
        return Image.fromarray(image[y0:y1, x0:x1])
    img = image if image.mode == "RGB" else image.convert("RGB")
    return img if box is None else img.crop(box)


def _render_unmixed(image: np.ndarray | Image.Image, p: dict, size: int, cfg: ViewsCfg) -> np.ndarray:
    interp = INTERPOLATIONS[p["interp"]]
    resample = Image.Resampling[interp.upper()]
    # torchvision's resized_crop on a PIL image: crop, then resize to (size, size)
    img = _source_rgb(image, (p["crop_x0"], p["crop_y0"], p["crop_x1"], p["crop_y1"])).resize((size, size), resample)
    if p["flip"]:
        img = TF.hflip(img)
    for name, magnitude, sign in _ra_ops(p):
        img = _apply_ra_op(img, name, magnitude, sign, resample)
    view = np.array(img, dtype=np.uint8)
    if p["erase"]:
        _erase(view, p, cfg.erasing.mode)
    return view


def mix(view: np.ndarray, partner_view: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The final uint8 view from the unmixed view of `params` and its mix partner's unmixed view (same size),
    as `params` say: mixup blends them, cutmix pastes the partner's box. Neither input is modified; an
    unmixed view comes back as `view` itself."""
    return _mix(view, partner_view, _decode(params))


def _mix(view: np.ndarray, partner_view: np.ndarray, p: dict) -> np.ndarray:
    mode = MIX_MODES[p["mix_mode"]]
    if mode == "none":
        return view
    if partner_view.shape != view.shape:
        raise ValueError(f"this view is a {mode} of a {view.shape} view with a partner view of shape "
                         f"{partner_view.shape}: render both at the same size")
    if mode == "mixup":  # rint(lam * a + (1 - lam) * b) in float32, computed in place
        lam = np.float32(p["mix_lam"])
        blend = np.multiply(view, lam, dtype=np.float32)
        blend += np.multiply(partner_view, np.float32(1.0) - lam, dtype=np.float32)
        return np.clip(np.rint(blend, out=blend), 0, 255, out=blend).astype(np.uint8)
    size_h, size_w, grid = *view.shape[:2], p["grid"]
    yl, yh, xl, xh = cutmix_pixels(p["mix_cut"], p["mix_cy"], p["mix_cx"], grid)
    top, bottom = grid_px(yl, grid, size_h), grid_px(yh, grid, size_h)
    left, right = grid_px(xl, grid, size_w), grid_px(xh, grid, size_w)
    out = view.copy()
    out[top:bottom, left:right] = partner_view[top:bottom, left:right]
    return out


def render(image: np.ndarray | Image.Image, params: np.ndarray, size: int, cfg: ViewsCfg,
           partner_image: np.ndarray | Image.Image | None = None, partner_params: np.ndarray | None = None) -> np.ndarray:
    """The final (size, size, 3) uint8 view: the unmixed view mixed with the partner's own unmixed view
    (rendered under the partner's params) when `params` say so. Loops over many views of one shard render
    each unmixed view once instead (`ShardViews`)."""
    p = _decode(params)
    view = _render_unmixed(image, p, size, cfg)
    mode = MIX_MODES[p["mix_mode"]]
    if mode == "none":
        return view
    if partner_image is None or partner_params is None:
        raise ValueError(f"this view is a {mode} with the sample at position {p['mix_partner']} of the same shard: "
                         f"pass that sample's image as partner_image and its view params as partner_params")
    return _mix(view, render_unmixed(partner_image, partner_params, size, cfg), p)


class ShardViews:
    """The final views of one shard's positions under one set of stored params, each position's unmixed view
    rendered once however many views mix with it (`render` would draw a partner again for every view that
    mixes with it). `images` and `params` map a position to its source image and its parameter vector. A
    partner lies less than a mix window from its view, so when positions are asked for in order the unmixed
    views more than `window - 1` positions behind are dropped: each unmixed view is rendered once and at most
    2 * window - 1 are held. Used by every loop that renders a run of views: stage 1, the student's reader
    and the cache checks."""

    def __init__(self, images, params, size: int, cfg: ViewsCfg):
        self.images, self.params, self.size, self.cfg = images, params, size, cfg
        self._unmixed: dict[int, np.ndarray] = {}
        self._decoded: dict[int, dict] = {}  # each position's params decoded once

    def _params(self, pos: int) -> dict:
        p = self._decoded.get(pos)
        if p is None:
            p = self._decoded[pos] = _decode(self.params[pos])
        return p

    def partner(self, pos: int) -> int:
        """The position `pos` mixes with; itself when the partner was skipped as a bad sample (not in
        `images`): stage 1 then mixed the view with itself, and every replay does the same."""
        partner = self._params(pos)["mix_partner"]
        return pos if partner != pos and partner not in self.images else partner

    def unmixed(self, pos: int) -> np.ndarray:
        view = self._unmixed.get(pos)
        if view is None:
            view = self._unmixed[pos] = _render_unmixed(self.images[pos], self._params(pos), self.size, self.cfg)
        return view

    def view(self, pos: int) -> np.ndarray:
        """The final view of `pos`, equal to `render` with its partner's image and params."""
        reach = pos - (self.cfg.mix.window - 1)  # no view at pos or later mixes with a position before this
        for old in [q for q in self._unmixed if q < reach]:
            del self._unmixed[old]
            self._decoded.pop(old, None)
        own = self.unmixed(pos)
        return _mix(own, self.unmixed(self.partner(pos)), self._params(pos))


def view_digest(view: np.ndarray) -> int:
    """24-bit blake2b digest of a uint8 view's shape and bytes, as an int that fits numpy uint32. A corruption
    and drift check, not a security one: a changed view goes unnoticed with probability 2**-24 (6e-8) per view,
    and a drift (a library that renders differently) changes many views, so a check of a few hundred catches it
    with certainty; 24 bits cost 3 B a view in the cache where 32 cost 4."""
    view = np.asarray(view)
    if view.dtype != np.uint8:
        raise ValueError(f"view_digest takes the uint8 view (before normalisation), got dtype {view.dtype}")
    h = hashlib.blake2b(digest_size=3)
    h.update(np.asarray(view.shape, dtype="<u8").tobytes())
    h.update(np.ascontiguousarray(view).tobytes())
    return int.from_bytes(h.digest(), "little")


def eval_view(image: np.ndarray | Image.Image, size: int, crop_pct: float, interpolation: str = "bicubic") -> np.ndarray:
    """The evaluation view (timm's eval transform): resize the shorter side to size / crop_pct, centre-crop
    size x size. Deterministic; used for the teacher's cached val logits and the student's evaluation."""
    img = TF.resize(_source_rgb(image), math.floor(size / crop_pct), interpolation=InterpolationMode(interpolation))
    return np.array(TF.center_crop(img, [size, size]), dtype=np.uint8)
