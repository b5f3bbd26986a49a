"""The real run at CI size (`make real-smoke`): DeiT's ImageNet recipe end to end, at 224 px and 1000 classes.

What a user with ImageNet does, on a handful of generated photos: an ImageFolder tree of JPEGs of varied sizes
and aspect ratios (a few per class over 50 of the 1000 classes, a val tree too) is sharded by `distill shards
--src`; a `regnety_160` with random weights, saved in timm's train.py checkpoint layout, is the teacher, loaded
through `teacher.checkpoint` like a user's own; then `teacher-cache`, `train-student` (a full-size DeiT-Ti, a
few steps), `verify-cache` and `stats` run as the command line runs them. Only the image count, the cache's
size and the step count are small (manifests/real_smoke.yaml); the models, the 224 px views and the recipe are
the real ones. The result is `<out>/summary.json`.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import cache
from pipeline.manifest_loader import load

NUM_CLASSES = 1000  # ImageNet-1k's class map
USED_CLASSES = range(0, NUM_CLASSES, 20)  # 50 classes spread over the map: ids up to 980, so K < C and ids > 255
TRAIN_PER_CLASS, VAL_PER_CLASS = 2, 1
SIDE = (100, 500)  # the shorter and longer side of the generated photos lie in this range


OUTPUTS = ("photos", "shards", "regnety_160-random.pth.tar", "cache", "student", "verify.json", "stats",
           "summary.json")  # what a run writes under its out directory


class SmokeError(RuntimeError):
    """A stage of the smoke run failed; the message names it."""


def class_names() -> list[str]:
    """ImageNet-style synset ids, one per class id."""
    return [f"n{i:08d}" for i in range(NUM_CLASSES)]


def _photo(rng: np.random.Generator) -> bytes:
    """A JPEG of random size and aspect ratio: smooth colour fields, a few shapes and sensor-like noise, so
    crops, RandAugment and the teacher see structure at every scale."""
    w, h = (int(v) for v in rng.integers(SIDE[0], SIDE[1] + 1, size=2))
    coarse = rng.integers(0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, min(w, h) / 2)
        field[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, size=3)
    field += rng.normal(0, 6, size=field.shape)
    buffer = io.BytesIO()
    Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=int(rng.integers(75, 96)))
    return buffer.getvalue()


def write_photos(root: Path, seed: int = 0) -> Path:
    """root/{train,val}/<synset>/<synset>_<n>.JPEG for the used classes (ImageNet's layout and file names) and
    root/class_map.json naming all 1000 classes. Returns the class map's path."""
    rng = np.random.default_rng(seed)
    names = class_names()
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in USED_CLASSES:
            folder = root / split / names[c]
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                (folder / f"{names[c]}_{n}.JPEG").write_bytes(_photo(rng))
    class_map = root / "class_map.json"
    class_map.write_text(json.dumps({"classes": names}) + "\n")
    return class_map


def write_random_teacher(m, path: Path, seed: int = 0) -> None:
    """`teacher.model` with random weights and a 1000-class head, saved as timm's train.py saves checkpoints."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(m.teacher.model, num_classes=NUM_CLASSES, **m.teacher.model_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"epoch": 0, "arch": m.teacher.model.split(".")[0], "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)


def clear_previous(out: Path) -> None:
    """Remove what an earlier smoke run wrote under `out` (its names only, nothing else there): the smoke run
    checks the whole pipeline each time, and an earlier cache (of another recipe version, say) would be refused
    or reused instead of rebuilt."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _cli(*args: str) -> None:
    """One `distill` command, in this process, exactly as the command line parses it."""
    from pipeline.cli import main

    main.main(list(args), prog_name="distill", standalone_mode=False)


def run(out: str | Path = "runs/real-smoke", manifest: str = "manifests/real_smoke.yaml",
        progress: bool = False) -> dict:
    """Every stage in turn, from scratch; writes and returns the summary. Raises SmokeError naming a stage
    that failed."""
    out = Path(out)
    clear_previous(out)
    paths = {"data.train": out / "shards" / "train" / "shardlist.json",
             "data.val": out / "shards" / "val" / "shardlist.json",
             "teacher.checkpoint": out / "regnety_160-random.pth.tar",
             "cache.path": out / "cache", "student.run_dir": out / "student"}
    sets = [a for key, value in paths.items() for a in ("--set", f"{key}={value}")]
    common = ["--manifest", manifest, *sets]
    m = load(manifest, [f"{key}={value}" for key, value in paths.items()])
    bar = ["--progress" if progress else "--no-progress"]
    seconds = {}

    def stage(name, fn):
        started = time.perf_counter()
        fn()
        seconds[name] = round(time.perf_counter() - started, 1)

    def photos():
        class_map = write_photos(out / "photos")
        for split in ("train", "val"):
            _cli("shards", "--src", str(out / "photos" / split), "--out", str(paths[f"data.{split}"].parent),
                 "--shard-size", str(m.data.shard_size), "--class-map", str(class_map))

    stage("shards", photos)
    stage("teacher_checkpoint", lambda: write_random_teacher(m, paths["teacher.checkpoint"]))
    stage("teacher_cache", lambda: _cli("teacher-cache", *common, *bar))
    stage("train_student", lambda: _cli("train-student", *common, *bar))
    report = out / "verify.json"
    verify_exit = []

    def verify():
        try:
            _cli("verify-cache", *common, "--sample", "0.05", "--json", str(report))
        except SystemExit as e:  # exit 1: past the thresholds (the report says why)
            verify_exit.append(e.code)

    stage("verify_cache", verify)
    stage("stats", lambda: _cli("stats", "--cache", str(paths["cache.path"]), "--run", str(paths["student.run_dir"]),
                                "--out", str(out / "stats")))

    root = cache.open_cache(str(paths["cache.path"]))
    views = cache.cached_views(str(paths["cache.path"]))
    result = json.loads((paths["student.run_dir"] / "result.json").read_text())
    verified = json.loads(report.read_text())
    summary = {
        "num_classes": len(root.attrs["classes"]),
        "classes_with_images": len(USED_CLASSES),
        "teacher": root.attrs["teacher"]["model"],
        "teacher_size": root.attrs["teacher_size"],
        "student": m.student.model,
        "student_size": m.student.img_size,
        "top_k": cache.layout_of(root, "train").top_k,
        "recipe": {"crop_scale": list(m.views.crop.scale), "flip": m.views.flip.prob,
                   "randaugment": m.views.randaugment.spec, "erasing": m.views.erasing.prob,
                   "mixup_alpha": m.views.mix.mixup_alpha, "cutmix_alpha": m.views.mix.cutmix_alpha,
                   "mix_prob": m.views.mix.prob},
        "views_cached": views,
        "bytes_per_view": round(cache.disk_usage(str(paths["cache.path"])) / views, 1),
        "steps": result["steps"],
        "verify_passed": bool(verified.get("passed")) and not verify_exit,
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["verify_passed"]:
        raise SmokeError(f"verify-cache failed on the smoke cache {paths['cache.path']}: see {report}")
    return summary
