"""Sweeps: many students trained against one read-only teacher cache, each in its own run directory.

A sweep file (YAML, loaded strictly)::

    name: demo                      # optional; default: the file's stem
    base: {student.epochs: 8}       # optional: overrides of every run
    grid:                           # the cartesian product of these values ...
      student.distillation: [soft, hard]
      student.alpha: [0.5, 0.9]
    runs:                           # ... and/or these runs, one mapping of overrides each
      - {student.distillation: none}

Keys are the manifest's dotted keys under `student.` (a sweep varies the student; the teacher, the views and
the cache stay those of the one cache every run reads), applied through `pipeline.manifest_loader`'s overrides,
so a wrong key or value stops the sweep before anything runs. A run is named after its own overrides
(`distillation=hard,alpha=0.5`) and trains in `<sweep dir>/<run name>` (sweep dir: `runs/sweeps/<name>`).

One data pass for many students. Runs whose batches are identical (same cache, views, student img_size,
batch_size, epochs, data seed, loader workers and shuffle buffer, device: `pipeline.train.pass_key`) form a
pass and train together in one process (`pipeline.train.train_shared`): each batch is read, decoded and
rendered once and every student of the pass steps on it. Models, modes, alpha, tau, learning rates,
schedules, EMA and init seeds may differ inside a pass (a seed sweep shares a pass when `student.data_seed`
is fixed; otherwise each seed shuffles its own data). The sweep prints the grouping before it starts.

Passes run in forked children of the sweep (so the torch/timm import is paid once), `jobs` at a time, each
logging to `<sweep dir>/pass-<n>.log`, every student also to its own `<run dir>/train.log`. A run with a
result.json is finished and skipped; an interrupted one resumes from its own last.pth (the trainer does that),
and a student that fails (a non-finite loss) stops with its error in `<run dir>/error.txt` while the others of
its pass go on. A child dies with the sweep (Linux: PR_SET_PDEATHSIG), and holds an exclusive lock on each of
its run directories while it trains, so two sweeps never train the same run at once. The summary
(`summary.md`, `summary.csv`) ranks the finished runs by the joint head's val top-1; its `pass` column numbers
the data passes (runs with the same number shared one).
"""

from __future__ import annotations

import csv
import ctypes
import fcntl
import itertools
import json
import multiprocessing
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from tqdm import tqdm

from pipeline import cache
from pipeline.manifest import Manifest, ManifestError, to_dict
from pipeline.manifest_loader import load, read_yaml_mapping
# loads torch and timm once, before any fork
from pipeline.train import CHECKPOINT, ERROR, RESULT, RESUMABLE_CHANGES, pass_key, train_shared

SWEEP_KEYS = ("name", "base", "grid", "runs")
LOG = "train.log"  # each run's own log (pipeline.run_log)
LOCK = "sweep.lock"
DEFAULT_ROOT = Path("runs/sweeps")
POLL_S = 0.2
METRICS = ("top1_joint", "top1_class", "top1_dist", "agree_joint", "agree_class", "agree_dist", "teacher_top1")


class SweepError(ValueError):
    """A sweep file is malformed, a run cannot start, or runs failed; the message names the run and the fix."""


@dataclass(frozen=True, slots=True)
class SweepSpec:
    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PlannedRun:
    name: str
    run_dir: Path
    overrides: dict[str, Any]  # the run's own (named) overrides
    sets: list[str]  # every `--set` it is trained with, base and run_dir included
    manifest: Manifest

    @property
    def finished(self) -> bool:
        return (self.run_dir / RESULT).is_file()


# --------------------------------------------------------------------------------------------- the sweep file


def _check_overrides(overrides: Any, where: str) -> dict[str, Any]:
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}: expected a mapping of student.* keys to values, got {overrides!r}")
    for key in overrides:
        if not isinstance(key, str) or not key.startswith("student.") or key == "student.":
            raise SweepError(f"{where}: key {key!r} is not a student.* key. A sweep varies the student only; the "
                             f"teacher, views and cache are the manifest's, shared by all runs through one cache")
        if key == "student.run_dir":
            raise SweepError(f"{where}: student.run_dir is set by the sweep (<sweep dir>/<run name>); remove it")
    return overrides


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep file strictly: unknown keys, wrong types, empty value lists and non-student keys raise."""
    path = Path(path)
    data = read_yaml_mapping(path, SweepError, "sweep file", list(SWEEP_KEYS))
    unknown = sorted(set(data) - set(SWEEP_KEYS), key=str)
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r}: valid keys are {list(SWEEP_KEYS)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"{path}: name {name!r} must be a plain directory name (letters, digits, _ . -)")
    base = _check_overrides(data.get("base") or {}, f"{path}: base")
    grid = _check_overrides(data.get("grid") or {}, f"{path}: grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
    runs = data.get("runs") or []
    if not isinstance(runs, list):
        raise SweepError(f"{path}: runs must be a list of mappings of overrides, got {runs!r}")
    runs = [_check_overrides(run, f"{path}: runs[{i}]") for i, run in enumerate(runs)]
    if not grid and not runs:
        raise SweepError(f"{path}: no runs: give a grid (key: [values]) and/or runs (a list of overrides)")
    return SweepSpec(name=name, base=base, grid=grid, runs=runs)


def expand(spec: SweepSpec) -> list[dict[str, Any]]:
    """Each run's own overrides: the grid's cartesian product (in the order written), then the listed runs."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*spec.grid.values())] if keys else []
    return combos + [dict(run) for run in spec.runs]


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "+".join(map(_format_value, value))
    return str(value)


