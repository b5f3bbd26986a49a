"""The teacher: a frozen timm model, from timm's pretrained weights or a local checkpoint.

`regnety_160.deit_in1k` is DeiT's teacher; for the embedded digits default `train_teacher` fits a small
RegNetY on the train shards (there are no downloadable weights here) and writes a DeiT-layout checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.manifest import TeacherCfg


class TeacherError(RuntimeError):
    """The teacher cannot be built or loaded; the message names the manifest field and the fix."""


@dataclass(frozen=True, slots=True)
class Teacher:
    model: torch.nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    identity: dict  # name, weights sha256, input size: goes into the cache attributes


def create_model(cfg: TeacherCfg, num_classes: int, pretrained: bool = False) -> torch.nn.Module:
    try:
        return timm.create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, **cfg.model_args)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise TeacherError(f"teacher.model={cfg.model!r} is not a timm model; e.g. regnety_160.deit_in1k "
                               f"(timm.list_models('regnety*') lists the family)") from e
        raise TeacherError(f"teacher.model={cfg.model!r} could not be created: {e}. If pretrained weights "
                           f"cannot be downloaded here, set teacher.checkpoint to a local file") from e


def _state_dict_from_file(path: Path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # DeiT's {'model': ..., 'optimizer': ...} layout
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherError(f"teacher.checkpoint={path} holds no state dict (plain, or DeiT's {{'model': ...}})")
    return obj


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _identity(cfg: TeacherCfg, sha: str, pcfg: dict) -> dict:
    return {"model": cfg.model, "model_args": cfg.model_args, "sha256": sha, "img_size": cfg.img_size,
            "mean": list(pcfg["mean"]), "std": list(pcfg["std"]), "crop_pct": pcfg.get("crop_pct", 0.875)}


def _checkpoint_path(cfg: TeacherCfg) -> Path:
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise TeacherError(f"teacher.checkpoint={path} does not exist: run `make teacher` to train the demo "
                           f"teacher, or point teacher.checkpoint at a local weights file")
    return path


def teacher_identity(cfg: TeacherCfg, num_classes: int) -> dict:
    """The teacher's identity for the cache fingerprint, without loading a checkpoint's weights (a student
    checks its cache against it before training; RegNetY-16GF weights are 330 MB)."""
    if not cfg.checkpoint:
        return load_teacher(cfg, num_classes).identity  # timm weights: the hash is of the loaded state
    try:
        pcfg = timm.models.get_pretrained_cfg(cfg.model).to_dict()
    except (AttributeError, RuntimeError):
        pcfg = create_model(cfg, num_classes).pretrained_cfg
    return _identity(cfg, file_sha256(_checkpoint_path(cfg)), pcfg)


def load_teacher(cfg: TeacherCfg, num_classes: int, device: torch.device | str = "cpu") -> Teacher:
    """The frozen teacher in eval mode with its own normalisation (from its pretrained config)."""
    if cfg.checkpoint:
        path = _checkpoint_path(cfg)
        model = create_model(cfg, num_classes)
        state = _state_dict_from_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TeacherError(f"teacher.checkpoint={path} does not fit teacher.model={cfg.model!r} "
                               f"(num_classes={num_classes}, model_args={cfg.model_args}): missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        sha = file_sha256(path)
    elif cfg.pretrained:
        model = create_model(cfg, num_classes, pretrained=True)
        sha = state_sha256(model)
    else:
        raise TeacherError("the teacher has no weights: set teacher.checkpoint to a local file, or "
                           "teacher.pretrained: true for timm's weights (e.g. regnety_160.deit_in1k)")
    model.eval().requires_grad_(False).to(device)
    pcfg = model.pretrained_cfg
    identity = _identity(cfg, sha, pcfg)
    return Teacher(model, tuple(pcfg["mean"]), tuple(pcfg["std"]), identity["crop_pct"], identity)


def normalize(views_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float, normalised with the model's own mean and std."""
    x = views_uint8.permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def decode_split(shardlist_path: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every sample of a (small) split as uint8 [N, size, size, 3] images, labels and class names."""
    from pipeline.reader import read_shard
    from pipeline.shards import load_shardlist

    shardlist = load_shardlist(shardlist_path)
    images, labels = [], []
    for shard in range(len(shardlist.shards)):
        for sample in read_shard(shardlist, shard):
            images.append(np.asarray(sample.image.convert("RGB").resize((size, size))))
            labels.append(sample.label)
    return np.stack(images), np.array(labels), list(shardlist.classes)


def train_teacher(cfg: TeacherCfg, images: np.ndarray, labels: np.ndarray, val_images: np.ndarray,
                  val_labels: np.ndarray, num_classes: int, out: str | Path) -> dict:
    """Fit `cfg.model` from scratch on uint8 [N, H, W, 3] images (the digits default) and write a DeiT-layout
    checkpoint atomically. Augmentation: random resized crops and small rotations, from a seeded generator.

    Returns {'val_acc', 'checkpoint', 'seconds'}."""
    import time

    from torchvision.transforms import v2

    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = create_model(cfg, num_classes)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels).long()
    aug = v2.Compose([v2.RandomResizedCrop(cfg.img_size, scale=(0.6, 1.0), antialias=True),
                      v2.RandomRotation(10)])
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps = tc.epochs * -(-len(x_all) // tc.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=steps, pct_start=0.15)
    start = time.time()
    bar = tqdm(total=steps, desc="teacher", unit="step")
    for _ in range(tc.epochs):
        model.train()
        order = torch.randperm(len(x_all))
        for i in range(0, len(order), tc.batch_size):
            idx = order[i:i + tc.batch_size]
            batch = torch.stack([aug(x_all[j].permute(2, 0, 1)) for j in idx]).permute(0, 2, 3, 1)
            loss = F.cross_entropy(model(normalize(batch, mean, std)), y_all[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    val_acc = evaluate_images(model, val_images, val_labels, cfg.img_size, mean, std)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "model_name": cfg.model, "model_args": cfg.model_args,
                "num_classes": num_classes, "val_acc": val_acc}, tmp)
    os.replace(tmp, out)
    result = {"val_acc": val_acc, "checkpoint": str(out), "seconds": round(time.time() - start, 1)}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return result


@torch.inference_mode()
def evaluate_images(model, images: np.ndarray, labels: np.ndarray, size: int, mean, std) -> float:
    model.eval()
    x = torch.from_numpy(images)
    if x.shape[1] != size:
        x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(size, size), mode="bicubic",
                          antialias=True).clamp(0, 255).round().byte().permute(0, 2, 3, 1)
    preds = torch.cat([model(normalize(x[i:i + 256], mean, std)).argmax(1) for i in range(0, len(x), 256)])
    return float((preds.numpy() == labels).mean())
