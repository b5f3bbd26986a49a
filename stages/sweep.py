"""`distill sweep`: train a grid or list of students against one read-only teacher cache."""

import click


@click.command("sweep")
@click.option("--manifest", "manifest_path", default="manifests/demo.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="The base run spec of every run.")
@click.option("--sweep", "sweep_path", default="manifests/sweeps/demo.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Sweep file: name, base, grid and/or runs (see manifests/sweeps/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a manifest field of every run (repeatable).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Data passes trained at the same time (each pass trains its students together).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Sweep directory [default: runs/sweeps/<sweep name>].")
def sweep(manifest_path, sweep_path, overrides, jobs, out):
    """Train every run of the sweep that has no result.json yet (interrupted runs resume), each in
    <sweep dir>/<run name>; runs with identical batches train together on one data pass. Then write and
    print summary.md / summary.csv ranking them by val top-1."""
    from pipeline.cache import CacheError
    from pipeline.sweep import SweepError, sweep as run_sweep

    try:
        run_sweep(manifest_path, sweep_path, jobs, out, overrides, echo=click.echo)
    except (SweepError, CacheError) as e:
        raise click.ClickException(str(e)) from None
