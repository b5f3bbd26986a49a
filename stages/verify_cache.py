"""`distill verify-cache`: recompute the teacher on a random sample of cached views and compare."""

import json
from pathlib import Path

import click

from pipeline.cli import manifest_options


def default(name: str):
    """The option's default from `verify.Thresholds`, looked up when the command runs (pipeline.verify imports
    torch, which `--help` must not wait for)."""
    def value():
        from pipeline.verify import Thresholds

        return getattr(Thresholds(), name)
    return value


@click.command("verify-cache")
@manifest_options
@click.option("--cache", "cache_path", default=None, help="Cache to verify (default: the manifest's cache.path).")
@click.option("--sample", type=click.FloatRange(0, 1, min_open=True), default=0.01, show_default=True,
              help="Share of each shard's cached views to recompute (at least one view per complete unit).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--max-digest-mismatches", type=click.IntRange(0), default=default("max_digest_mismatches"),
              show_default="0", help="Re-rendered views allowed to differ from the views the teacher saw.")
@click.option("--max-top1-disagreement", type=click.FloatRange(0, 1), default=default("max_top1_disagreement"),
              show_default="0.01", help="Share of views whose recomputed top-1 may beat the cached one by more "
                                      "than --max-prob-error in probability.")
@click.option("--max-prob-error", type=click.FloatRange(0), default=default("max_prob_error"), show_default="0.002",
              help="Per view: largest |p_cached - p_recomputed| over the stored classes. Loosen it for a cache "
                   "filled under CUDA bfloat16 autocast and checked on CPU.")
@click.option("--max-leftover-error", type=click.FloatRange(0), default=default("max_leftover_error"),
              show_default="0.002", help="Per view: |leftover mass cached - recomputed| (mass outside the top-K).")
@click.option("--max-kl", type=click.FloatRange(0), default=default("max_kl"), show_default="0.001",
              help="Per view: KL(recomputed || cached) in nats over the stored classes plus the leftover.")
@click.option("--scan/--no-scan", default=True, show_default=True,
              help="First check every chunk of every complete unit: present, checksum intact.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar on a terminal.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the full report (every failing view) as JSON here.")
def verify_cache(m, cache_path, sample, seed, max_digest_mismatches, max_top1_disagreement, max_prob_error,
                 max_leftover_error, max_kl, scan, progress, json_path):
    """Recompute the teacher on a random sample of the cache's complete units (train and val) and check
    digests, top-K agreement, and the cached probabilities, leftover mass and KL; exit 1 past the thresholds. Units not complete
    yet are listed, not failed."""
    from pipeline.cache import CacheError
    from pipeline.manifest import ManifestError
    from pipeline.reader import ShardError
    from pipeline.teacher import TeacherError
    from pipeline import verify

    thresholds = verify.Thresholds(max_digest_mismatches, max_top1_disagreement, max_prob_error, max_leftover_error,
                                   max_kl)
    try:
        report = verify.verify_cache(m, cache_path or m.cache.path, sample, seed, thresholds, scan, progress)
    except (CacheError, ManifestError, ShardError, TeacherError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(verify.format_report(report))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    if not report.passed:
        raise SystemExit(1)

