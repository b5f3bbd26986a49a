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
from PIL import Image
from tqdm import tqdm

from pipeline.manifest import ManifestError, TeacherCfg


class TeacherError(RuntimeError):
    """The teacher cannot be built or loaded; the message names the manifest field and the fix."""


@dataclass(frozen=True, slots=True)
class Teacher:
    model: torch.nn.Module
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    identity: dict  # name, weights sha256, input size: goes into the cache attributes


def create_model(cfg: TeacherCfg, num_classes: int | None, pretrained: bool = False) -> torch.nn.Module:
    """`cfg.model` from timm; `num_classes=None` keeps the head of the pretrained config (1000 for ImageNet tags)."""
    kwargs = dict(cfg.model_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if cfg.pretrained_cfg_overlay:
        kwargs["pretrained_cfg_overlay"] = dict(cfg.pretrained_cfg_overlay)
    try:
        return timm.create_model(cfg.model, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise TeacherError(f"teacher.model={cfg.model!r} is not a timm model; e.g. regnety_160.deit_in1k "
                               f"(timm.list_models('regnety*') lists the family)") from e
        raise TeacherError(f"teacher.model={cfg.model!r} could not be created: {e}. If pretrained weights "
                           f"cannot be downloaded here, set teacher.checkpoint to a local file, or "
                           f"teacher.pretrained_cfg_overlay: {{file: /path/to/weights}}") from e
    except Exception as e:  # downloads fail in many ways (OSError, huggingface_hub's errors, ...)
        if not pretrained:
            raise
        overlay = ("teacher.pretrained_cfg_overlay: {file: /path/to/weights}" if not cfg.model.startswith("hf-hub:")
                   else "the timm name with its tag instead of the hf-hub: name (it needs the Hub for its config), "
                        "e.g. regnety_160.deit_in1k, with teacher.pretrained_cfg_overlay: {file: /path/to/weights}")
        raise TeacherError(f"teacher.model={cfg.model!r}: its pretrained weights could not be loaded ({type(e).__name__}: "
                           f"{str(e)[:300]}). Without network access, point teacher.checkpoint at a local weights "
                           f"file, or keep teacher.pretrained: true and set {overlay}") from e


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over every entry of the state dict: name, dtype, shape and raw bytes. Works for any dtype
    (bfloat16, bool, int64) and for 0-dim tensors such as BatchNorm's `num_batches_tracked`."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _identity(cfg: TeacherCfg, sha: str, pcfg: dict) -> dict:
    identity = {"model": cfg.model, "model_args": cfg.model_args, "sha256": sha, "img_size": cfg.img_size,
                "mean": list(pcfg["mean"]), "std": list(pcfg["std"]), "crop_pct": pcfg.get("crop_pct", 0.875)}
    if cfg.use_ema:  # the same file holds both weights: the choice is part of the identity
        identity["use_ema"] = True
    return identity


def _checkpoint_path(cfg: TeacherCfg) -> Path:
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise TeacherError(f"teacher.checkpoint={path} does not exist: run `make teacher` to train the demo "
                           f"teacher, or point teacher.checkpoint at a local weights file")
    return path


def _classifier_names(model: torch.nn.Module) -> list[str]:
    """The classifier module(s) named by the model's pretrained config ('head.fc' for RegNetY, 'head' and
    'head_dist' for distilled ViTs)."""
    names = model.pretrained_cfg.get("classifier") or []
    return [names] if isinstance(names, str) else list(names)


def _head_mismatch(what: str, head: int, num_classes: int, data: str) -> TeacherError:
    return TeacherError(
        f"{what} has a {head}-class head, but the data has {num_classes} classes ({data}): the teacher's "
        f"class ids would not be the data's. Use a teacher whose head was trained on these {num_classes} classes "
        f"(teacher.checkpoint), or shards labelled with the teacher's {head} classes (for ImageNet-1k weights, "
        f"the standard 1000-class map)")


def read_checkpoint(cfg: TeacherCfg) -> dict[str, torch.Tensor]:
    """The state dict in `teacher.checkpoint`, in every layout timm's `load_state_dict` reads: a plain state
    dict, `{'state_dict': ...}` (timm's train.py), `{'model': ...}` (DeiT), `module.`/`_orig_mod.` prefixes,
    `.safetensors`; `teacher.use_ema` picks `state_dict_ema`/`model_ema` where present. Never unpickles
    anything but tensors and plain containers."""
    path = _checkpoint_path(cfg)
    try:
        state = timm.models.load_state_dict(str(path), use_ema=cfg.use_ema, weights_only=True)
    except Exception as e:  # torch.load / safetensors raise many types for foreign or damaged files
        raise TeacherError(f"teacher.checkpoint={path} cannot be read as weights ({type(e).__name__}: {e}): "
                           f"pass a PyTorch state dict (plain, {{'state_dict': ...}}, {{'model': ...}}) or a "
                           f".safetensors file") from e
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"teacher.checkpoint={path} holds no state dict (plain, {{'state_dict': ...}}, "
                           f"{{'model': ...}}, or .safetensors)")
    return state


def load_teacher(cfg: TeacherCfg, num_classes: int, device: torch.device | str = "cpu",
                 data: str = "data.train") -> Teacher:
    """The frozen teacher in eval mode with its own normalisation (from its pretrained config).

    Refuses, before anything is written, a teacher whose head has another class count than the data's
    (`data` names the data in the message)."""
    if cfg.checkpoint:
        path = _checkpoint_path(cfg)
        state = read_checkpoint(cfg)
        model = create_model(cfg, num_classes)
        for name in _classifier_names(model):
            weight = state.get(f"{name}.weight")
            if weight is not None and weight.ndim >= 1 and weight.shape[0] != num_classes:
                raise _head_mismatch(f"teacher.checkpoint={path} ({name}.weight {tuple(weight.shape)})",
                                     weight.shape[0], num_classes, data)
        fit = f"teacher.checkpoint={path} does not fit teacher.model={cfg.model!r} (num_classes={num_classes}, " \
              f"model_args={cfg.model_args})"
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes differ: another width or depth
            raise TeacherError(f"{fit}: {str(e).splitlines()[1].strip()[:300]}...: name the model (and "
                               f"teacher.model_args) the checkpoint was trained as") from e
        if missing or unexpected:
            raise TeacherError(f"{fit}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        sha = file_sha256(path)
    elif cfg.pretrained:
        model = create_model(cfg, None, pretrained=True)  # the weights' own head: never a silent new one
        if model.num_classes != num_classes:
            raise _head_mismatch(f"the pretrained teacher.model={cfg.model!r}", model.num_classes, num_classes, data)
        sha = state_sha256(model)
    else:
        raise TeacherError("the teacher has no weights: set teacher.checkpoint to a local file, or "
                           "teacher.pretrained: true for timm's weights (e.g. regnety_160.deit_in1k)")
    model.eval().requires_grad_(False).to(device)
    pcfg = model.pretrained_cfg
    identity = _identity(cfg, sha, pcfg)
    return Teacher(model, tuple(pcfg["mean"]), tuple(pcfg["std"]), identity["crop_pct"], identity)


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


def normalize(views_uint8: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float, normalised with the model's own mean and std: (x / 255 - mean) / std.

    With `channels_last` the result keeps the views' own memory order (torch's channels_last, what the GPU paths
    feed their models, with no copy); otherwise it is contiguous, which on a CPU this normalisation writes in half
    the time. The values are the same either way."""
    x = views_uint8.permute(0, 3, 1, 2)
    x = (x if channels_last else x.contiguous()).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ManifestError("cache.device=cuda but no CUDA device is visible: set it to auto or cpu")
    return torch.device(name)


@torch.inference_mode()
def forward(teacher: Teacher, views_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The teacher's float32 logits [b, C] for uint8 views [b, H, W, 3], left on `device`."""
    x = normalize(views_u8.to(device, non_blocking=True), teacher.mean, teacher.std, channels_last=device.type == "cuda")
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op on the views' own order
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return teacher.model(x).float()
    return teacher.model(x).float()


def decode_split(shardlist_path: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every sample of a (small) split as uint8 [N, size, size, 3] images, labels and class names."""
    from pipeline.reader import read_shard
    from pipeline.shards import load_shardlist

    shardlist = load_shardlist(shardlist_path)
    images, labels = [], []
    for shard in range(len(shardlist.shards)):
        for sample in read_shard(shardlist, shard):
            images.append(np.asarray(Image.fromarray(sample.image).resize((size, size))))
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