def run_name(overrides: dict[str, Any]) -> str:
    """`student.distillation=hard, student.alpha=0.5` -> `distillation=hard,alpha=0.5`: each key by its last
    part (its whole path below student. where two last parts clash); mapping values as one part per field."""
    if not overrides:
        return "base"
    lasts = [key.rsplit(".", 1)[-1] for key in overrides]
    parts = []
    for key, value in overrides.items():
        short = key.rsplit(".", 1)[-1] if lasts.count(key.rsplit(".", 1)[-1]) == 1 else key.removeprefix("student.")
        items = value.items() if isinstance(value, dict) else [(None, value)]
        parts += [f"{short}{'' if sub is None else '.' + str(sub)}={_format_value(v)}" for sub, v in items]
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", ",".join(parts))


def to_sets(overrides: dict[str, Any]) -> list[str]:
    """Overrides as `--set key=value` strings (values as JSON, which the manifest's YAML parser reads back)."""
    def text(value: Any) -> str:
        return value if isinstance(value, str) and yaml.safe_load(value) == value else json.dumps(value)

    return [f"{key}={text(value)}" for key, value in overrides.items()]


def plan(manifest_path: str | Path, spec: SweepSpec, sweep_dir: Path,
         common: tuple[str, ...] = ()) -> list[PlannedRun]:
    """Every run with its manifest loaded (so every override is checked before anything runs). `common` are
    `key=value` overrides of every run given on the command line (`--set`): they beat the sweep's base and
    yield to the run's own overrides."""
    planned, seen = [], {}
    for i, overrides in enumerate(expand(spec)):
        name = run_name(overrides)
        if name in seen:
            raise SweepError(f"sweep {spec.name}: runs {seen[name]} and {i} have the same overrides ({name}): "
                             f"remove one")
        seen[name] = i
        run_dir = sweep_dir / name
        sets = to_sets(spec.base) + list(common) + to_sets({**overrides, "student.run_dir": str(run_dir)})
        try:
            m = load(manifest_path, sets)
        except ManifestError as e:
            raise SweepError(f"sweep {spec.name}, run {name}: {e}") from None
        planned.append(PlannedRun(name, run_dir, overrides, sets, m))
    return planned


def check_finished(run: PlannedRun, fingerprint: str) -> None:
    """A finished run must have been trained with this sweep's student spec from this cache."""
    result = json.loads((run.run_dir / RESULT).read_text())
    if result.get("cache_fingerprint") != fingerprint:
        raise SweepError(f"{run.run_dir} finished from a cache with fingerprint {result.get('cache_fingerprint')}, "
                         f"not {fingerprint} ({run.manifest.cache.path}): remove the run directory to retrain it, "
                         f"or give the sweep another name")
    have = {k: v for k, v in result["config"]["student"].items() if k not in RESUMABLE_CHANGES}
    want = {k: v for k, v in to_dict(run.manifest.student).items() if k not in RESUMABLE_CHANGES}
    found = cache.first_difference(have, want, "student")
    if found:
        where, was, now = found
        raise SweepError(f"{run.run_dir} finished with {where}={was!r}, but the sweep now asks for {now!r}: remove "
                         f"the run directory to retrain it, or give the sweep another name")


# --------------------------------------------------------------------------------------------- running


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the sweep dies (a killed sweep must not leave trainers behind)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the sweep died before the request took effect
        os._exit(1)


def _train_pass_child(parent: int, manifest_path: str, runs: list[list[str]], log_path: str) -> None:
    """Body of a forked child: the students of one pass (each given by its `--set` overrides) trained on one
    data pass, output to the pass's log. Exits 1 when any student did not finish."""
    _die_with_parent(parent)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    from pipeline.cli import user_errors
    from pipeline.run_log import console_logging

    console_logging()
    for sets in runs:  # each student is what this command would train alone
        print(f"student: distill train-student --manifest {manifest_path} "
              f"{shlex.join(f'--set={s}' for s in sets)}", flush=True)
    try:
        outcomes = train_shared([load(manifest_path, sets) for sets in runs], progress=False)
    except user_errors() as e:
        print(f"Error: {e}", flush=True)
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if any(isinstance(outcome, Exception) for outcome in outcomes) else 0)


