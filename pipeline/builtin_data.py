"""The built-in data sets (`data.builtin`: the digits, Fashion-MNIST), written where the manifest's data paths
expect them: what `make shards` builds without SRC, and the first step of `distill demo`."""

from __future__ import annotations

from pathlib import Path

from pipeline.fashion_mnist import write_fashion_mnist
from pipeline.manifest import DataCfg, ManifestError
from pipeline.shards import SHARDLIST_NAME, write_digits


def digits_root(data: DataCfg, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """The directory `write_digits` (or `write_fashion_mnist`, splits train, val, test) fills so that it
    produces exactly data.train and data.val (and data.test)."""
    root = Path(data.train).parent.parent
    for split in splits:
        wanted = root / split / SHARDLIST_NAME
        if getattr(data, split) is None or Path(getattr(data, split)) != wanted:
            raise ManifestError(f"data.{split}={getattr(data, split)!r}: the built-in data are written as "
                                f"<dir>/{split}/{SHARDLIST_NAME}; set data.{split}={str(wanted)!r}")
    return root


def write_builtin(data: DataCfg, shard_size: int | None = None, seed: int = 0) -> list[Path]:
    """Build data.builtin's shards where the manifest's data paths expect them; returns the shard lists."""
    if data.builtin == "fashion_mnist":
        root = digits_root(data, ("train", "val", "test"))
        return list(write_fashion_mnist(root, shard_size or data.shard_size, data.train_size, data.val_size,
                                        seed).values())
    return list(write_digits(digits_root(data), shard_size or data.shard_size, seed))
