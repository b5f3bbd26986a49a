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

import dataclasses
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
from pipeline.losses import deit_loss, mixed_target, sparse_teacher_answers
from pipeline.manifest import Manifest, ManifestError, StudentCfg, to_dict
from pipeline.shards import load_shardlist
from pipeline.student import Student, create_student
from pipeline.student_data import (check_complete, check_fingerprint, first_difference, open_train_set,
                                   verify_views, warn_if_cycling)
from pipeline.teacher import Teacher, load_teacher, normalize, teacher_identity
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


ANSWER_FIELDS = ("topk_logprobs", "topk_ids", "log_leftover", "tail_ids", "tail_logprobs")  # the last two optional


def cached_answers(device: torch.device) -> Answers:
    """The teacher's answers for a batch, as the cache stored them (attached by the loader)."""

    def answers(batch: dict) -> dict:
        return {k: batch[k].to(device, non_blocking=True) for k in ANSWER_FIELDS if k in batch}

    return answers


def online_answers(teacher: Teacher, device: torch.device, top_k: int | None = None) -> Answers:
    """The teacher run now on the batch's uint8 views (at its own size when the loader rendered those),
    normalised with its own mean and std: all C log-probabilities, sorted (K = C); or, with `top_k`, truncated
    and stored exactly as stage 1 stores them (`losses.sparse_teacher_answers`)."""

    def answers(batch: dict) -> dict:
        logits = forward(teacher, batch.get("teacher_views", batch["views"]), device).to(device).clone()
        if top_k is not None:
            return sparse_teacher_answers(logits, top_k)
        top_v, top_i = logits.sort(dim=1, descending=True)
        none = torch.full(top_v.shape[:1], float("-inf"), device=top_v.device)
        return {"topk_logprobs": top_v - torch.logsumexp(logits, dim=1, keepdim=True), "topk_ids": top_i,
                "log_leftover": none}

    return answers


# --------------------------------------------------------------------------------------------- the learner


@dataclass
class Learner:
    """The student under training: its model, optimizer, scheduler and EMA, and one update (`step`)."""

    cfg: StudentCfg
    student: Student
    model: torch.nn.Module  # the plain module: checkpoints and evaluation use it
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler, stepped per update
    ema: ModelEmaV3 | None
    answers: Answers
    num_classes: int
    device: torch.device
    rank: int = 0
    forward: torch.nn.Module | None = None  # what the step calls: the model, wrapped in DDP / compiled

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def wrap(self, world: World) -> None:
        """DDP under torchrun (after a restore, so every rank starts from rank 0's weights), compile on CUDA."""
        self.forward = self.model
        if world.size > 1 and torch.distributed.is_initialized():
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.on_cuda else None)
        if self.on_cuda and self.cfg.compile:
            self.forward = torch.compile(self.forward)

    def step(self, batch: dict, step: int, epoch: int) -> dict[str, torch.Tensor]:
        """Update number `step` (1-based) on one batch; raises before the update if the loss is not finite."""
        s = self.cfg
        torch.manual_seed(step_seed(s.seed, self.rank, step))
        x = student_input(batch["views"], self.student, self.device, self.on_cuda and s.channels_last)
        target = mixed_target(batch["labels"].to(self.device), batch["partner_labels"].to(self.device),
                              batch["lam"].to(self.device), self.num_classes, s.smoothing)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_cuda):
            cls_logits, dist_logits = self.forward(x)
        labelled = None if s.labelled_shards is None else (batch["shard"] < s.labelled_shards).to(self.device)
        parts = deit_loss(cls_logits.float(), dist_logits.float(), target, self.answers(batch), s.distillation,
                          s.alpha, s.tau, labelled)
        if not torch.isfinite(parts["loss"]):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}): {values}. Stopped before the "
                                     f"optimizer step; lower student.optim.lr, set student.optim.clip_grad, or "
                                     f"check the teacher's cached logits")
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if s.optim.clip_grad:
            dispatch_clip_grad(self.model.parameters(), s.optim.clip_grad)
        self.optimizer.step()
        self.scheduler.step_update(num_updates=step)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return parts

    def evaluate(self, evaluator: Evaluator) -> dict:
        """The model's evaluation, plus the EMA weights' under "ema" when EMA is on."""
        result = evaluator(self.model)
        if self.ema is not None:
            result["ema"] = evaluator(self.ema.module)
        return result