def group_runs(manifests: list[Manifest], world_size: int = 1) -> list[list[int]]:
    """Indices of the runs that can share a data pass (equal `pass_key`), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(manifests):
        groups.setdefault(pass_key(m, world_size), []).append(i)
    return list(groups.values())


def describe_passes(runs: list[PlannedRun], passes: list[list[int]]) -> list[str]:
    """One line per pass: its number, its runs, and the batch-deciding settings that set it apart."""
    keys = [json.loads(pass_key(runs[group[0]].manifest)) for group in passes]
    differ = [k for k in keys[0] if any(key[k] != keys[0][k] for key in keys)]
    lines = []
    for n, (group, key) in enumerate(zip(passes, keys), 1):
        apart = ", ".join(f"{k}={json.dumps(key[k])}" for k in differ)
        lines.append(f"  pass {n}{f' ({apart})' if apart else ''}: {len(group)} student"
                     f"{'s' if len(group) > 1 else ''}: {', '.join(runs[i].name for i in group)}")
    return lines


def _try_lock(run_dir: Path) -> int | None:
    """An fd holding the run directory's exclusive lock, or None when another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _failure(run: PlannedRun, exitcode: int | None) -> str:
    error = run.run_dir / ERROR
    if error.is_file():
        return "failed: " + error.read_text().split(":", 1)[0].strip()
    return f"failed (exit {exitcode})"


def execute(manifest_path: str, runs: list[PlannedRun], passes: list[tuple[int, list[int]]], jobs: int,
            sweep_dir: Path, echo: Callable[[str], None]) -> dict[str, str]:
    """Train the passes ((number, indices into `runs`)) `jobs` at a time; returns {run name: outcome}: "done",
    "failed: <error type>" / "failed (exit N)" or "busy: ..." (another process holds its lock). Must be called
    before this process runs any torch op: a fork after OpenMP has started its threads is not safe."""
    context = multiprocessing.get_context("fork")
    pending, running, outcome, started = list(passes), {}, {}, 0
    # one overall bar of students, on a terminal only (logs keep the lines below)
    bar = tqdm(total=sum(len(group) for _, group in passes), unit="student", desc="sweep", disable=None)
    while pending or running:
        while pending and len(running) < jobs:
            number, group = pending.pop(0)
            members, fds = [], []
            for run in (runs[i] for i in group):
                fd = _try_lock(run.run_dir)
                if fd is None:
                    outcome[run.name] = "busy: another process is training it"
                    echo(f"  {run.name}: another process is training it; skipped")
                    bar.update()
                elif run.finished:  # another sweep finished it meanwhile
                    os.close(fd)
                    outcome[run.name] = "done"
                    bar.update()
                else:
                    members.append(run)
                    fds.append(fd)
            if not members:
                continue
            log = log_of(sweep_dir, number)
            child = context.Process(target=_train_pass_child,
                                    args=(os.getpid(), manifest_path, [r.sets for r in members], str(log)),
                                    name=f"sweep-pass-{number}", daemon=False)
            sys.stdout.flush()
            sys.stderr.flush()
            child.start()
            for fd in fds:
                os.close(fd)  # the child holds the locks through its inherited copies until it exits
            started += 1
            resumed = [r.name for r in members if (r.run_dir / CHECKPOINT).exists()]
            echo(f"[pass {number}, {started} started of {len(passes)}] training {len(members)} student"
                 f"{'s' if len(members) > 1 else ''} on one data pass: {', '.join(r.name for r in members)}"
                 f"{f' (resuming {len(resumed)} from their checkpoints)' if resumed else ''}; log {log}")
            running[number] = (members, child, time.monotonic())
        for number, (members, child, since) in list(running.items()):
            if child.exitcode is None:
                continue
            del running[number]
            seconds = time.monotonic() - since
            for run in members:
                if run.finished:
                    outcome[run.name] = "done"
                    echo(f"  {run.name}: done (pass {number}, {seconds:.0f} s)")
                else:
                    outcome[run.name] = _failure(run, child.exitcode)
                    echo(f"  {run.name}: FAILED ({outcome[run.name]}) in pass {number}; see "
                         f"{run.run_dir / LOG} and {log_of(sweep_dir, number)}")
            bar.update(len(members))
        time.sleep(POLL_S)
    bar.close()
    return outcome


