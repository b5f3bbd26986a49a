"""`distill train-student`: train a distilled ViT from the teacher cache (resumes from run_dir's checkpoint)."""

import click

from pipeline.cli import manifest_options


@click.command("train-student")
@manifest_options
@click.option("--progress/--no-progress", default=True, show_default=True)
def train_student(m, progress):
    """Train student.model from cache.path; under torchrun every rank trains on its own shards (DDP). Logs to
    the console and <run_dir>/train.log; a re-run resumes from <run_dir>/last.pth."""
    from pipeline.distributed import world
    from pipeline.run_log import console_logging
    from pipeline.train import train

    console_logging()
    with world() as w:
        result = train(m, w, progress=progress)
    if w.rank == 0:
        click.echo(f"student: {m.student.run_dir} ({result['steps']} steps, {result['seconds']} s)\n"
                   f"  val top-1: class {result['top1_class']:.4f}, dist {result['top1_dist']:.4f}, "
                   f"joint {result['top1_joint']:.4f} (teacher {result['teacher_top1']:.4f})\n"
                   f"  agreement with the teacher: class {result['agree_class']:.4f}, "
                   f"dist {result['agree_dist']:.4f}, joint {result['agree_joint']:.4f}")
