"""`distill demo`: the main job on the embedded default, end to end.

shards -> teacher -> teacher-cache -> train-student twice (no distillation, hard distillation) -> a summary
table in runs/demo/summary.json -> teacher agreement statistics (runs/demo/stats). Every step resumes or skips
what is done."""

import json
from pathlib import Path

import click

from pipeline.cli import manifest_options
from pipeline.manifest import from_dict, parse_override, to_dict
from stages.shards import digits_root
from stages.stats import write_stats
from stages.teacher import train_demo_teacher

MODES = ("none", "hard")


def student_manifest(m, mode: str, out: Path):
    overrides = [f"student.distillation={mode}", f"student.run_dir={out / f'student-{mode}'}"]
    return from_dict(to_dict(m), [parse_override(o) for o in overrides])


@click.command("demo")
@manifest_options
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the students and summary.json go.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(m, out, progress):
    """Run the whole pipeline on the embedded default and print how the students compare."""
    from pipeline import cache
    from pipeline.shards import write_digits
    from pipeline.teacher_cache import run as fill_cache
    from pipeline.train import RESULT, train

    out = Path(out)
    if not Path(m.data.train).exists():
        click.echo("[1/5] shards")
        write_digits(digits_root(m), m.data.shard_size)
    click.echo(f"[2/5] {train_demo_teacher(m)}")
    click.echo("[3/5] teacher-cache")
    summary = fill_cache(m, progress=progress)
    click.echo(f"  {m.cache.path}: {summary['units_written']} units written, {summary['units_skipped']} already done, "
               f"{cache.disk_usage(m.cache.path) / max(cache.cached_views(m.cache.path), 1):.1f} bytes/view")
    results = {}
    for i, mode in enumerate(MODES):
        sm = student_manifest(m, mode, out)
        done = Path(sm.student.run_dir) / RESULT
        click.echo(f"[4/5] train-student ({mode}, {i + 1}/{len(MODES)})")
        results[mode] = json.loads(done.read_text()) if done.exists() else train(sm, progress=progress)
    table = {
        "teacher_acc": results["hard"]["teacher_top1"],
        "student_none_acc": results["none"]["top1_joint"],
        "student_hard_acc": results["hard"]["top1_joint"],
        "agreement_hard": results["hard"]["agree_joint"],
        "agreement_none": results["none"]["agree_joint"],
        "students": {mode: {k: r[k] for k in ("top1_class", "top1_dist", "top1_joint", "agree_class", "agree_dist",
                                               "agree_joint")} for mode, r in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    click.echo(f"\n[5/5] val top-1 on {results['hard']['samples']} digits (runs/demo/summary.json)\n"
               f"  {'model':<22}{'class':>8}{'dist':>8}{'joint':>8}{'agree w/ teacher':>18}\n"
               f"  {'teacher (RegNetY)':<22}{'':>8}{'':>8}{table['teacher_acc']:>8.4f}{'':>18}")
    for mode, r in results.items():
        click.echo(f"  {'student ' + mode:<22}{r['top1_class']:>8.4f}{r['top1_dist']:>8.4f}{r['top1_joint']:>8.4f}"
                   f"{r['agree_joint']:>18.4f}")
    click.echo("\nteacher agreement statistics (make stats)\n")
    click.echo(write_stats(m.cache.path, [str(out / f"student-{mode}") for mode in MODES], out / "stats"))
