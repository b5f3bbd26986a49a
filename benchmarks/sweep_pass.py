"""Sweeps on one data pass: the wall time of N = 4 students trained together on one pass
(`pipeline.train.train_shared`) against the same 4 trained one after another (`pipeline.train.train`), paired
within one run, in two settings:

- 224 px views with DeiT's recipe (RandAugment m9, erasing, mixup/cutmix, flips) of JPEG photos cut from
  scikit-learn's sample images (about 500 x 375, 60-120 KB), cached by a small random-weight RegNetY at 224 px;
  the four students are the demo's DeiT (embed 64, depth 4) at 224 px, patch 16;
- the demo's 32 px digits, the demo's recipe and student (`manifests/demo.yaml`), a random-weight teacher.

The four students differ in distillation mode, alpha and learning rate (what a sweep varies) and share the data
seed. Both sides evaluate every student once at the end. `measure(quick)` returns ({"shared_over_separate_224",
"shared_over_separate_demo", ...seconds}, Markdown); the goal at 224 px is shared / separate <= 0.4. The
ratios are of the process's CPU time (one torch thread, no loader workers), which the load of neighbours on a
shared machine does not move; wall times are reported beside them.
"""

from __future__ import annotations

import io
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from webdataset import TarWriter

from pipeline import cache
from pipeline.manifest_loader import load
from pipeline.shards import build_shardlist, write_digits
from pipeline.student_data import open_train_set
from pipeline.teacher_cache import run as fill_cache
from pipeline.train import train, train_shared

STUDENTS = (("student.distillation=hard",),
            ("student.distillation=soft", "student.alpha=0.7"),
            ("student.distillation=none",),
            ("student.distillation=hard", "student.optim.lr=0.002"))
GOAL_224 = 0.4


def _photos(directory: Path, shards: int, per_shard: int, seed: int) -> Path:
    """JPEG photos of ImageNet-like sizes cut from scikit-learn's sample images, in WebDataset shards."""
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = directory / f"photos-{shard:06d}.tar"
        with TarWriter(str(path), encoder=False) as writer:
            for i in range(per_shard):
                src = sources[int(rng.integers(len(sources)))]
                w, h = int(rng.integers(200, src.width)), int(rng.integers(150, src.height))
                x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
                scale = float(rng.uniform(0.8, 1.6))
                img = src.crop((x, y, x + w, y + h)).resize((int(w * scale), int(h * scale)), Image.BICUBIC)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                jpeg = io.BytesIO()
                img.save(jpeg, format="JPEG", quality=int(rng.integers(85, 96)))
                writer.write({"__key__": f"photo{shard:03d}{i:05d}", "cls": str(int(rng.integers(10))).encode(),
                              "jpg": jpeg.getvalue()})
        paths.append(path)
    out = directory / "shardlist.json"
    build_shardlist(paths, out, classes=[str(c) for c in range(10)])
    return out


def _random_teacher(path: Path, model: str, model_args: dict) -> Path:
    torch.manual_seed(0)
    torch.save({"model": timm.create_model(model, num_classes=10, **model_args).state_dict()}, path)
    return path


def _setting_224(root: Path, quick: bool) -> list[str]:
    per_shard = 48 if quick else 128
    train_list = _photos(root / "train", 2, per_shard, seed=0)
    val_list = _photos(root / "val", 1, 16, seed=1)
    teacher_args = {"w0": 8, "wa": 13, "wm": 2.0, "group_size": 8, "depth": 4, "stem_width": 8}
    ckpt = _random_teacher(root / "teacher.pt", "regnety_002", teacher_args)
    return [f"data.train={train_list}", f"data.val={val_list}", "data.builtin=none",
            "teacher.model=regnety_002", "teacher.pretrained=false", f"teacher.checkpoint={ckpt}",
            "teacher.model_args={w0: 8, wa: 13, wm: 2.0, group_size: 8, depth: 4, stem_width: 8}",
            "teacher.img_size=224", f"cache.path={root / 'cache'}", "cache.epochs=1", "views.repeats=1", "cache.workers=0",
            "cache.shards_per_unit=1", "cache.batch_size=32", "cache.device=cpu",
            "student.model_args={embed_dim: 64, depth: 4, num_heads: 2}", "student.img_size=224",
            "student.patch_size=16", "student.epochs=1", "student.batch_size=32", "student.workers=0",
            "student.shuffle_buffer=256", "student.compile=false", "student.device=cpu", "student.data_seed=0",
            "student.verify_sample=0", "student.ckpt_every=1000", "student.sched.warmup_epochs=0"]


def _setting_demo(root: Path, quick: bool) -> list[str]:
    write_digits(root / "digits", shard_size=300)
    demo = load("manifests/demo.yaml")
    ckpt = _random_teacher(root / "teacher.pt", demo.teacher.model, demo.teacher.model_args)
    return [f"data.train={root / 'digits' / 'train' / 'shardlist.json'}",
            f"data.val={root / 'digits' / 'val' / 'shardlist.json'}", f"teacher.checkpoint={ckpt}",
            f"cache.path={root / 'cache'}", "cache.epochs=1", "cache.device=cpu", "student.epochs=1",
            "student.workers=0", "student.device=cpu", "student.data_seed=0", "student.verify_sample=0",
            "student.ckpt_every=1000", "student.eval_every=1"] + (["student.labelled_shards=null"] if quick else [])


