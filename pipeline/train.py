"""Stage 2's training loop: a distilled ViT trained from the teacher cache, with no teacher online.

`train` builds the parts, then the loop reads as verbs; the checkpointer, the evaluator and the metrics
log each decide when they act. Where the teacher's answers come from is one swappable function of the
batch (`cached_answers` by default, `online_answers` runs the teacher on the same uint8 views), so the
equivalence test and the benchmark run the same loop.

Exact resume. A checkpoint holds the model, optimizer, scheduler and EMA states and the data position
(epoch, batches done in it, global step). The data path draws no random numbers and its shuffle is a
function of (seed, epoch, rank, worker), so the loader restarts inside the epoch by skipping the batches
already done without rendering them. The only other randomness, drop path, reads torch's global RNG, which
is reseeded before every step from (seed, rank, step): a resumed run continues with bit-identical losses
without carrying RNG states around, and the DataLoader takes its base seed from a private generator.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from tqdm import tqdm

from pipeline import cache
from pipeline.distributed import World
from pipeline.evaluate import Evaluator
from pipeline.losses import deit_loss, mixed_target
from pipeline.manifest import Manifest, ManifestError, to_dict
from pipeline.shards import load_shardlist
from pipeline.student import Student, create_student
from pipeline.student_data import (check_complete, check_fingerprint, first_difference, open_train_set,
                                   verify_views, warn_if_cycling)
from pipeline.teacher import Teacher, load_teacher, normalize
from pipeline.teacher_cache import cache_attrs, forward

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"

# student fields that may change between a run and its resume (they do not change what is computed)
RESUMABLE_CHANGES = ("device", "compile", "channels_last", "run_dir", "ckpt_every", "eval_every", "verify_sample")

Answers = Callable[[dict], dict | None]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step is NaN or infinite; raised before the optimizer step, naming the step."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where training stands: `step` optimizer updates done, `batch` of them in epoch `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


# --------------------------------------------------------------------------------------------- the teacher's answers


def cached_answers(device: torch.device) -> Answers:
    """The teacher's answers for a batch, as the cache stored them (attached by the loader)."""

    def answers(batch: dict) -> dict:
        return {k: batch[k].to(device, non_blocking=True) for k in ("topk_logits", "topk_ids", "lse")}

    return answers


def online_answers(teacher: Teacher, device: torch.device) -> Answers:
    """The teacher run now on the batch's uint8 views (at its own size when the loader rendered those),
    normalised with its own mean and std: all C logits, sorted, so K = C."""

    def answers(batch: dict) -> dict:
        logits = forward(teacher, batch.get("teacher_views", batch["views"]), device).to(device).clone()
        top_v, top_i = logits.sort(dim=1, descending=True)
        return {"topk_logits": top_v, "topk_ids": top_i, "lse": torch.logsumexp(logits, dim=1)}

    return answers


# --------------------------------------------------------------------------------------------- checkpoints, metrics


