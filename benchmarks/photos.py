"""ImageNet-like JPEG photos for the benchmarks, made from the photos that installed packages ship.

ImageNet's training JPEGs average about 400 x 350 px and 110 KB. The sources are scikit-learn's sample
images (`china.jpg`, `flower.jpg`, 640 x 427) and matplotlib's `grace_hopper.jpg` (512 x 600), where
installed; each benchmark photo is a random crop of a random source (a tenth to the whole of it), scaled to
an ImageNet-like size (long side 375-500 px, aspect 0.75-1.33), flipped, colour-shifted, given a little
sensor noise and re-encoded at quality 90-96, so every file decodes to different pixels and weighs about
what an ImageNet photo does. Where no sample photo is installed (a bare GPU box), smooth random colour
fields stand in, and `source_names` says so.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from webdataset import TarWriter

from pipeline.shards import build_shardlist


def _sample_sources() -> dict[str, Image.Image]:
    sources = {}
    try:
        from sklearn.datasets import load_sample_images

        for name, pixels in zip(("china.jpg", "flower.jpg"), load_sample_images().images):
            sources[name] = Image.fromarray(pixels)
    except Exception:  # scikit-learn absent or without its sample images
        pass
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            sources["grace_hopper.jpg"] = Image.open(f).convert("RGB")
    except Exception:
        pass
    return sources


def source_names() -> list[str]:
    """The installed sample photos the benchmark photos are cut from; empty: synthetic colour fields."""
    return sorted(_sample_sources())


def _colour_field(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    coarse = rng.normal(0.0, 1.0, (height // 16 + 2, width // 16 + 2, 3))
    field = Image.fromarray(np.clip(128 + 50 * coarse, 0, 255).astype(np.uint8)).resize((width, height),
                                                                                      Image.Resampling.BICUBIC)
    return field


def make_photo(rng: np.random.Generator, sources: list[Image.Image]) -> bytes:
    """One JPEG: a random crop of a random source at an ImageNet-like size, re-encoded."""
    long_side = int(rng.integers(375, 501))
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
    width, height = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    if sources:
        src = sources[int(rng.integers(len(sources)))]
        sw, sh = src.size
        scale = float(np.sqrt(rng.uniform(0.3, 1.0)))
        cw = min(sw, max(32, round(sw * scale)))
        ch = min(sh, max(32, round(cw / aspect)))
        cw = min(sw, max(32, round(ch * aspect)))
        left, top = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        img = src.crop((left, top, left + cw, top + ch)).resize((width, height), Image.Resampling.BICUBIC)
    else:
        img = _colour_field(rng, width, height)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.6, 1.4)))
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
    img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(80, 200)), threshold=2))
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 7.0, (height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=int(rng.integers(94, 98)))
    return out.getvalue()


def _write_shard(path: Path, first: int, stop: int, classes: int, seed: int, prefix: str) -> Path:
    rng = np.random.default_rng([seed, first])
    sources = [img for _, img in sorted(_sample_sources().items())]
    with TarWriter(str(path), encoder=False) as writer:
        for i in range(first, stop):
            writer.write({"__key__": f"{prefix}{i:06d}", "cls": str(i % classes).encode(),
                          "jpg": make_photo(rng, sources)})
    return path


def write_photo_shards(root: str | Path, count: int, shard_size: int, classes: int = 1000, seed: int = 0,
                       prefix: str = "photos", processes: int = 1) -> Path:
    """`count` photos in WebDataset tars of `shard_size` (`<key>.jpg` + `<key>.cls`, label i mod `classes`)
    under `root`, and their shard list (returned). Each shard's photos come from a generator seeded by
    (seed, first index), so `processes` (shards made in parallel) does not change them. A shard list already
    there for the same arguments is reused."""
    root = Path(root)
    out = root / "shardlist.json"
    stamp = root / "made-with.json"
    made_with = json.dumps({"count": count, "shard_size": shard_size, "classes": classes, "seed": seed,
                            "prefix": prefix, "sources": source_names()})
    if out.is_file() and stamp.is_file() and stamp.read_text() == made_with:
        return out
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"{prefix}-{n:06d}.tar", first, min(count, first + shard_size), classes, seed, prefix)
            for n, first in enumerate(range(0, count, shard_size))]
    if processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(processes, len(jobs))) as pool:
            paths = list(pool.map(_write_shard, *zip(*jobs)))
    else:
        paths = [_write_shard(*job) for job in jobs]
    build_shardlist(paths, out, classes=[str(c) for c in range(classes)])
    stamp.write_text(made_with)
    return out


def mean_file_bytes(shardlist_path: str | Path) -> float:
    """Mean JPEG size in a shard list written by `write_photo_shards` (for the report)."""
    from pipeline.reader import read_shard
    from pipeline.shards import load_shardlist

    shardlist = load_shardlist(shardlist_path)
    sizes = [len(s.image) for i in range(len(shardlist.shards)) for s in read_shard(shardlist, i, decode=False)]
    return float(np.mean(sizes))
