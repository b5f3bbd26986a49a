"""What the digits sections measure and on what: their sizes (FULL for `make bench`, QUICK for the smoke
run and the tests), the machine, and the inputs they build (digits shards, a randomly initialised teacher,
the bench's manifest)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.manifest import Manifest
from pipeline.shards import build_shardlist, load_shardlist, write_digits
from pipeline.teacher import create_model

SHARD_SIZE = 100  # samples per digits shard the bench writes
VERSIONED = ("torch", "torchvision", "timm", "webdataset", "zarr", "numcodecs", "numpy", "pillow")


@dataclass(frozen=True, slots=True)
class Settings:
    """How big each measurement is: FULL fits `make bench` in a few minutes on two cores, QUICK is the
    smoke run. FULL's pair is DeiT's (a RegNetY teacher, a distilled ViT student) scaled down to the 32 px
    digits: the demo's student, and a teacher whose forward costs about 4 student train steps, as
    RegNetY-16GF's does against DeiT-Ti's. The student step outweighs replaying a view, so with one loader
    worker on the second core the loop is bound by the step, not by the data."""

    reps: int  # interleaved repetitions of every comparison
    top_ks: tuple[int, ...]  # storage and cache read
    classes: int
    positions: int  # per synthetic shard
    shards: int
    shards_per_unit: int
    slab_reads: int  # read_slab calls per timed repetition
    replay_views: int  # digits views per repetition
    photos: int  # ImageNet-like photos per repetition
    photo_size: int  # their render size (DeiT's 224)
    train_shards: int  # digits shards of SHARD_SIZE samples for the cache stage and the student
    img_size: int
    teacher_model: str
    teacher_args: dict
    student_args: dict
    patch_size: int
    cache_batch: int
    student_batch: int
    student_workers: int  # loader workers of the student runs (1: the views render on the second core)
    model_batches: int  # batches per repetition of the pre-made-batch timings


FULL = Settings(reps=5, top_ks=(1, 5, 10, 100), classes=1000, positions=1000, shards=8, shards_per_unit=8,
                slab_reads=8, replay_views=100, photos=32, photo_size=224, train_shards=6, img_size=32,
                teacher_model="regnety_080", teacher_args={},
                student_args={"embed_dim": 64, "depth": 4, "num_heads": 2}, patch_size=4,
                cache_batch=64, student_batch=32, student_workers=1, model_batches=4)
QUICK = Settings(reps=2, top_ks=(1, 5, 10, 100), classes=1000, positions=64, shards=2, shards_per_unit=2,
                 slab_reads=4, replay_views=16, photos=2, photo_size=64, train_shards=1, img_size=16,
                 teacher_model="regnety_002",
                 teacher_args={"w0": 8, "wa": 13, "wm": 2.0, "group_size": 8, "depth": 4, "stem_width": 8},
                 student_args={"embed_dim": 16, "depth": 1, "num_heads": 2}, patch_size=4,
                 cache_batch=32, student_batch=16, student_workers=0, model_batches=2)




def settings(quick: bool) -> Settings:
    return QUICK if quick else FULL


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
        "ram_gib": None if ram is None else round(ram / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {name: importlib.metadata.version(name) for name in VERSIONED},
    }


def write_digit_shards(root: Path, train_shards: int) -> tuple[str, str]:
    """The digits as shards of SHARD_SIZE samples; shard lists over the first `train_shards` train shards and
    the first val shard."""
    lists = []
    for full, count in zip(write_digits(root, shard_size=SHARD_SIZE), (train_shards, 1)):
        whole = load_shardlist(full)
        subset = root / f"bench-{full.parent.name}.json"
        build_shardlist([s.url for s in whole.shards[:count]], subset, classes=whole.classes)
        lists.append(str(subset))
    return lists[0], lists[1]


def bench_manifest(base: Manifest, work: Path, s: Settings, device: str) -> Manifest:
    """The base manifest's view recipe with the bench's data, teacher/student pair and paths."""
    train, val = write_digit_shards(work / "digits", s.train_shards)
    teacher = replace(base.teacher, model=s.teacher_model, model_args=dict(s.teacher_args), pretrained=False,
                      checkpoint=str(work / "teacher.pt"), img_size=s.img_size)
    torch.manual_seed(0)
    num_classes = len(load_shardlist(train).classes)
    torch.save(create_model(teacher, num_classes).state_dict(), teacher.checkpoint)
    return replace(
        base,
        data=replace(base.data, train=train, val=val, builtin="none", on_error="raise"),
        teacher=teacher,
        cache=replace(base.cache, path=str(work / "cache"), epochs=1, top_k=min(10, num_classes),
                      batch_size=s.cache_batch, workers=0, shards_per_unit=1, device=device),
        student=replace(base.student, model="deit_tiny_distilled_patch16_224", model_args=dict(s.student_args),
                        img_size=s.img_size, patch_size=s.patch_size, epochs=1, batch_size=s.student_batch,
                        workers=s.student_workers, ema=None, verify_sample=0.0, ckpt_every=0, eval_every=1,
                        device=device, compile=False, run_dir=str(work / "runs" / "student")),
    ).check()


