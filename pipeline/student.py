"""The student: a timm distilled ViT (`deit_*_distilled_*`, any size through timm's arguments).

Training returns the class-head and distillation-head logits as a pair (timm's `distilled_training`
mode); evaluation needs the two heads separately as well as their average, which timm's eval forward
folds into one, so `heads` reads them off the two prefix tokens itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch

from pipeline.manifest import ManifestError, StudentCfg


@dataclass(frozen=True, slots=True)
class Student:
    model: torch.nn.Module  # a timm VisionTransformerDistilled
    mean: tuple[float, float, float]  # the student's own input normalisation (timm pretrained cfg)
    std: tuple[float, float, float]
    crop_pct: float  # for the eval view (resize to size / crop_pct, centre crop)


def create_student(cfg: StudentCfg, num_classes: int) -> Student:
    """The distilled ViT of `student.model` at `student.img_size`/`student.patch_size`, randomly initialised,
    in distilled-training mode (its training forward returns (class logits, distillation logits))."""
    if not timm.is_model(cfg.model):
        raise ManifestError(f"student.model={cfg.model!r} is not a timm model; distilled ViTs are "
                            f"{timm.list_models('*distilled*')}")
    try:
        model = timm.create_model(cfg.model, num_classes=num_classes, img_size=cfg.img_size,
                                  patch_size=cfg.patch_size, drop_path_rate=cfg.drop_path, **cfg.model_args)
    except TypeError as e:
        raise ManifestError(f"student.model_args={cfg.model_args} do not fit {cfg.model!r}: {e}") from None
    if not hasattr(model, "set_distilled_training"):
        raise ManifestError(f"student.model={cfg.model!r} has no distillation head; pick a distilled ViT, one of "
                            f"{timm.list_models('*distilled*')}")
    model.set_distilled_training(True)
    pcfg = model.pretrained_cfg
    return Student(model, tuple(pcfg["mean"]), tuple(pcfg["std"]), float(pcfg.get("crop_pct", 0.875)))


def heads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-head logits, distillation-head logits) in any mode; the joint prediction is their average,
    as timm's eval forward computes it."""
    tokens = model.forward_features(x)
    return model.head(model.head_drop(tokens[:, 0])), model.head_dist(model.head_drop(tokens[:, 1]))
