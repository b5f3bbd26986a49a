"""A tiny filled cache for the stage-2, stats, sweep and inspect tests: manifests/tiny.yaml pointed at three
unequal digits shards (one with an undecodable sample), a briefly trained tiny teacher, two cached epochs.
Built once per session by the `tiny_cache` fixture in conftest.py."""

import dataclasses
import io

import torch
from PIL import Image
from webdataset import TarWriter

from pipeline import cache
from pipeline.manifest_loader import load
from pipeline.shards import build_shardlist, digits_arrays
from pipeline.teacher import train_teacher
from pipeline.teacher_cache import run as fill_cache

TRAIN_SHARDS = (40, 25, 33)  # unequal on purpose
VAL_SHARDS = (20,)
BAD = (1, 3)  # (shard, position) of an undecodable sample: skipped by the teacher stage, dropped here


def write_shards(directory, sizes, first_index, bad=None):
    """PNG digits in WebDataset tars of the given sizes (`bad`: the (shard, position) to corrupt), and their
    shard list."""
    images, labels = digits_arrays()
    directory.mkdir(parents=True, exist_ok=True)
    paths, i = [], first_index
    for shard, size in enumerate(sizes):
        path = directory / f"part-{shard:06d}.tar"
        with TarWriter(str(path), encoder=False) as writer:
            for pos in range(size):
                png = io.BytesIO()
                Image.fromarray(images[i]).save(png, format="PNG")
                data = b"not an image" if (shard, pos) == bad else png.getvalue()
                writer.write({"__key__": f"digit{i:04d}", "cls": str(labels[i]).encode(), "png": data})
                i += 1
        paths.append(path)
    out = directory / "shardlist.json"
    build_shardlist(paths, out, classes=[str(c) for c in range(10)])
    return out


def _teacher_checkpoint(path, m):
    """A briefly trained tiny teacher, its logits scaled up tenfold: weak, but confident, and its answers
    differ from view to view."""
    images, labels = digits_arrays()
    cfg = dataclasses.replace(m.teacher, train=dataclasses.replace(m.teacher.train, epochs=5, batch_size=16, lr=0.01))
    n = sum(TRAIN_SHARDS)
    train_teacher(cfg, images[:n], labels[:n], images[n:n + 20], labels[n:n + 20], 10, path)
    state = torch.load(path, weights_only=True)
    for name in ("head.fc.weight", "head.fc.bias"):
        state["model"][name] *= 10
    torch.save(state, path)
    return path


class TinyCache:
    """manifests/tiny.yaml pointed at tiny shards, an untrained teacher and a filled cache."""

    def __init__(self, root):
        self.root = root
        self.train = write_shards(root / "train", TRAIN_SHARDS, 0, bad=BAD)
        self.val = write_shards(root / "val", VAL_SHARDS, sum(TRAIN_SHARDS))
        self.checkpoint = _teacher_checkpoint(root / "teacher.pt", load("manifests/tiny.yaml"))
        self.cache_path = root / "cache"
        fill_cache(self.manifest(), progress=False)

    def manifest_overrides(self, run_dir=None):
        return [f"data.train={self.train}", f"data.val={self.val}", "data.on_error=skip",
                f"teacher.checkpoint={self.checkpoint}", f"cache.path={self.cache_path}",
                f"student.run_dir={run_dir or self.root / 'run'}"]

    def manifest(self, *overrides, run_dir=None):
        return load("manifests/tiny.yaml", self.manifest_overrides(run_dir) + list(overrides))

    def open(self):
        return cache.open_cache(str(self.cache_path))