def log_of(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / f"pass-{number}.log"


# --------------------------------------------------------------------------------------------- summary


def summary_rows(runs: list[PlannedRun], outcome: dict[str, str],
                 passes: list[list[int]] | None = None) -> list[dict[str, Any]]:
    """One row per run: name, status, its overrides, val metrics, its data pass (the number of the group of
    runs that share one); finished runs first, best joint top-1 first."""
    number = {i: n for n, group in enumerate(passes or [[i] for i in range(len(runs))], 1) for i in group}
    rows = []
    for i, run in enumerate(runs):
        row: dict[str, Any] = {"run": run.name, **run.overrides, "pass": number[i]}
        if run.finished:
            result = json.loads((run.run_dir / RESULT).read_text())
            row["status"] = "done"
            row |= {k: result.get(k) for k in (*METRICS, "steps", "seconds")}
        else:
            row["status"] = outcome.get(run.name, "missing")
        rows.append(row)
    return sorted(rows, key=lambda r: (r["status"] != "done", -(r.get("top1_joint") or 0.0), r["run"]))


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def write_summary(rows: list[dict[str, Any]], sweep_dir: Path, title: str) -> str:
    """summary.csv (a column per swept key, raw numbers) and summary.md (percentages) in the sweep dir;
    returns the Markdown."""
    swept = list(dict.fromkeys(key for row in rows for key in row if key.startswith("student.")))
    columns = ["rank", "run", "status", *swept, *METRICS, "steps", "seconds", "pass"]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for rank, row in enumerate(rows, 1):
            writer.writerow({"rank": rank, **row})
    heads = ["#", "run", "status", "joint top-1 %", "class top-1 %", "dist top-1 %", "joint=teacher %",
             "class=teacher %", "dist=teacher %", "teacher top-1 %", "steps", "seconds", "pass"]
    lines = [f"# {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for rank, row in enumerate(rows, 1):
        cells = [str(rank), row["run"], row["status"]] + [_percent(row.get(k)) for k in METRICS]
        cells += [str(row.get("steps", "-")), str(row.get("seconds", "-")), str(row.get("pass", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (sweep_dir / "summary.md").write_text(text)
    return text


def sweep(manifest_path: str, sweep_path: str, jobs: int = 1, sweep_dir: str | Path | None = None,
          common: tuple[str, ...] = (), echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Plan, check, train what is missing, summarise. Raises SweepError after the summary if runs failed."""
    if jobs < 1:
        raise SweepError(f"--jobs {jobs} must be at least 1")
    spec = load_sweep(sweep_path)
    sweep_dir = Path(sweep_dir) if sweep_dir else DEFAULT_ROOT / spec.name
    runs = plan(manifest_path, spec, sweep_dir, common)
    root = cache.open_cache(runs[0].manifest.cache.path)
    fingerprint = root.attrs["fingerprint"]
    finished = [run for run in runs if run.finished]
    for run in finished:
        check_finished(run, fingerprint)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    passes = group_runs([run.manifest for run in runs])
    (sweep_dir / "sweep.json").write_text(json.dumps(
        {"manifest": str(manifest_path), "sweep": str(sweep_path), "cache": runs[0].manifest.cache.path,
         "runs": {run.name: run.sets for run in runs},
         "passes": [[runs[i].name for i in group] for group in passes]}, indent=1) + "\n")
    todo = [(n, group) for n, group in enumerate(passes, 1) if any(not runs[i].finished for i in group)]
    echo(f"sweep {spec.name}: {len(runs)} runs in {sweep_dir} against cache {runs[0].manifest.cache.path}; "
         f"{len(finished)} finished already, {len(runs) - len(finished)} to train; {len(passes)} data pass"
         f"{'es' if len(passes) > 1 else ''} ({len(todo)} with runs to train, {jobs} at a time):")
    for line in describe_passes(runs, passes):
        echo(line)
    outcome = execute(str(manifest_path), runs, todo, jobs, sweep_dir, echo) if todo else {}
    rows = summary_rows(runs, outcome, passes)
    echo(write_summary(rows, sweep_dir, f"sweep {spec.name}: {len(runs)} students from cache {fingerprint}, "
                                        f"ranked by the joint head's val top-1"))
    number = {runs[i].name: n for n, group in enumerate(passes, 1) for i in group}
    failed = [f"{name} ({how}, log {sweep_dir / name / LOG}, pass log {log_of(sweep_dir, number[name])})"
              for name, how in outcome.items() if how != "done"]
    if failed:
        raise SweepError(f"sweep {spec.name}: {len(failed)} of {len(runs)} runs did not finish: {'; '.join(failed)}. "
                         f"Re-run the sweep to retry them (finished runs are skipped, interrupted ones resume)")
    return rows
