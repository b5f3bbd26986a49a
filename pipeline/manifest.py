"""Run specs: YAML manifests loaded strictly into dataclasses.

An unknown key, a wrong type or a bad value raises `ManifestError` naming its dotted path
(`student.optim.lr`) and the valid choices. Cross-field checks sit next to the dataclasses and name the
key to change. Overrides (`--set student.alpha=0.5`) go through the same checks.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ManifestError(ValueError):
    """A manifest (or an override of one) is malformed; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------- sections


@dataclass(slots=True)
class DataCfg:
    """Where the shards are. `train`/`val` are shard-list JSON files (see `pipeline.shards`)."""

    train: str = "data/digits/train/shardlist.json"
    val: str = "data/digits/val/shardlist.json"
    builtin: Literal["digits", "fashion_mnist", "none"] = "digits"  # what `make shards` builds when no SRC is given
    shard_size: int = 300
    # the held-out test split (a shard list): evaluated once per run by `distill demo`, never used to choose
    test: str | None = None
    # fashion_mnist only: the train subset's size (None = all 60,000 but val) and the validation split carved
    # from the rest of the train file (disjoint, stratified, drawn from the shards' seed)
    train_size: int | None = None
    val_size: int = 1000
    on_error: Literal["raise", "skip"] = "raise"


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
    """A timm model: `pretrained: true` loads timm's weights for `model` (e.g. `regnety_160.deit_in1k`);
    otherwise `checkpoint` is a local state dict (plain, or DeiT's `{'model': ...}` layout)."""

    model: str = "regnety_160.deit_in1k"
    pretrained: bool = False
    checkpoint: str | None = None
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


@dataclass(slots=True)
class CacheCfg:
    path: str = "caches/demo"
    epochs: int = 4
    top_k: int = 10
    batch_size: int = 128
    workers: int = 0
    shards_per_unit: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"


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
class StudentCfg:
    """A timm distilled ViT trained from the cache."""

    model: str = "deit_tiny_distilled_patch16_224"
    model_args: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    patch_size: int = 16
    distillation: Literal["none", "soft", "hard"] = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    epochs: int = 300
    batch_size: int = 64
    smoothing: float = 0.1
    drop_path: float = 0.1
    ema: float | None = None
    seed: int = 0
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


@dataclass(slots=True)
class Manifest:
    name: str = "demo"
    data: DataCfg = field(default_factory=DataCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    views: ViewsCfg = field(default_factory=ViewsCfg)
    cache: CacheCfg = field(default_factory=CacheCfg)
    student: StudentCfg = field(default_factory=StudentCfg)

    def check(self) -> "Manifest":
        """Cross-field checks; each names the key to change."""
        s = self.student
        if s.img_size % s.patch_size:
            raise ManifestError(
                f"student.img_size={s.img_size} is not divisible by student.patch_size={s.patch_size}: "
                f"change one so the patches tile the image (e.g. img_size={s.img_size // s.patch_size * s.patch_size or s.patch_size})"
            )
        for key, value in (("cache.top_k", self.cache.top_k), ("cache.epochs", self.cache.epochs),
                           ("cache.batch_size", self.cache.batch_size), ("cache.shards_per_unit", self.cache.shards_per_unit),
                           ("student.epochs", s.epochs), ("student.batch_size", s.batch_size), ("data.shard_size", self.data.shard_size),
                           ("teacher.img_size", self.teacher.img_size), ("views.mix.window", self.views.mix.window)):
            if value < 1:
                raise ManifestError(f"{key}={value} must be at least 1")
        for key, value in (("student.alpha", s.alpha), ("views.flip.prob", self.views.flip.prob),
                           ("views.erasing.prob", self.views.erasing.prob), ("views.mix.prob", self.views.mix.prob),
                           ("views.mix.switch_prob", self.views.mix.switch_prob), ("student.smoothing", s.smoothing)):
            if not 0.0 <= value <= 1.0:
                raise ManifestError(f"{key}={value} must lie in [0, 1]")
        if s.tau <= 0:
            raise ManifestError(f"student.tau={s.tau} must be positive")
        if self.teacher.pretrained and self.teacher.checkpoint:
            raise ManifestError("teacher.pretrained and teacher.checkpoint are both set: keep one")
        lo, hi = self.views.crop.scale
        if not 0 < lo <= hi <= 1:
            raise ManifestError(f"views.crop.scale={[lo, hi]} must satisfy 0 < min <= max <= 1")
        from pipeline import views  # the recipe's own checks (RandAugment spec, alphas, ...) live with it

        views.check(self.views)
        return self


# --------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ManifestError as e:
                errors.append(str(e))
        raise ManifestError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ManifestError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ManifestError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ManifestError(f"{path}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ManifestError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ManifestError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported manifest annotation {tp!r} at {path}")


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise ManifestError(f"unknown key {where}{unknown[0]}: valid keys here are {names}")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """`student.optim.lr=1e-3` -> {'student': {'optim': {'lr': 0.001}}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ManifestError(f"override {text!r} must look like key.path=value (e.g. student.alpha=0.5)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


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


def from_dict(data: dict, overrides: list[dict] | tuple = ()) -> Manifest:
    for over in overrides:
        data = _merge(data, over)
    return _build(Manifest, data, "").check()


def read_yaml_mapping(path: Path, error: type[Exception], what: str, keys: list[str]) -> dict:
    """A YAML file whose top level is a mapping; `error` names the file and the fix otherwise."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist: pass a YAML file (see manifests/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping with keys {keys}")
    return data


def load(path: str | Path, overrides: list[str] | tuple = ()) -> Manifest:
    """Load a manifest file strictly, apply `key.path=value` overrides, run the cross-field checks."""
    path = Path(path)
    data = read_yaml_mapping(path, ManifestError, "manifest", [f.name for f in dataclasses.fields(Manifest)])
    try:
        return from_dict(data, [parse_override(o) for o in overrides])
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
