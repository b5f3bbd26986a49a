"""`distill teacher`: train the small demo teacher (the embedded default ships no weights)."""

from pathlib import Path

import click

from pipeline.cli import manifest_options


def train_demo_teacher(m, force: bool = False) -> str:
    """Train teacher.model on the train shards into teacher.checkpoint unless it exists (or the teacher is timm's
    pretrained one); returns a report line."""
    if m.teacher.pretrained:
        return f"teacher: timm's pretrained weights of {m.teacher.model}, nothing to train"
    if not m.teacher.checkpoint:
        raise click.UsageError("teacher.checkpoint is not set: name the file `make teacher` should write "
                               "(or set teacher.pretrained=true for timm's weights)")
    if Path(m.teacher.checkpoint).exists() and not force:
        return f"teacher: {m.teacher.checkpoint} exists (pass ARGS=--force to retrain)"
    from pipeline.teacher import decode_split, train_teacher

    size = m.teacher.img_size
    x, y, classes = decode_split(m.data.train, size)
    vx, vy, _ = decode_split(m.data.val, size)
    result = train_teacher(m.teacher, x, y, vx, vy, len(classes), m.teacher.checkpoint)
    return (f"teacher: {result['checkpoint']} val top-1 {result['val_acc']:.4f} "
            f"({len(x)} train images, {result['seconds']} s)")


@click.command("teacher")
@manifest_options
@click.option("--force", is_flag=True, help="Retrain even if teacher.checkpoint exists.")
def teacher(m, force):
    """Train teacher.model on the train shards and write teacher.checkpoint."""
    click.echo(train_demo_teacher(m, force))