def student_input(views_u8: torch.Tensor, student: Student, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, 3] views -> the student's normalised float input on `device`."""
    x = normalize(views_u8.to(device, non_blocking=True), student.mean, student.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def step_seed(seed: int, rank: int, step: int) -> int:
    """The global torch RNG seed of one step (drop path draws from it)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def build_learner(m: Manifest, steps_per_epoch: int, num_classes: int, answers: Answers, device: torch.device,
                  world: World) -> Learner:
    """The student, timm's AdamW (lr = optim.lr x global batch / optim.lr_batch) and its warmup + cosine
    schedule stepped per update, and the EMA when student.ema is set."""
    s = m.student
    torch.manual_seed(s.seed)
    student = create_student(s, num_classes)
    model = student.model.to(device)
    if device.type == "cuda" and s.channels_last:
        model.to(memory_format=torch.channels_last)
    lr = s.optim.lr * s.batch_size * world.size / s.optim.lr_batch
    optimizer = create_optimizer_v2(model, opt=s.optim.name, lr=lr, weight_decay=s.optim.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.sched.name, num_epochs=s.epochs,
                                       warmup_epochs=s.sched.warmup_epochs, warmup_lr=s.sched.warmup_lr,
                                       min_lr=s.sched.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=s.ema) if s.ema else None
    return Learner(s, student, model, optimizer, scheduler, ema, answers, num_classes, device, world.rank)


# --------------------------------------------------------------------------------------------- checkpoints, metrics


class Checkpointer:
    """Atomic checkpoints in run_dir every `ckpt_every` steps and at the end (temporary file, fsync,
    os.replace), written by rank 0; `restore` resumes from one made by the same run spec."""

    def __init__(self, run_dir: Path, every: int, spec: dict, rank: int):
        self.path, self.every, self.spec, self.rank = run_dir / CHECKPOINT, every, spec, rank

    def restore(self, learner: Learner) -> Position:
        if not self.path.exists():
            return Position()
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        found = first_difference(state["spec"], self.spec, "spec")
        if found:
            where, was, now = found
            raise ManifestError(f"{self.path} is a checkpoint of another run: {where.removeprefix('spec.')} was "
                                f"{was!r}, the run spec now has {now!r}. Resume with the run spec it was made with, "
                                f"or give this run a new student.run_dir")
        learner.model.load_state_dict(state["model"])
        learner.optimizer.load_state_dict(state["optimizer"])
        learner.scheduler.load_state_dict(state["scheduler"])
        if learner.ema is not None:
            learner.ema.load_state_dict(state["ema"])
        position = Position(**state["position"])
        learner.scheduler.step_update(num_updates=position.step)
        return position

    def save(self, position: Position, learner: Learner, last: bool = False) -> None:
        due = last or (self.every > 0 and position.step % self.every == 0)
        if not due or self.rank != 0:
            return
        state = {"spec": self.spec, "position": dataclasses.asdict(position),
                 "model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
                 "scheduler": learner.scheduler.state_dict(),
                 "ema": None if learner.ema is None else learner.ema.state_dict()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class MetricsLog:
    """`run_dir/metrics.jsonl`, one JSON object a line: {"event": "step", step, epoch, loss, base, distill,
    lr, images_per_s} and {"event": "eval", step, epoch, top1_*, agree_*, teacher_top1, samples}, plus the
    progress bar (loss, lr, images/s). On resume the records the checkpoint does not cover (later steps,
    evaluations of unfinished epochs, a line a kill cut short) are dropped. Only rank 0 writes."""

    def __init__(self, path: Path, resume: Position, total_steps: int, global_batch: int, rank: int,
                 progress: bool):
        self.path, self.global_batch, self.rank = path, global_batch, rank
        self.bar = tqdm(total=total_steps, initial=resume.step, unit="step", desc="train-student",
                        disable=not progress or rank != 0)
        self.tick = time.perf_counter()
        if rank == 0:
            self._keep_until(resume)

    def _keep_until(self, resume: Position) -> None:
        kept = []
        if self.path.exists() and resume.step:
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if record["step"] <= resume.step and (record["event"] == "step" or record["epoch"] < resume.epoch):
                    kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def step(self, position: Position, parts: dict[str, torch.Tensor], lr: float) -> None:
        now = time.perf_counter()
        images_per_s = self.global_batch / max(now - self.tick, 1e-9)
        self.tick = now
        record = {"event": "step", "step": position.step, "epoch": position.epoch,
                  **{k: v.item() for k, v in parts.items()}, "lr": lr, "images_per_s": round(images_per_s, 1)}
        self._write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
        self.bar.update()

    def eval(self, position: Position, result: dict) -> None:
        self._write({"event": "eval", "step": position.step, "epoch": position.epoch, **result})
        self.tick = time.perf_counter()  # the evaluation is not training time

    def _write(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------- setup


def pick_device(name: str, world: World) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ManifestError("student.device=cuda but no CUDA device is visible: set it to auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank)


def open_checked_cache(m: Manifest, world: World, device: torch.device, answers: str | Answers):
    """Open the cache and stop before training unless it is complete and was built from this manifest (the
    fingerprint), and the sampled views still render as the teacher saw them. Returns (root, train set,
    the answers function)."""
    root = cache.open_cache(m.cache.path)
    num_classes = len(root.attrs["classes"])
    online = isinstance(answers, str) and answers in ("online", "online-topk")
    teacher = load_teacher(m.teacher, num_classes, device) if online else None
    identity = teacher.identity if online else teacher_identity(m.teacher, num_classes)
    expected = cache_attrs(m, load_shardlist(m.data.train), load_shardlist(m.data.val), identity)
    check_fingerprint(root, expected, m.cache.path)
    check_complete(root, m.cache.path, m.student.epochs)
    data = open_train_set(m, root, world.size, m.teacher.img_size if online else None)
    warn_if_cycling(m.student.epochs, data.cache_epochs)
    if world.rank == 0:
        verify_views(m, root, data.shardlist, m.student.verify_sample)
    if online:  # "online-topk": truncated to the cache's K and stored as stage 1 stores it
        answers = online_answers(teacher, device, root.attrs["top_k"] if answers == "online-topk" else None)
    elif isinstance(answers, str):
        if answers != "cache":
            raise ValueError(f"answers={answers!r}: pass 'cache', 'online', 'online-topk' or a function of the batch")
        answers = cached_answers(device)
    return root, data, answers


def resume_spec(m: Manifest, fingerprint: str, world: World, steps_per_epoch: int) -> dict:
    """What must not change between a run and its resume."""
    student = {k: v for k, v in to_dict(m.student).items() if k not in RESUMABLE_CHANGES}
    return {"student": student, "cache": fingerprint, "world_size": world.size, "steps_per_epoch": steps_per_epoch}


def write_result(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- the loop


def train(m: Manifest, world: World | None = None, answers: str | Answers = "cache",
          progress: bool = True) -> dict:
    """Train `m.student` from the cache at `m.cache.path`; resumes from run_dir's checkpoint if there is one.

    `answers`: "cache" (the default), "online" (the teacher runs on the replayed views), or a function of the
    batch returning {"topk_logprobs", "topk_ids", "log_leftover"}. Returns the final evaluation (also in result.json)."""
    s, world = m.student, world or World(0, 1, None)
    device = pick_device(s.device, world)
    run_dir = Path(s.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root, data, answers = open_checked_cache(m, world, device, answers)
    steps = data.steps_per_epoch
    learner = build_learner(m, steps, data.num_classes, answers, device, world)
    checkpointer = Checkpointer(run_dir, s.ckpt_every, resume_spec(m, root.attrs["fingerprint"], world, steps),
                                world.rank)
    position = checkpointer.restore(learner)
    learner.wrap(world)
    metrics = MetricsLog(run_dir / METRICS, position, steps * s.epochs, s.batch_size * world.size, world.rank,
                         progress)
    evaluator = Evaluator(m, load_shardlist(m.data.val), learner.student, device, world.rank, world.size)
    started = time.perf_counter()

    for epoch in range(position.epoch, s.epochs):
        skip = position.batch if epoch == position.epoch else 0
        position = Position(position.step, epoch, skip)
        for batch in data.loader(epoch, world.rank, skip):
            lr = learner.lr
            parts = learner.step(batch, position.step + 1, epoch)
            position = Position(position.step + 1, epoch, position.batch + 1)
            metrics.step(position, parts, lr)
            checkpointer.save(position, learner)
        if evaluator.due(epoch):
            final = learner.evaluate(evaluator)
            metrics.eval(position, final)
    checkpointer.save(position, learner, last=True)
    metrics.close()

    result = {**final, "steps": position.step, "epochs": s.epochs, "steps_per_epoch": steps,
              "seconds": round(time.perf_counter() - started, 1), "cache_fingerprint": root.attrs["fingerprint"],
              "config": to_dict(m)}
    if world.rank == 0:
        write_result(run_dir / RESULT, result)
    return result
