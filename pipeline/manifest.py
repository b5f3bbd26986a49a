"""Run specs: the manifest's sections as dataclasses, the valid range of every number, and the cross-field
checks, which sit next to the dataclasses and name the key to change.

The dataclasses need none of the modules they configure: `pipeline.manifest_loader` reads a YAML file and
its `--set` overrides strictly into them and runs these checks, then the view recipe's own
(`pipeline.views.check`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ManifestError(ValueError):
    """A manifest (or an override of one) is malformed; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------- sections


@dataclass(slots=True)
class DataCfg:
    """Where the shards are. `train`/`val` are shard-list JSON files (see `pipeline.shards`) or WebDataset URLs:
    brace patterns, globs, lists, file://, s3://, gs://, http(s)://, pipe: (with `allow_pipe`), or a directory
    with timm's `_info.json` (see `pipeline.storage`)."""

    train: str | list[str] = "data/digits/train/shardlist.json"
    val: str | list[str] = "data/digits/val/shardlist.json"
    builtin: Literal["digits", "fashion_mnist", "none"] = "digits"  # what `make shards` builds when no SRC is given
    shard_size: int = 300
    # the held-out test split (a shard list): evaluated once per run by `distill demo`, never used to choose
    test: str | None = None
    # fashion_mnist only: the train subset's size (None = all 60,000 but val) and the validation split carved
    # from the rest of the train file (disjoint, stratified, drawn from the shards' seed)
    train_size: int | None = None
    val_size: int = 1000
    on_error: Literal["raise", "skip"] = "raise"
    class_map: str | None = None  # JSON class names for URL specs (default: "0".."<largest cls>")
    allow_pipe: bool = False  # pipe: URLs run shell commands: only with this opt-in (or DISTILL_ALLOW_PIPE=1)
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec for the shards' store


