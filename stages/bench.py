"""`distill bench`: measure the speed ratios and the storage cost side by side; write results.json and
BENCHMARKS.md. The benchmark lives outside the installed package, in the checkout's `benchmarks/` (as timm
keeps its benchmark.py beside its package), so this command runs from a checkout."""

import importlib
import shlex
import sys
from pathlib import Path

import click

from pipeline.manifest import ManifestError
from pipeline.manifest_loader import load

# benchmarks.run.SECTIONS, spelled out so that `--help` does not import torch (a test keeps the two equal)
SECTIONS = ("deit_224", "storage", "cache_read", "view_replay", "cache_stage", "student", "sweep_pass")


def _benchmarks_run():
    """`benchmarks.run`, from the import path or else from the checkout this file lives in."""
    try:
        return importlib.import_module("benchmarks.run")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.run"):
            raise
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "run.py").is_file():
        raise click.ClickException(f"the benchmarks/ package is not next to {root / 'stages'}: `distill bench` runs "
                                   f"from a checkout of the repository (make bench, from its root)")
    sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.run")


@click.command("bench")
@click.option("--quick", is_flag=True, help="Tiny settings for a smoke run (about a minute).")
@click.option("--out", default="bench", show_default=True, type=click.Path(file_okay=False),
              help="Directory for results.json and the bench's scratch data (<out>/work, wiped first).")
@click.option("--markdown", type=click.Path(dir_okay=False),
              help="Where the report goes [default: BENCHMARKS.md; with --quick <out>/BENCHMARKS.md, so a smoke "
                   "run never replaces the committed numbers].")
@click.option("--only", multiple=True, type=click.Choice(SECTIONS),
              help="Run only this section (repeatable); sections another needs run first, unreported.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the teacher and the student run.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch intra-op threads of the bench process (1: per-core rates, steadiest on a shared machine).")
@click.option("--manifest", "manifest_path", default="manifests/demo.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Run spec whose view recipe the digits runs replay.")
def bench(quick, out, markdown, only, device, threads, manifest_path):
    """224 px against timm's input path; student speedup, cache-stage efficiency, cache read rate, storage per
    view and view replay cost on the digits."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda but no CUDA device is visible: use --device cpu (or auto)")
    try:
        base = load(manifest_path)
    except ManifestError as e:
        raise click.UsageError(str(e)) from None
    args = (["--quick"] if quick else []) + (["--out", out] if out != "bench" else []) \
        + [a for name in only for a in ("--only", name)] + (["--device", device] if device != "cpu" else []) \
        + (["--threads", str(threads)] if threads != 1 else []) \
        + (["--manifest", manifest_path] if manifest_path != "manifests/demo.yaml" else [])
    command = shlex.join(["distill", "bench", *args])
    results = _benchmarks_run().run(out, quick=quick, markdown=markdown, only=only, device=device, manifest=base,
                                    command=command, threads=threads)
    click.echo(f"bench: {out}/results.json ({', '.join(f'{k} {v} s' for k, v in results['seconds'].items())})")
