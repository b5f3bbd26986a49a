"""Section 2, cache stage: views/s of stage 1 (`teacher_cache.run`) against the teacher's forward alone on
pre-made batches of the same shape, and where the stage's time goes. The phases are timed by wrapping the
stage's own functions for the duration of the run (`PhaseTimer`); stage 1 itself is not changed."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.markdown import met, num, table
from benchmarks.settings import Settings
from benchmarks.timing import PhaseTimer, interleave, summary
from pipeline import cache, teacher_cache, views
from pipeline.manifest import Manifest
from pipeline.shards import load_shardlist
from pipeline.teacher import forward, load_teacher, pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STAGE_PHASES = {
    "decode": [(teacher_cache, "read_shard")],
    "view_params": [(views, "sample_params")],
    "render": [(views, "render_unmixed"), (views, "mix"), (views, "eval_view")],
    "digest": [(views, "view_digest")],
    "teacher": [(teacher_cache, "forward")],
    "write": [(cache, "write_unit")],
}


def teacher_alone(teacher, views_u8: torch.Tensor, count: int, device: torch.device) -> float:
    """views/s of the teacher's forward on a pre-made uint8 batch, over about `count` views."""
    batches = max(1, -(-count // len(views_u8)))
    forward(teacher, views_u8, device)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        forward(teacher, views_u8, device)
    _sync(device)
    return batches * len(views_u8) / (time.perf_counter() - start)


def measure(work: Path, m: Manifest, s: Settings) -> dict:
    """Stage 1 into a fresh cache per repetition, against the teacher's forward alone on the same number of
    views in batches of cache.batch_size. Leaves the first repetition's cache at m.cache.path."""
    device = pick_device(m.cache.device)
    train, val = load_shardlist(m.data.train), load_shardlist(m.data.val)
    teacher = load_teacher(m.teacher, len(train.classes), device)
    total = m.cache.epochs * train.num_samples + val.num_samples
    batch = torch.randint(0, 256, (m.cache.batch_size, m.teacher.img_size, m.teacher.img_size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    phases: list[dict] = []

    def stage():
        path = m.cache.path if not phases else f"{m.cache.path}-rep{len(phases)}"
        timer = PhaseTimer(STAGE_PHASES)
        with timer.timing():
            result = teacher_cache.run(replace(m, cache=replace(m.cache, path=path)), progress=False)
        if result["views"] != total:
            raise RuntimeError(f"the bench's stage run filled {result['views']} views, expected {total}")
        shares = {name: timer.seconds[name] / result["seconds"] for name in STAGE_PHASES}
        phases.append(shares | {"other": max(0.0, 1.0 - sum(shares.values()))})
        return result["views_per_s"]

    runs = interleave({"stage": stage, "teacher_alone": lambda: teacher_alone(teacher, batch, total, device)}, s.reps)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {name: summary(values) for name, values in runs.items()} | {
        "efficiency": medians["stage"] / medians["teacher_alone"],
        "phase_shares": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
        "views_per_run": total, "batch_size": m.cache.batch_size, "workers": m.cache.workers, "device": str(device),
        "teacher": {"model": m.teacher.model, "model_args": m.teacher.model_args, "img_size": m.teacher.img_size},
    }


def markdown(cs: dict) -> list[str]:
    shares = cs["phase_shares"]
    explain = {
        "decode": "reading the tar and decoding the image (`read_shard`)",
        "view_params": "drawing the view parameters (`views.sample_params`)",
        "render": "rendering the views from them (`views.render_unmixed` and `views.mix`, `views.eval_view` for val)",
        "digest": "hashing each uint8 view (`views.view_digest`)",
        "teacher": "the teacher's forward (`teacher.forward`)",
        "write": "writing and fsyncing the unit (`cache.write_unit`)",
        "other": "the rest: top-K, collation, buffers, loop",
    }
    rows = [[name, f"{shares[name] * 100:.1f}%", explain[name]] for name in explain]
    eff = cs["efficiency"]
    return (["## 2. Cache stage efficiency", "",
             f"`teacher_cache.run` ({cs['views_per_run']} views per run: one train epoch and the val split, batch "
             f"{cs['batch_size']}, loader workers {cs['workers']}, {cs['device']}) against `teacher.forward` "
             f"alone on a pre-made uint8 batch of the same shape.", ""]
            + table(["run", "views/s", "interpretation"], [
                ["teacher-cache", num(cs["stage"]["median"]),
                 f"The whole stage runs at {num(eff * 100, 3)}% of the teacher's own speed."],
                ["teacher forward alone", num(cs["teacher_alone"]["median"]),
                 "The ceiling: what the stage would reach if decoding, rendering and writing cost nothing or "
                 "overlapped with it."]])
            + ["", "Where the stage's time goes (median shares of the loop's wall time; with loader workers 0 on the "
               "CPU every phase is serial, so everything that is not the teacher is what workers would hide):", ""]
            + table(["phase", "share", "what"], rows))


def goals(cs: dict) -> list[list[str]]:
    return [["2", f"teacher-cache views/s / teacher forward alone ({cs['device']})", num(cs["efficiency"]),
             ">= 0.9 on a GPU with loader workers", met(None if cs["device"] == "cpu" else cs["efficiency"] >= 0.9)]]
