"""`distill demo`: the main job on the embedded default (Fashion-MNIST), end to end.

shards -> teacher -> teacher-cache -> students of every mode and seed from the one cache (a `distill sweep`)
-> each scored once on the test split -> cached vs online time of one student -> the summary table in
runs/demo/summary.json -> teacher agreement statistics and plots (runs/demo/stats). Every step resumes or
skips what is done."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from pipeline.cli import manifest_options
from pipeline.manifest import to_dict
from pipeline.manifest_loader import from_dict, parse_override

MODES = ("none", "soft", "hard")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated integers, e.g. 0,1,2") from None


def _sweep(manifest_path: Path, sweep_path: Path, sweep_dir: Path, jobs: int) -> None:
    """`distill sweep` in a fresh process (a sweep forks its trainers, which this process, having run torch,
    must not do), one torch thread per run when several train at once."""
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "sweep", "--manifest",
               str(manifest_path), "--sweep", str(sweep_path), "--out", str(sweep_dir), "--jobs", str(jobs)]
    if subprocess.run(command, env=env).returncode:
        raise click.ClickException(f"the students' sweep failed (logs under {sweep_dir}); run `make demo` again "
                                   f"to retry the runs that did not finish")


class StageSeconds(dict):
    """Wall seconds per stage, kept in a file and added up over resumed invocations (a stage found done costs
    next to nothing, so the totals are the work's own time)."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.is_file() else {})
        self.path = path

    def timed(self, stage: str):
        seconds = self

        class Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - self.start, 1)
                seconds.path.parent.mkdir(parents=True, exist_ok=True)
                seconds.path.write_text(json.dumps(seconds, indent=1) + "\n")

        return Timer()


