"""`distill stats`: teacher agreement statistics of a cache and of student runs trained from it."""

import json
from pathlib import Path

import click

from pipeline.manifest import ManifestError
from pipeline.manifest_loader import load


def default_out(cache_path: str, kind: str = "stats") -> Path:
    """`<cache>-<kind>/`, next to the cache and not inside it, so the cache's size on disk stays its own."""
    from pipeline.cache import local_dir

    root = local_dir(cache_path)
    if root is None:
        raise click.UsageError(f"the cache {cache_path} is not a local directory: pass --out for the outputs")
    root = root if root.name else root.resolve()
    return root.parent / f"{root.name}-{kind}"


def cache_path_of(cache_path: str | None, manifest_path: str, overrides: tuple[str, ...]) -> str:
    """`--cache` wins; else the manifest's cache.path."""
    if cache_path:
        return cache_path
    try:
        return load(manifest_path, overrides).cache.path
    except ManifestError as e:
        raise click.UsageError(str(e)) from None


@click.command("stats")
@click.option("--cache", "cache_path", default=None,
              help="Teacher cache directory [default: the manifest's cache.path].")
@click.option("--manifest", "manifest_path", default="manifests/demo.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Run spec naming cache.path when --cache is not given.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a manifest field (repeatable).")
@click.option("--run", "runs", multiple=True, type=click.Path(file_okay=False),
              help="A student run_dir, or a sweep directory holding several (repeatable).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory [default: <cache>-stats, next to the cache].")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar on a terminal.")
def stats(cache_path, manifest_path, overrides, runs, out, progress):
    """Teacher top-1 on its cached views, top-K mass and entropy (is K large enough?), per-class accuracy and
    agreement, and DeiT's Table 4 for the runs: printed, and written as stats.json plus PNG plots."""
    from pipeline.cache import CacheError
    from pipeline.stats import StatsError

    cache_path = cache_path_of(cache_path, manifest_path, overrides)
    try:
        click.echo(write_stats(cache_path, list(runs), Path(out) if out else default_out(cache_path), progress))
    except (CacheError, StatsError) as e:
        from pipeline.cli import with_make_args

        raise click.ClickException(with_make_args(str(e), manifest_path, overrides)) from None


def write_stats(cache_path: str, runs: list, out: Path, progress: bool = False) -> str:
    """Compute the statistics, write stats.json and the plots into `out`; returns the printable table."""
    from pipeline import plots
    from pipeline.stats import compute, format_table

    result = compute(cache_path, runs, progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(result, indent=1) + "\n")
    pngs = plots.save_all(result, out)
    return (f"{format_table(result)}\n\n"
            f"wrote {out / 'stats.json'} and {', '.join(p.name for p in pngs.values())} in {out}")