class Checkpointer:
    """Atomic checkpoints in run_dir every `ckpt_every` steps and at the end (temporary file, fsync,
    os.replace), written by rank 0; `restore` resumes from one made by the same run spec."""

    def __init__(self, run_dir: Path, every: int, spec: dict, rank: int):
        self.path, self.every, self.spec, self.rank = run_dir / CHECKPOINT, every, spec, rank

    def restore(self, model, optimizer, scheduler, ema) -> Position:
        if not self.path.exists():
            return Position()
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        found = first_difference(state["spec"], self.spec, "spec")
        if found:
            where, was, now = found
            raise ManifestError(f"{self.path} is a checkpoint of another run: {where.removeprefix('spec.')} was "
                                f"{was!r}, the run spec now has {now!r}. Resume with the run spec it was made with, "
                                f"or give this run a new student.run_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        position = Position(**state["position"])
        scheduler.step_update(num_updates=position.step)
        return position

    def save(self, position: Position, model, optimizer, scheduler, ema, last: bool = False) -> None:
        due = last or (self.every > 0 and position.step % self.every == 0)
        if not due or self.rank != 0:
            return
        state = {"spec": self.spec, "position": {"step": position.step, "epoch": position.epoch,
                                                 "batch": position.batch},
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "ema": None if ema is None else ema.state_dict()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class MetricsLog:
    """`run_dir/metrics.jsonl`, one JSON object a line: {"event": "step", step, epoch, loss, base, distill,
    lr, images_per_s} and {"event": "eval", step, epoch, top1_*, agree_*, ...}. On resume the records the
    checkpoint does not cover (later steps, evaluations of unfinished epochs, a torn last line) are dropped."""

    def __init__(self, path: Path, resume: Position, rank: int):
        self.path, self.rank = path, rank
        if rank != 0:
            return
        kept = []
        if path.exists() and resume.step:
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # the line a kill cut short
                if record["step"] <= resume.step and (record["event"] == "step" or record["epoch"] < resume.epoch):
                    kept.append(line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------- setup


def pick_device(name: str, world: World) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ManifestError("student.device=cuda but no CUDA device is visible: set it to auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank)


def expected_cache_attrs(m: Manifest, teacher: Teacher) -> dict:
    """The cache attributes this manifest implies (seed, K, recipe, teacher identity, classes, shards)."""
    return cache_attrs(m, load_shardlist(m.data.train), load_shardlist(m.data.val), teacher.identity)


def resume_spec(m: Manifest, fingerprint: str, world: World, steps_per_epoch: int) -> dict:
    """What must not change between a run and its resume."""
    student = {k: v for k, v in to_dict(m.student).items() if k not in RESUMABLE_CHANGES}
    return {"student": student, "cache": fingerprint, "world_size": world.size, "steps_per_epoch": steps_per_epoch}


def step_seed(seed: int, rank: int, step: int) -> int:
    """The global torch RNG seed of one step (drop path draws from it)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------------------------- the loop


def train(m: Manifest, world: World | None = None, answers: str | Answers = "cache",
          progress: bool = True) -> dict:
    """Train `m.student` from the cache at `m.cache.path`; resumes from run_dir's checkpoint if there is one.

    `answers`: "cache" (the default), "online" (the teacher runs on the replayed views), or a function of the
    batch returning {"topk_logits", "topk_ids", "lse"}. Returns the final evaluation (also in result.json)."""
    s = m.student
    world = world or World(0, 1, None)
    if m.data.labelled_fraction < 1.0:
        raise ManifestError(f"data.labelled_fraction={m.data.labelled_fraction}: train-student does not support "
                            f"partly labelled train sets yet; set data.labelled_fraction=1.0")
    device = pick_device(s.device, world)
    run_dir = Path(s.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    root = cache.open_cache(m.cache.path)
    num_classes = len(root.attrs["classes"])
    teacher = load_teacher(m.teacher, num_classes, device if answers == "online" else "cpu")
    check_fingerprint(root, expected_cache_attrs(m, teacher), m.cache.path)
    check_complete(root, m.cache.path, s.epochs)
    data = open_train_set(m, root, world.size, m.teacher.img_size if answers == "online" else None)
    warn_if_cycling(s.epochs, data.cache_epochs)
    if world.rank == 0:
        verify_views(m, root, data.shardlist, s.verify_sample)
    if answers == "cache":
        answers = cached_answers(device)
    elif answers == "online":
        answers = online_answers(teacher, device)
    del teacher  # only online_answers keeps it
    steps = data.steps_per_epoch

    torch.manual_seed(s.seed)
    student = create_student(s, num_classes)
    model = student.model.to(device)
    on_cuda = device.type == "cuda"
    if on_cuda and s.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=s.ema) if s.ema else None
    global_batch = s.batch_size * world.size
    optimizer = create_optimizer_v2(model, opt=s.optim.name, lr=s.optim.lr * global_batch / s.optim.lr_batch,
                                    weight_decay=s.optim.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.sched.name, num_epochs=s.epochs,
                                       warmup_epochs=s.sched.warmup_epochs, warmup_lr=s.sched.warmup_lr,
                                       min_lr=s.sched.min_lr, step_on_epochs=False, updates_per_epoch=steps)
    checkpointer = Checkpointer(run_dir, s.ckpt_every, resume_spec(m, root.attrs["fingerprint"], world, steps),
                                world.rank)
    position = checkpointer.restore(model, optimizer, scheduler, ema)
    metrics = MetricsLog(run_dir / METRICS, position, world.rank)
    evaluator = Evaluator(m, load_shardlist(m.data.val), student, device, world.rank, world.size)
    forward_model = model
    if world.size > 1 and torch.distributed.is_initialized():
        forward_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    if on_cuda and s.compile:
        forward_model = torch.compile(forward_model)

    def train_step(batch: dict, step: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(step_seed(s.seed, world.rank, step))
        x = student_input(batch["views"], student, device, on_cuda and s.channels_last)
        target = mixed_target(batch["labels"].to(device), batch["partner_labels"].to(device),
                              batch["lam"].to(device), num_classes, s.smoothing)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            cls_logits, dist_logits = forward_model(x)
        parts = deit_loss(cls_logits.float(), dist_logits.float(), target, answers(batch), s.distillation,
                          s.alpha, s.tau)
        if not torch.isfinite(parts["loss"]):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {position.epoch}): {values}. Stopped "
                                     f"before the optimizer step; lower student.optim.lr, set "
                                     f"student.optim.clip_grad, or check the teacher's cached logits")
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if s.optim.clip_grad:
            dispatch_clip_grad(model.parameters(), s.optim.clip_grad)
        optimizer.step()
        scheduler.step_update(num_updates=step)
        if ema is not None:
            ema.update(model, step=step)
        return parts

    total = steps * s.epochs
    bar = tqdm(total=total, initial=position.step, unit="step", desc="train-student",
               disable=not progress or world.rank != 0)
    started = time.perf_counter()
    for epoch in range(position.epoch, s.epochs):
        skip = position.batch if epoch == position.epoch else 0
        position = Position(position.step, epoch, skip)
        tick = time.perf_counter()
        for batch in data.loader(epoch, world.rank, skip):
            lr = optimizer.param_groups[0]["lr"]
            parts = train_step(batch, position.step + 1)
            position = Position(position.step + 1, epoch, position.batch + 1)
            now = time.perf_counter()
            images_per_s = global_batch / max(now - tick, 1e-9)
            tick = now
            record = {"event": "step", "step": position.step, "epoch": epoch,
                      **{k: v.item() for k, v in parts.items()}, "lr": lr, "images_per_s": round(images_per_s, 1)}
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
            bar.update()
            checkpointer.save(position, model, optimizer, scheduler, ema)
        if evaluator.due(epoch):
            final = evaluate_all(evaluator, model, ema)
            metrics.write({"event": "eval", "step": position.step, "epoch": epoch, **final})
    bar.close()
    checkpointer.save(position, model, optimizer, scheduler, ema, last=True)
    result = {**final, "steps": position.step, "epochs": s.epochs, "steps_per_epoch": steps,
              "seconds": round(time.perf_counter() - started, 1), "cache_fingerprint": root.attrs["fingerprint"],
              "config": to_dict(m)}
    if world.rank == 0:
        tmp = run_dir / (RESULT + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, run_dir / RESULT)
    return result


def student_input(views_u8: torch.Tensor, student: Student, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, 3] views -> the student's normalised float input on `device`."""
    x = normalize(views_u8.to(device, non_blocking=True), student.mean, student.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def evaluate_all(evaluator: Evaluator, model, ema) -> dict:
    """The model's evaluation, plus the EMA weights' under "ema" when EMA is on."""
    result = evaluator(model)
    if ema is not None:
        result["ema"] = evaluator(ema.module)
    return result
