"""`distill plan`: views, bytes on disk, teacher-hours and student epochs of a manifest, before any work."""

import click

from pipeline.cli import manifest_options


@click.command("plan")
@manifest_options
@click.option("--time-teacher/--no-time-teacher", default=True, show_default=True,
              help="Time a short teacher forward on the manifest's device to estimate teacher-hours.")
def plan(m, time_teacher):
    """Print what `make teacher-cache` and `make train-student` will cost for this manifest: views to cache,
    bytes on disk at the v3 layout (per array, from measured per-field costs), teacher forwards and
    teacher-hours (from a short measured forward), student epochs per cached epoch. Computes nothing else."""
    from pipeline.plan import format_plan, make_plan

    click.echo(format_plan(m, make_plan(m, time_teacher)))