@click.command("demo")
@manifest_options
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the students, the stats and summary.json go.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Student seeds (comma-separated).")
@click.option("--modes", default=",".join(MODES), show_default=True, help="Distillation modes to train.")
@click.option("--jobs", type=click.IntRange(min=1), default=2, show_default=True, help="Students trained at once.")
@click.option("--timing-epochs", type=click.IntRange(min=0), default=2, show_default=True,
              help="Epochs of the cached vs online timing of one student (0: skip it).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(m, out, seeds, modes, jobs, timing_epochs, progress):
    """Run the whole pipeline on the embedded default and print how the students compare."""
    import numpy as np

    from pipeline import cache, heldout
    from pipeline import demo as protocol
    from pipeline.builtin_data import write_builtin
    from pipeline.fashion_mnist import FashionMNISTError
    from pipeline.shards import load_shardlist
    from pipeline.teacher_cache import run as fill_cache
    from pipeline.train import RESULT, train
    from stages.stats import write_stats
    from stages.teacher import train_demo_teacher

    out, seeds, modes = Path(out), _ints(seeds), [x.strip() for x in modes.split(",") if x.strip()]
    out.mkdir(parents=True, exist_ok=True)
    seconds = StageSeconds(out / "seconds.json")
    with seconds.timed("shards"):
        if not all(Path(p).exists() for p in (m.data.train, m.data.val, m.data.test or m.data.val)):
            click.echo(f"[1/7] shards ({m.data.builtin})")
            try:
                for path in write_builtin(m.data):
                    click.echo(f"  {path}")
            except FashionMNISTError as e:
                raise click.ClickException(str(e)) from None
    with seconds.timed("teacher"):
        click.echo(f"[2/7] {train_demo_teacher(m)}")
    with seconds.timed("teacher_cache"):
        click.echo("[3/7] teacher-cache")
        filled = fill_cache(m, progress=progress)
        click.echo(f"  {m.cache.path}: {filled['units_written']} units written, {filled['units_skipped']} already "
                   f"done, {cache.disk_usage(m.cache.path) / max(cache.cached_views(m.cache.path), 1):.1f} bytes/view")

    manifest_path, sweep_path, sweep_dir = out / "manifest.yaml", out / "sweep.yaml", out / "students"
    manifest_path.write_text(yaml.safe_dump(to_dict(m), sort_keys=False))
    sweep_path.write_text(yaml.safe_dump(protocol.sweep_spec(modes, seeds), sort_keys=False))
    with seconds.timed("students"):
        click.echo(f"[4/7] {len(modes) * len(seeds)} students from the one cache: modes {modes} x seeds {seeds}, "
                   f"{jobs} at a time")
        _sweep(manifest_path, sweep_path, sweep_dir, jobs)

    runs = {mode: [sweep_dir / protocol.run_name(mode, seed) for seed in seeds] for mode in modes}
    val = {mode: [json.loads((d / RESULT).read_text()) for d in dirs] for mode, dirs in runs.items()}
    with seconds.timed("test"):
        click.echo(f"[5/7] the test split, once per run ({m.data.test or 'none: data.test is not set'})")
        # the split every number of the table comes from: test; val only where the manifest has no test split
        split = heldout.TestSplit(m.data.test or m.data.val)
        teacher_preds = heldout.teacher_predictions(m.teacher, split)
        scored = {mode: [heldout.scores(heldout.student_predictions(d, split), split.labels, teacher_preds)
                         for d in dirs] for mode, dirs in runs.items()}

    timing = None
    if timing_epochs:
        with seconds.timed("cached_vs_online"):
            click.echo(f"[6/7] cached vs online teacher: one student ({modes[-1]}, seed {seeds[0]}, "
                       f"{timing_epochs} epochs each)")
            timing = {}
            for answers in ("cache", "online"):
                sets = [f"student.distillation={modes[-1]}", f"student.seed={seeds[0]}",
                        f"student.epochs={timing_epochs}", f"student.run_dir={out / 'timing' / answers}"]
                sm = from_dict(to_dict(m), [parse_override(s) for s in sets])
                done = Path(sm.student.run_dir) / RESULT
                timing[answers] = json.loads(done.read_text()) if done.exists() else train(sm, answers=answers,
                                                                                            progress=progress)
            timing = {"epochs": timing_epochs, "cached_seconds": timing["cache"]["seconds"],
                      "online_seconds": timing["online"]["seconds"],
                      "online_over_cached": round(timing["online"]["seconds"] / timing["cache"]["seconds"], 2),
                      "same_val_top1": all(timing["cache"][f"top1_{h}"] == timing["online"][f"top1_{h}"]
                                           for h in protocol.HEADS)}

    per_mode = {mode: protocol.mode_summary(val[mode], scored[mode]) for mode in modes}
    teacher_val = float(np.mean([r["teacher_top1"] for r in val[modes[0]]]))
    summary = {
        "teacher_acc": float((teacher_preds == split.labels).mean()),
        "student_none_acc": per_mode["none"]["test"]["joint"]["mean"] if "none" in per_mode else None,
        "student_hard_acc": per_mode["hard"]["test"]["joint"]["mean"] if "hard" in per_mode else None,
        "agreement_hard": per_mode["hard"]["test_agreement"]["joint"]["mean"] if "hard" in per_mode else None,
        "dataset": m.data.builtin,
        "train_images": load_shardlist(m.data.train).num_samples,
        "val_images": load_shardlist(m.data.val).num_samples,
        "reported_split": "test" if m.data.test else "val",
        "test_images": len(split) if m.data.test else None,
        "seeds": seeds,
        "teacher": {"test_top1": float((teacher_preds == split.labels).mean()), "val_top1": teacher_val},
        "modes": per_mode,
        "claim_none_lt_hard": protocol.claim(per_mode, "none", "hard") if {"none", "hard"} <= set(per_mode) else None,
        "cached_vs_online": timing,
        "commit": protocol.commit(),
    }
    click.echo(f"\n[7/7] top-1 % on the {len(split)} {summary['reported_split']} images, mean ± sd over seeds {seeds} "
               f"({out / 'summary.json'})\n{protocol.format_table(summary)}")
    if summary["claim_none_lt_hard"]:
        for where, c in summary["claim_none_lt_hard"].items():
            click.echo(f"  none < hard in every seed ({where}, joint): {'yes' if c['holds'] else 'no'} "
                       f"(none max {100 * c['none_max']:.1f}, hard min {100 * c['hard_min']:.1f})")
    if timing:
        click.echo(f"  cached vs online teacher ({timing_epochs} epochs): {timing['cached_seconds']} s vs "
                   f"{timing['online_seconds']} s ({timing['online_over_cached']}x), same val top-1: "
                   f"{timing['same_val_top1']}")
    click.echo("\nteacher agreement statistics (make stats)\n")
    with seconds.timed("stats"):
        click.echo(write_stats(m.cache.path, [runs[mode][0] for mode in modes], out / "stats"))
    summary["seconds"] = dict(seconds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
