"""The demo's protocol and its summary: students of every distillation mode and seed trained from one cache
(the same steps and batches for every mode at a given seed), each scored once on the held-out test split,
and the modes compared by their spread over seeds.

Settings are chosen on the validation split (the students' `result.json`, the teacher's checkpoint); the
test numbers are reported, never compared to choose anything. `claim` says whether every seed of one mode
beats every seed of another (non-overlapping spreads), on val and on test.
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

HEADS = ("class", "dist", "joint")


def run_name(mode: str, seed: int) -> str:
    """The sweep's name for the run with these overrides (`pipeline.sweep.run_name`'s rule)."""
    return f"distillation={mode},seed={seed}"


def sweep_spec(modes: list[str], seeds: list[int]) -> dict:
    """Seed by seed, every mode: a demo cut short has whole seeds to compare."""
    return {"name": "students", "runs": [{"student.distillation": mode, "student.seed": seed}
                                         for seed in seeds for mode in modes]}


def spread(values: list[float]) -> dict:
    """mean, sample sd (None for one value), min, max and the values themselves."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "runs": list(values)}


def mode_summary(val: list[dict], test: list[dict]) -> dict:
    """Per head, the spread over seeds of val top-1 (result.json), test top-1 and test agreement with the
    teacher, plus the val agreement the trainer measured against the cache's val answers."""
    out = {"val": {h: spread([r[f"top1_{h}"] for r in val]) for h in HEADS},
           "test": {h: spread([r[f"top1_{h}"] for r in test]) for h in HEADS},
           "test_agreement": {h: spread([r[f"agree_{h}"] for r in test]) for h in HEADS},
           "val_agreement": {h: spread([r[f"agree_{h}"] for r in val]) for h in HEADS}}
    return out


def claim(modes: dict[str, dict], low: str, high: str, head: str = "joint") -> dict:
    """Does every seed of `high` beat every seed of `low` (joint head), on val and on test?"""
    out = {}
    for split in ("val", "test"):
        lo, hi = modes[low][split][head], modes[high][split][head]
        out[split] = {f"{low}_max": lo["max"], f"{high}_min": hi["min"], "holds": hi["min"] > lo["max"]}
    return out


def commit(root: str | Path = ".") -> str | None:
    """The checkout's commit (with `-dirty` for uncommitted changes), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cell(s: dict) -> str:
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['sd']:.1f}" if s["sd"] is not None else "")


def format_table(summary: dict) -> str:
    """The printable table: test top-1 of each head, agreement with the teacher, val joint; in percent."""
    heads = ["model", "class", "dist", "joint", "agree (joint)", "val joint"]
    rows = [heads, ["teacher (RegNetY)", "", "", f"{100 * summary['teacher']['test_top1']:.1f}", "",
                    f"{100 * summary['teacher']['val_top1']:.1f}"]]
    for mode, s in summary["modes"].items():
        rows.append([f"student {mode}", *(_cell(s["test"][h]) for h in HEADS), _cell(s["test_agreement"]["joint"]),
                     _cell(s["val"]["joint"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    return "\n".join("  " + r[0].ljust(widths[0]) + "".join(c.rjust(w + 3) for c, w in zip(r[1:], widths[1:]))
                     for r in rows)
