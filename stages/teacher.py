"""`distill teacher`: train the small demo teacher (the embedded default ships no weights)."""

import click
import numpy as np

from pipeline.cli import manifest_options
from pipeline.reader import read_shard
from pipeline.shards import load_shardlist
from pipeline.teacher import train_teacher


def _decode_all(path: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    shardlist = load_shardlist(path)
    images, labels = [], []
    for shard in range(len(shardlist.shards)):
        for sample in read_shard(shardlist, shard):
            images.append(np.asarray(sample.image.convert("RGB").resize((size, size))))
            labels.append(sample.label)
    return np.stack(images), np.array(labels), list(shardlist.classes)


@click.command("teacher")
@manifest_options
@click.option("--force", is_flag=True, help="Retrain even if teacher.checkpoint exists.")
def teacher(m, force):
    """Train teacher.model on the train shards and write teacher.checkpoint."""
    if not m.teacher.checkpoint:
        raise click.UsageError("teacher.checkpoint is not set: name the file `make teacher` should write")
    from pathlib import Path

    if Path(m.teacher.checkpoint).exists() and not force:
        click.echo(f"teacher: {m.teacher.checkpoint} exists (pass ARGS=--force to retrain)")
        return
    size = m.teacher.img_size
    x, y, classes = _decode_all(m.data.train, size)
    vx, vy, _ = _decode_all(m.data.val, size)
    result = train_teacher(m.teacher, x, y, vx, vy, len(classes), m.teacher.checkpoint)
    click.echo(f"teacher: {result['checkpoint']} val top-1 {result['val_acc']:.4f} "
               f"({len(x)} train images, {result['seconds']} s)")