def _compare(manifest: str, sets: list[str], root: Path, reps: int) -> dict:
    fill_cache(load(manifest, sets), progress=False)

    def students(where: str):
        return [load(manifest, sets + list(extra) + [f"student.run_dir={root / where / str(i)}"])
                for i, extra in enumerate(STUDENTS)]

    warmup = load(manifest, sets + [f"student.run_dir={root / 'warmup'}"])
    train(warmup, progress=False)
    data = open_train_set(warmup, cache.open_cache(warmup.cache.path))
    started = time.process_time()
    for epoch in range(warmup.student.epochs):  # the data path alone: what one pass saves per extra student
        for _ in data.loader(epoch, 0):
            pass
    data_cpu = time.process_time() - started
    wall, cpu, outcomes = {"separate": [], "shared": []}, {"separate": [], "shared": []}, []
    for rep in range(reps):  # alternated, so a neighbour's load falls on both sides alike
        for side in ("separate", "shared"):
            shutil.rmtree(root / side, ignore_errors=True)
            started, started_cpu = time.perf_counter(), time.process_time()
            if side == "separate":
                for m in students(side):
                    train(m, progress=False)
            else:
                outcomes = train_shared(students(side), progress=False)
            wall[side].append(time.perf_counter() - started)
            cpu[side].append(time.process_time() - started_cpu)
    failed = [o for o in outcomes if isinstance(o, Exception)]
    if failed:
        raise failed[0]
    steps = outcomes[0]["steps"]
    separate, shared = statistics.median(wall["separate"]), statistics.median(wall["shared"])
    separate_cpu, shared_cpu = statistics.median(cpu["separate"]), statistics.median(cpu["shared"])
    n = len(STUDENTS)
    return {"separate_s": round(separate, 2), "shared_s": round(shared, 2), "steps": steps,
            "separate_cpu_s": round(separate_cpu, 2), "shared_cpu_s": round(shared_cpu, 2),
            "data_path_cpu_s": round(data_cpu, 2), "ratio": round(shared / separate, 3),
            "cpu_ratio": round(shared_cpu / separate_cpu, 3),
            # what the pass would cost if it saved exactly the data path of every student but one
            "ideal_cpu_ratio": round((separate_cpu - (n - 1) * data_cpu) / separate_cpu, 3),
            "wall_s": {k: [round(v, 2) for v in vs] for k, vs in wall.items()}}


def measure(quick: bool = False) -> tuple[dict, str]:
    """Paired wall times of 4 students on one pass vs one after another; returns (results, Markdown)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            reps = 1 if quick else 2
            r224 = _compare("manifests/imagenet_deit.yaml", _setting_224(tmp / "224", quick), tmp / "224", reps)
            rdemo = _compare("manifests/demo.yaml", _setting_demo(tmp / "demo", quick), tmp / "demo", reps)
    finally:
        torch.set_num_threads(threads)
    results = {"shared_over_separate_224": r224["cpu_ratio"], "shared_over_separate_demo": rdemo["cpu_ratio"],
               "sweep_pass_224": r224, "sweep_pass_demo": rdemo}
    met = "yes" if r224["cpu_ratio"] <= GOAL_224 else "**no**"
    text = "\n".join([
        "## Sweeps on one data pass (`benchmarks/sweep_pass.py`)",
        "",
        f"{len(STUDENTS)} students (hard, soft alpha 0.7, none, hard at lr x4) trained on one data pass "
        f"(`pipeline.train.train_shared`) against the same {len(STUDENTS)} trained one after another, one torch "
        f"thread, loader workers 0 on both sides, each student evaluated once; the sides alternate, medians of "
        f"{1 if quick else 2} repetitions{' (--quick)' if quick else ''}. "
        f"{platform.processor() or platform.machine()}, {platform.system()}, CPU only. The ratio is of CPU time "
        f"(the process's own, so that the load of neighbours on a shared machine does not enter it); wall times "
        f"in bench/results.json.",
        "",
        "| setting | steps per student | data path alone (CPU s) | separate (CPU s) | shared (CPU s) | "
        "shared / separate | ideal | wall: separate / shared (s) | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| 224 px photos, DeiT's recipe, demo DeiT at 224/16 | {r224['steps']} | {r224['data_path_cpu_s']} | "
        f"{r224['separate_cpu_s']} | {r224['shared_cpu_s']} | {r224['cpu_ratio']} | {r224['ideal_cpu_ratio']} | "
        f"{r224['separate_s']} / {r224['shared_s']} | <= {GOAL_224} | {met} |",
        f"| demo: 32 px digits, demo recipe and student | {rdemo['steps']} | {rdemo['data_path_cpu_s']} | "
        f"{rdemo['separate_cpu_s']} | {rdemo['shared_cpu_s']} | {rdemo['cpu_ratio']} | {rdemo['ideal_cpu_ratio']} | "
        f"{rdemo['separate_s']} / {rdemo['shared_s']} | - | - |",
        "",
        "The shared pass saves the data path (shard read, decode, render, cache read; timed alone in the third "
        "column) of every student but one, and the val views of every evaluation but one; what remains is each "
        "student's own forward, backward and optimizer step. `ideal` is (separate - 3 x data path) / separate: "
        "the ratio if the pass saved exactly that. On this CPU a student step at 224 px costs more than rendering "
        "its batch, so the ratio stays far from 1 / N. On a GPU, where a small student's step costs far less than "
        "rendering its batch on the CPU, it should approach 1 / N = 0.25: `make bench-gpu`'s "
        "`student_sweep_demo_student` measures these students there.",
    ])
    return results, text


if __name__ == "__main__":
    import json
    import sys

    results, text = measure("--quick" in sys.argv)
    print(text)
    print(json.dumps(results, indent=1))