@dataclass(slots=True)
class TeacherTrainCfg:
    """`make teacher`: trains a small teacher on the train shards (the embedded default has no weights)."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0


@dataclass(slots=True)
class TeacherCfg:
    """A timm model: `pretrained: true` loads timm's weights for `model` (a name with its pretrained tag,
    e.g. `regnety_160.deit_in1k`, or `hf-hub:org/name`; `pretrained_cfg_overlay: {file: ...}` takes them from a
    local file); otherwise `checkpoint` is a local weights file in any layout timm reads (plain, `state_dict`,
    `model`, `module.` prefixes, `.safetensors`), its EMA weights when `use_ema`."""

    model: str = "regnety_160.deit_in1k"
    pretrained: bool = False
    checkpoint: str | None = None
    use_ema: bool = False
    pretrained_cfg_overlay: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    train: TeacherTrainCfg = field(default_factory=TeacherTrainCfg)


@dataclass(slots=True)
class CropCfg:
    enabled: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    interpolation: Literal["bilinear", "bicubic", "random"] = "bicubic"


@dataclass(slots=True)
class FlipCfg:
    enabled: bool = True
    prob: float = 0.5


@dataclass(slots=True)
class RandAugmentCfg:
    enabled: bool = True
    spec: str = "rand-m9-mstd0.5-inc1"


@dataclass(slots=True)
class ErasingCfg:
    enabled: bool = True
    prob: float = 0.25
    mode: Literal["pixel", "const"] = "pixel"


@dataclass(slots=True)
class MixCfg:
    enabled: bool = True
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    window: int = 16  # the partner is drawn inside aligned blocks of this many consecutive shard positions


@dataclass(slots=True)
class ViewsCfg:
    """The view recipe. Every part can be switched off; `seed` fixes every view of every cache epoch."""

    seed: int = 0
    crop: CropCfg = field(default_factory=CropCfg)
    flip: FlipCfg = field(default_factory=FlipCfg)
    randaugment: RandAugmentCfg = field(default_factory=RandAugmentCfg)
    erasing: ErasingCfg = field(default_factory=ErasingCfg)
    mix: MixCfg = field(default_factory=MixCfg)
    # repeated augmentation (DeiT's RASampler; DeiT uses 3): each student epoch trains on 1/repeats of the images,
    # each in `repeats` distinct cached views. A rule of the student's replay: the cache does not depend on it.
    repeats: int = 1


@dataclass(slots=True)
class CacheCfg:
    path: str = "caches/demo"  # a local path, file://, s3://, gs:// (any fsspec store)
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec/zarr for the cache's store
    allow_no_lock: bool = False  # on a store without exclusive create: the user guarantees one writer per rank
    epochs: int = 4
    top_k: int = 10
    batch_size: int = 128
    workers: int = 0
    shards_per_unit: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tail_samples: int = 0  # classes drawn per train view from the teacher's tail (unbiased soft targets)
    compile: bool = False  # torch.compile the teacher in stage 1 (pays off on a GPU over many batches)


@dataclass(slots=True)
class OptimCfg:
    """AdamW through timm's factory. `lr` is the rate for `lr_batch` images; it scales linearly with the
    global batch size (DeiT: 5e-4 x batch/512)."""

    name: str = "adamw"
    lr: float = 5e-4
    lr_batch: int = 512
    weight_decay: float = 0.05
    clip_grad: float | None = None


@dataclass(slots=True)
class SchedCfg:
    name: str = "cosine"
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


@dataclass(slots=True)
class LogCfg:
    """What a training run reports while it runs (`pipeline.run_log`)."""

    every: int = 50  # steps between log lines and metric writes (and, on a GPU, reads of the finiteness flag)
    tensorboard: bool = False  # also write TensorBoard event files to run_dir/tensorboard (needs `tensorboard`)


@dataclass(slots=True)
class StudentCfg:
    """A timm distilled ViT trained from the cache."""

    model: str = "deit_tiny_distilled_patch16_224"
    model_args: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    patch_size: int = 16
    # none: both heads on the ground truth; deit_none: DeiT's (class head only); soft/hard: DeiT's distillation
    distillation: Literal["none", "soft", "hard", "deit_none"] = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    epochs: int = 300
    batch_size: int = 64
    smoothing: float = 0.1
    drop_path: float = 0.1
    ema: float | None = None
    seed: int = 0
    # the seed of the shard order and shuffle (None = student.seed); students that differ only in `seed` share a
    # data pass in a sweep when this is set (pipeline.sweep)
    data_seed: int | None = None
    # a smaller labelled split: only the first N train shards' labels are used (None = all); the other shards'
    # views train the distillation head on the teacher's answers alone
    labelled_shards: int | None = None
    workers: int = 0
    shuffle_buffer: int = 512
    optim: OptimCfg = field(default_factory=OptimCfg)
    sched: SchedCfg = field(default_factory=SchedCfg)
    run_dir: str = "runs/demo/student"
    ckpt_every: int = 200  # steps between atomic checkpoints
    eval_every: int = 1  # epochs between evaluations
    verify_sample: float = 0.01  # share of cached views whose digest is re-checked before training; 0 = off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    channels_last: bool = True
    log: LogCfg = field(default_factory=LogCfg)

    def shuffle_seed(self) -> int:
        """The seed of the data order: `data_seed`, or `seed` when it is not set."""
        return self.seed if self.data_seed is None else self.data_seed


@dataclass(slots=True)
class Manifest:
    name: str = "demo"
    data: DataCfg = field(default_factory=DataCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    views: ViewsCfg = field(default_factory=ViewsCfg)
    cache: CacheCfg = field(default_factory=CacheCfg)
    student: StudentCfg = field(default_factory=StudentCfg)

    def check(self) -> "Manifest":
        """Range checks of every number (`RANGES`), then cross-field checks; each names the key to change.
        (The view recipe's own checks, `views.check`, follow in `manifest_loader.from_dict`.)"""
        check_ranges(self)
        for key in ("cache.path", "student.run_dir"):
            dangling_symlink(key, field_value(self, key))
        s = self.student
        if s.img_size % s.patch_size:
            raise ManifestError(
                f"student.img_size={s.img_size} is not divisible by student.patch_size={s.patch_size}: "
                f"change one so the patches tile the image (e.g. img_size={s.img_size // s.patch_size * s.patch_size or s.patch_size})"
            )
        if self.teacher.pretrained and self.teacher.checkpoint:
            raise ManifestError("teacher.pretrained and teacher.checkpoint are both set: keep one")
        if self.views.repeats > 1 and self.cache.epochs % self.views.repeats:
            r, e = self.views.repeats, self.cache.epochs
            raise ManifestError(f"views.repeats={r} replays each image's views from {r} cache epochs at a time, so "
                                f"cache.epochs={e} must be a multiple of {r}: set cache.epochs to "
                                f"{' or '.join(str(x) for x in (e // r * r, (e // r + 1) * r) if x)}")
        lo, hi = self.views.crop.scale
        if not 0 < lo <= hi <= 1:
            raise ManifestError(f"views.crop.scale={[lo, hi]} must satisfy 0 < min <= max <= 1")
        return self


# --------------------------------------------------------------------------------------------- ranges


@dataclass(frozen=True, slots=True)
class Range:
    """The valid values of a number: lo <= x <= hi, either end open; None where unbounded. Non-finite
    floats (NaN, inf) are never valid."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"be {'>' if self.lo_open else '>='} {self.lo}"
        return f"lie in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


COUNT, NONNEG, POSITIVE, SHARE = Range(1), Range(0), Range(0, lo_open=True), Range(0, 1)

# Every int and float field of the manifest, by dotted key (a test keeps this complete). None is checked by
# the type (`ema: float | None`), not here.
RANGES: dict[str, Range] = {
    "data.shard_size": COUNT, "data.train_size": COUNT, "data.val_size": COUNT,
    "teacher.img_size": COUNT,
    "teacher.train.epochs": COUNT, "teacher.train.batch_size": COUNT, "teacher.train.lr": POSITIVE,
    "teacher.train.weight_decay": NONNEG, "teacher.train.seed": NONNEG,
    "views.seed": NONNEG,
    "views.crop.scale[0]": Range(0, 1, lo_open=True), "views.crop.scale[1]": Range(0, 1, lo_open=True),
    "views.crop.ratio[0]": POSITIVE, "views.crop.ratio[1]": POSITIVE,
    "views.flip.prob": SHARE, "views.erasing.prob": SHARE,
    "views.mix.mixup_alpha": NONNEG, "views.mix.cutmix_alpha": NONNEG, "views.mix.prob": SHARE,
    "views.mix.switch_prob": SHARE, "views.mix.window": COUNT, "views.repeats": COUNT,
    "cache.epochs": COUNT, "cache.top_k": COUNT, "cache.batch_size": COUNT, "cache.workers": NONNEG,
    "cache.shards_per_unit": COUNT, "cache.tail_samples": NONNEG,
    "student.img_size": COUNT, "student.patch_size": COUNT, "student.alpha": SHARE, "student.tau": POSITIVE,
    "student.epochs": COUNT, "student.batch_size": COUNT, "student.smoothing": Range(0, 1, hi_open=True),
    "student.drop_path": Range(0, 1, hi_open=True), "student.ema": Range(0, 1, lo_open=True, hi_open=True),
    "student.seed": NONNEG, "student.labelled_shards": NONNEG, "student.workers": NONNEG,
    "student.shuffle_buffer": NONNEG,  # 0 or 1: no shuffling
    "student.optim.lr": POSITIVE, "student.optim.lr_batch": COUNT, "student.optim.weight_decay": NONNEG,
    "student.optim.clip_grad": POSITIVE,
    "student.sched.warmup_epochs": NONNEG, "student.sched.warmup_lr": NONNEG, "student.sched.min_lr": NONNEG,
    "student.ckpt_every": NONNEG,  # 0: a checkpoint at the end only
    "student.eval_every": NONNEG,  # 0: evaluate after the last epoch only
    "student.verify_sample": SHARE,
    "student.data_seed": NONNEG, "student.log.every": COUNT,
}


def field_value(cfg: Any, key: str) -> Any:
    """The value at a dotted key (`student.optim.lr`, `views.crop.scale[0]`)."""
    for part in key.split("."):
        name, _, index = part.partition("[")
        cfg = getattr(cfg, name)
        if index:
            cfg = cfg[int(index.rstrip("]"))]
    return cfg


def check_ranges(m: "Manifest", under: str = "") -> None:
    """Every number of `m` (or those under the dotted key `under`) lies in its `RANGES` range."""
    for key, valid in RANGES.items():
        if under and not (key == under or key.startswith((f"{under}.", f"{under}["))):
            continue
        value = field_value(m, key)
        if value is not None and value not in valid:
            default = field_value(Manifest(), key)
            raise ManifestError(f"{key}={value!r} must {valid}"
                                + (f": set it to a valid value (default {default!r})" if default is not None else ""))


def dangling_symlink(key: str, path: str) -> None:
    """A local path that is a symlink to nothing makes every later mkdir fail with a bare OSError: say so now."""
    if "://" in path and not path.startswith("file://"):
        return
    local = Path(path.removeprefix("file://"))
    if local.is_symlink() and not local.exists():
        raise ManifestError(f"{key}={path} is a symlink to {os.readlink(local)}, which does not exist: create the "
                            f"directory it points to, remove the link, or set {key} to another path")


# --------------------------------------------------------------------------------------------- keys


def all_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the manifest schema (the keys of free-form mappings such as model_args excluded)."""
    keys = []
    for name, tp in typing.get_type_hints(cls or Manifest).items():
        key = f"{prefix}{name}"
        keys += all_keys(tp, f"{key}.") if dataclasses.is_dataclass(tp) else [key]
    return keys


def did_you_mean(key: str, spelling: bool = True) -> str:
    """`; did you mean student.optim.lr?` for `student.lr`: a key with the same last part (in the same
    section first), else (with `spelling`) the closest spelling; empty when nothing is close."""
    keys = all_keys()
    leaf, section = key.rsplit(".", 1)[-1], key.split(".", 1)[0]
    same_leaf = sorted((k for k in keys if k.rsplit(".", 1)[-1] == leaf), key=lambda k: k.split(".", 1)[0] != section)
    close = same_leaf or (difflib.get_close_matches(key, keys, n=1, cutoff=0.6) if spelling else [])
    return f"; did you mean {close[0]}?" if close else ""


def to_dict(cfg: Any) -> dict:
    """The manifest as plain YAML-able data (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)
