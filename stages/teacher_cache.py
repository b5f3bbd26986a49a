"""`distill teacher-cache`: run the teacher once over the shards into the Zarr cache (resumable)."""

import click

from pipeline.cli import manifest_options


@click.command("teacher-cache")
@manifest_options
@click.option("--rank", type=int, default=None, help="This job's rank for independent array jobs (no torchrun).")
@click.option("--world-size", type=int, default=None, help="Number of independent array jobs.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def teacher_cache(m, rank, world_size, progress):
    """Fill (or resume, or extend by more epochs) the teacher cache named by cache.path."""
    from pipeline import cache
    from pipeline.distributed import world
    from pipeline.teacher_cache import run

    with world(rank, world_size) as w:
        summary = run(m, w.rank, w.size, w.barrier, progress=progress)
        if w.barrier:
            w.barrier()
    if w.barrier is not None and w.rank != 0:
        return  # under torchrun only rank 0 reports (independent array jobs each report their own units)
    size = cache.disk_usage(m.cache.path)
    views = cache.cached_views(m.cache.path)
    click.echo(f"cache: {m.cache.path}\n"
               f"  rank {w.rank}/{w.size}: wrote {summary['units_written']} units ({summary['views']} views, "
               f"{summary['views_per_s']:.0f} views/s), {summary['units_skipped']} already done")
    if size is not None:
        click.echo(f"  size on disk: {size / 1e6:.2f} MB for {views} complete views "
                   f"({size / max(views, 1):.1f} bytes/view, all fields and splits)")
