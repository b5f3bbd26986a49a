"""`make bench`: the project's speed and storage claims, measured side by side and written down.

Sections (each a module of this package returning plain JSON data and its markdown):

- `deit_224` (`benchmarks.deit224`): the real setting. DeiT's recipe at 224 px on ImageNet-like JPEG photos,
  the real architectures with random weights: timm's own input path (A), the project's student from the
  cache (B), A with the teacher online (C), and the replay against timm's transform per view.
- `student`, `cache_stage`, `cache_read`, `view_replay`: the loop, stage 1, the cache reader and the replay
  on the small digits setting (`benchmarks.student`, `.stage`, `.cache_read`, `.replay`).
- `storage` (`benchmarks.storage`): bytes per view on disk and the codec choice.
- `sweep_pass` (`benchmarks.sweep_pass`): four students on one shared data pass against the same four trained
  one after another, at 224 px and on the demo's setting.

Each comparison interleaves its alternatives (A B A B ...), so a shared, noisy machine slows them alike; the
report gives medians and ratios of medians. The bench builds what it measures under `<out>/work`, which it
wipes first (the generated 224 px photos are kept in `<out>/photos` and reused).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import bench_gpu, cache_read, deit224, replay, stage, storage, student, sweep_pass
from benchmarks.markdown import table
from benchmarks.settings import bench_manifest, machine, settings
from pipeline import teacher_cache
from pipeline.manifest import Manifest
from pipeline.teacher import pick_device

SECTIONS = ("deit_224", "storage", "cache_read", "view_replay", "cache_stage", "student", "sweep_pass")
REPORT_ORDER = ("deit_224", "student", "sweep_pass", "cache_stage", "cache_read", "storage", "view_replay")
# sections whose module returns (results, markdown): their results' top-level keys go to results.json's top level
MEASURED = {"storage": storage.measure, "sweep_pass": sweep_pass.measure}
GOALS = {"deit_224": deit224.goals, "student": student.goals, "cache_stage": stage.goals,
         "cache_read": cache_read.goals, "view_replay": replay.goals}
MARKDOWN = {"deit_224": deit224.markdown, "student": student.markdown, "cache_stage": stage.markdown,
            "cache_read": cache_read.markdown, "view_replay": replay.markdown}
HEADLINE_KEYS = ("b_over_a_224", "online_share_of_ideal_224", "replay_over_timm_ms", "first_batch_over_steady")


def run(out: str | Path, quick: bool = False, markdown: str | Path | None = None, only: tuple[str, ...] = (),
        device: str = "cpu", manifest: Manifest | None = None, command: str = "distill bench",
        threads: int = 1) -> dict:
    """Run the sections (all, or `only`), write `<out>/results.json` and the markdown report; returns the
    results. `threads`: torch's intra-op threads in this process (1 gives per-core rates, which a shared
    machine disturbs least: two spinning threads on two busy cores collapse). `manifest` supplies the view
    recipe of the digits runs (the CLI passes manifests/demo.yaml's; default `Manifest()`, DeiT's recipe);
    `command` is recorded as the way to reproduce the numbers."""
    unknown = [name for name in only if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section {unknown[0]!r}: valid sections are {', '.join(SECTIONS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible: use --device cpu or auto")
    if threads < 1:
        raise ValueError(f"--threads {threads} must be at least 1")
    torch.set_num_threads(threads)
    chosen = [name for name in SECTIONS if not only or name in only]
    s = settings(quick)
    out = Path(out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch_device = pick_device(device)
    results = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "quick": quick, "machine": machine(torch_device), "settings": dataclasses.asdict(s),
               "sections": {}, "seconds": {}, "markdown": {}}
    digits = None

    def digits_manifest() -> Manifest:
        nonlocal digits
        if digits is None:
            digits = bench_manifest(manifest or Manifest(), work, s, device)
        return digits

    def measured_section(name: str):
        def section():
            result, text = MEASURED[name](quick)
            results["markdown"][name] = text
            results.update({k: v for k, v in result.items() if not isinstance(v, dict)})
            return result
        return section

    steps = {
        "deit_224": lambda: deit224.measure(work / "deit224", out / "photos", quick, device),
        "storage": measured_section("storage"),
        "sweep_pass": measured_section("sweep_pass"),
        "cache_read": lambda: cache_read.measure(work, s),
        "view_replay": lambda: replay.measure(work, digits_manifest(), s),
        "cache_stage": lambda: stage.measure(work, digits_manifest(), s),
        "student": lambda: student.measure(work, digits_manifest(), s),
    }
    for name in chosen:
        if name == "student" and "cache_stage" not in chosen:  # the student reads the stage's cache
            teacher_cache.run(digits_manifest(), progress=False)
        start = time.perf_counter()
        results["sections"][name] = steps[name]()
        results["seconds"][name] = round(time.perf_counter() - start, 1)
    results["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if "deit_224" in results["sections"]:
        results.update({k: results["sections"]["deit_224"][k] for k in HEADLINE_KEYS})
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = Path(markdown) if markdown is not None else (out / "BENCHMARKS.md" if quick else Path("BENCHMARKS.md"))
    markdown.write_text(report(results))
    return results


# --------------------------------------------------------------------------------------------- the report


def report(results: dict) -> str:
    """BENCHMARKS.md from the results: machine, versions, command, date, the goals table, then one table per
    measurement with a sentence of interpretation per row."""
    mach, sec = results["machine"], results["sections"]
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`distill bench`, the `benchmarks/` package); do not edit by hand. Every "
             "comparison interleaves its alternatives (A B A B ...) and reports medians over the repetitions, "
             "with the spread (min-max) where it matters; the raw runs are in `bench/results.json`.", "",
             f"- Command: `{results['command']}`"
             + (" (quick smoke run: tiny settings, not for quoting)" if results["quick"] else ""),
             f"- Date: {results['date']}",
             f"- Machine: {mach['cpu']}, {mach['usable_cores']} usable cores of {mach['cores']}, "
             f"{mach['ram_gib']} GiB RAM, {mach['device']}{' (' + mach['gpu'] + ')' if mach['gpu'] else ''}; "
             f"torch threads {mach['torch_threads']}; load average {_load(mach.get('load_average'))} before, "
             f"{_load(mach.get('load_average_after'))} after",
             f"- Versions: Python {mach['python']}, " + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()),
             f"- Repetitions (digits sections): {results['settings']['reps']}; seconds per section: "
             + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()), ""]
    rows = [row for name, goals in GOALS.items() if name in sec for row in goals(sec[name])]
    lines += ["## Goals", ""] + table(["#", "measure", "result", "goal", "met"], rows) + [""]
    gpu = bench_gpu.markdown(bench_gpu.recorded())
    lines += gpu + ([""] if gpu else [])
    for name in REPORT_ORDER:
        if name in MEASURED and name in results.get("markdown", {}):
            lines += [results["markdown"][name], ""]
        elif name in sec and name in MARKDOWN:
            lines += MARKDOWN[name](sec[name]) + [""]
    return "\n".join(lines)


def _load(values) -> str:
    return "n/a" if not values else "/".join(f"{v:.2f}" for v in values)
