"""Stage 2's training loop: distilled ViTs trained from the teacher cache, with no teacher online.

`train_shared` trains one or more students on one data pass: the loader yields each batch of views, labels
and cached teacher answers once, and every student takes its step on it, one after another on the same
device. `train` is the pass of one student. Each student is a `Run` with its own learner, checkpoints,
reports (`pipeline.run_log`) and evaluation, so its run directory is exactly what a separate run writes; the
loop reads as verbs and each part decides when it acts. Where the teacher's answers come from is one
swappable function of the batch (`cached_answers` by default, `online_answers` runs the teacher on the same
uint8 views), so the equivalence test and the benchmark run the same loop.

Exact resume. A checkpoint holds the model, optimizer, scheduler and EMA states and the data position
(epoch, batches done in it, global step). The data path draws no random numbers and its shuffle is a
function of (data seed, epoch, rank, worker), so the loader restarts inside the epoch by skipping the batches
already done without rendering them; in a shared pass it restarts at the student furthest behind, and a
student ahead of it waits for the batch it stopped at. The only other randomness, drop path, reads torch's
global RNG, which is reseeded before every step of every student from (its seed, rank, step): a student
resumed, or trained beside others, continues with bit-identical losses without carrying RNG states around,
and the DataLoader takes its base seed from a private generator.

Host syncs. On a GPU the loop does not wait for the device each step: the loss parts stay there until the
run's log reads them back every `student.log.every` steps, and so does a flag recording the first step whose
loss was not finite, read back at those points and before every checkpoint and evaluation. On the CPU (where
waiting costs nothing) the loss is checked every step, before the optimizer step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from tqdm import tqdm

from pipeline import cache, views
from pipeline.cache import cache_attrs, library_versions
from pipeline.checkpoint import BEST, LAST, CheckpointError, Checkpointer, Position, Progress
from pipeline.distributed import World
from pipeline.evaluate import Evaluator
from pipeline.losses import HEADLINE_HEAD, deit_loss, mixed_target, sparse_teacher_answers
from pipeline.manifest import Manifest, ManifestError, StudentCfg, to_dict
from pipeline.run_log import LOG, METRICS, RunLog
from pipeline.shards import data_shardlist
from pipeline.student import Student, create_student
from pipeline.student_data import (CACHED_FIELDS, TrainSet, check_complete, check_fingerprint, open_train_set,
                                   student_views, verify_views, warn_if_cycling)
from pipeline.teacher import Teacher, forward, load_teacher, normalize, teacher_identity

CHECKPOINT = LAST
RESULT = "result.json"
ERROR = "error.txt"

# student fields that may change between a run and its resume (they do not change what is computed)
RESUMABLE_CHANGES = ("device", "compile", "channels_last", "run_dir", "ckpt_every", "eval_every", "verify_sample",
                     "log")

Answers = Callable[[dict], dict | None]

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "METRICS", "RESULT", "NonFiniteLossError", "Position", "train", "train_shared",
           "cached_answers", "online_answers"]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step is NaN or infinite; names the step. Raised before the optimizer step on the CPU, and
    within `student.log.every` steps (before any checkpoint) on a GPU."""


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


class BatchInputs:
    """The normalised student input of the current batch, made once per (mean, std, memory layout) and reused
    by every student of a pass that steps on the same batch (the models never write to their input)."""

    def __init__(self):
        self.batch, self.made = None, {}

    def __call__(self, batch: dict, student: Student, device: torch.device, channels_last: bool) -> torch.Tensor:
        if self.batch is not batch:
            self.batch, self.made = batch, {}
        key = (student.mean, student.std, channels_last)
        if key not in self.made:
            self.made[key] = student_input(batch["views"], student, device, channels_last)
        return self.made[key]


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
    inputs: BatchInputs = field(default_factory=lambda: BatchInputs())  # shared by the students of a pass
    check_every: int = 1  # steps between reads of the finiteness check: 1 = before every optimizer step
    first_non_finite: torch.Tensor | None = None  # on the device: the first non-finite step, 0 = none yet

    def __post_init__(self):
        self.check_every = check_interval(self.device, self.cfg.log.every)
        if self.check_every > 1:
            self.first_non_finite = torch.zeros((), dtype=torch.int64, device=self.device)

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
        """Update number `step` (1-based) on one batch. A non-finite loss raises before the update when the
        loss is checked every step (the CPU), else it is flagged on the device for `check`."""
        s = self.cfg
        torch.manual_seed(step_seed(s.seed, self.rank, step))
        x = self.inputs(batch, self.student, self.device, self.on_cuda and s.channels_last)
        target = mixed_target(batch["labels"].to(self.device), batch["partner_labels"].to(self.device),
                              batch["lam"].to(self.device), self.num_classes, s.smoothing)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_cuda):
            cls_logits, dist_logits = self.forward(x)
        labelled = None if s.labelled_shards is None else (batch["shard"] < s.labelled_shards).to(self.device)
        parts = deit_loss(cls_logits.float(), dist_logits.float(), target, self.answers(batch), s.distillation,
                          s.alpha, s.tau, labelled)
        finite = torch.isfinite(parts["loss"])
        if self.check_every == 1:
            if not finite:
                values = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
                raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}): {values}. Stopped before "
                                         f"the optimizer step; {NON_FINITE_FIX}")
        else:
            first = self.first_non_finite
            self.first_non_finite = torch.where(finite | (first > 0), first, torch.full_like(first, step))
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if s.optim.clip_grad:
            dispatch_clip_grad(self.model.parameters(), s.optim.clip_grad)
        self.optimizer.step()
        self.scheduler.step_update(num_updates=step)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return parts

    def check(self, step: int) -> None:
        """Read the device's non-finite flag back (one sync); raises naming the first non-finite step."""
        if self.first_non_finite is not None and (bad := int(self.first_non_finite)):
            raise NonFiniteLossError(f"non-finite loss at step {bad} (found at step {step}: on a GPU the check is "
                                     f"read back every student.log.every={self.check_every} steps). The updates "
                                     f"from step {bad} on were not checkpointed; {NON_FINITE_FIX}")



def check_interval(device: torch.device, every: int) -> int:
    """Steps between reads of the finiteness check: every step on the CPU, where reading costs nothing;
    every `student.log.every` steps on an accelerator, which would otherwise wait for the host each step."""
    return 1 if device.type == "cpu" else every


NON_FINITE_FIX = ("lower student.optim.lr, set student.optim.clip_grad, or check the teacher's cached logits; the "
                  "run resumes from its last checkpoint")


def student_input(views_u8: torch.Tensor, student: Student, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, 3] views -> the student's normalised float input on `device`."""
    x = normalize(views_u8.to(device, non_blocking=True), student.mean, student.std, channels_last)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def step_seed(seed: int, rank: int, step: int) -> int:
    """The global torch RNG seed of one step (drop path draws from it)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def build_learner(s: StudentCfg, steps_per_epoch: int, num_classes: int, answers: Answers, device: torch.device,
                  world: World, inputs: BatchInputs | None = None) -> Learner:
    """The student, timm's AdamW (lr = optim.lr x global batch / optim.lr_batch) and its warmup + cosine
    schedule stepped per update, and the EMA when student.ema is set."""
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
    return Learner(s, student, model, optimizer, scheduler, ema, answers, num_classes, device, world.rank,
                   inputs=inputs or BatchInputs())


# --------------------------------------------------------------------------------------------- setup


def pick_device(name: str, world: World) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ManifestError("student.device=cuda but no CUDA device is visible: set it to auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", world.local_rank)


def open_checked_cache(m: Manifest, world: World, device: torch.device, answers: str | Answers,
                       verify_sample: float | None = None):
    """Open the cache and stop before training unless it is complete and was built from this manifest (the
    fingerprint), every chunk the run will read decodes (a local cache), and the sampled views still render as
    the teacher saw them. Returns (root, train set, the answers function)."""
    root = cache.open_cache(m.cache.path)
    num_classes = len(root.attrs["classes"])
    online = isinstance(answers, str) and answers in ("online", "online-topk")
    teacher = load_teacher(m.teacher, num_classes, device) if online else None
    identity = teacher.identity if online else teacher_identity(m.teacher, num_classes)
    expected = cache_attrs(m, data_shardlist(m, "train"), data_shardlist(m, "val"), identity)
    check_fingerprint(root, expected, m.cache.path)
    check_complete(root, m.cache.path, m.student.epochs, m.views.repeats)
    data = open_train_set(m, root, world.size, m.teacher.img_size if online else None)
    warn_if_cycling(m.student.epochs, data.cache_epochs, m.views.repeats)
    if world.rank == 0:
        if cache.local_dir(m.cache.path) is not None:
            check_chunks(root, data)
        verify_views(m, root, data.shardlist, m.student.verify_sample if verify_sample is None else verify_sample)
    if online:  # "online-topk": truncated to the cache's K and stored as stage 1 stores it
        answers = online_answers(teacher, device, root.attrs["top_k"] if answers == "online-topk" else None)
    elif isinstance(answers, str):
        if answers != "cache":
            raise ValueError(f"answers={answers!r}: pass 'cache', 'online', 'online-topk' or a function of the batch")
        answers = cached_answers(device)
    return root, data, answers


def check_chunks(root, data: TrainSet) -> int:
    """Decode every chunk the run will read (the train units of the cache epochs it replays, the val units)
    so that a corrupt chunk stops the run before its first step, named, instead of when training reaches it.
    The chunks are a few bytes per view and checksummed (crc32c), so this costs seconds where an epoch of
    rendering costs minutes. Returns the number of units checked."""
    units = 0
    for split, epochs in (("train", range(min(data.m.student.epochs, data.cache_epochs))), ("val", [None])):
        layout = cache.layout_of(root, split)
        reader = cache.SlabReader(root, split)
        for epoch in epochs:
            for group in range(layout.groups):
                reader.read(epoch, layout.group_shards(group).start, CACHED_FIELDS + ("labels",))
                units += 1
    return units


def resume_spec(s: StudentCfg, fingerprint: str, world: World, steps_per_epoch: int) -> dict:
    """What must not change between a run and its resume."""
    student = {k: v for k, v in to_dict(s).items() if k not in RESUMABLE_CHANGES}
    return {"student": student, "cache": fingerprint, "world_size": world.size, "steps_per_epoch": steps_per_epoch}


def write_result(path: Path, result: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- one student


@dataclass
class Run:
    """One student of a pass: its learner and the parts that write its run directory."""

    m: Manifest
    learner: Learner
    checkpointer: Checkpointer
    log: RunLog
    evaluator: Evaluator
    progress: Progress
    result: dict | None = None  # the last evaluation (or the recorded result of a finished run)
    error: Exception | None = None
    finished: bool = False  # result.json was there already: nothing to do
    started: float = field(default_factory=time.perf_counter)

    @property
    def position(self) -> Position:
        return self.progress.position

    @property
    def run_dir(self) -> Path:
        return Path(self.m.student.run_dir)

    @property
    def active(self) -> bool:
        return self.error is None and not self.finished

    def seconds(self) -> float:
        return self.progress.seconds + time.perf_counter() - self.started

    def take(self, batch: dict, epoch: int, index: int) -> None:
        """Step on batch `index` of `epoch` if it is the one this student is waiting for."""
        if self.position.epoch != epoch or self.position.batch != index:
            return
        lr = self.learner.lr
        parts = self.learner.step(batch, self.position.step + 1, epoch)
        self.progress.position = position = Position(self.position.step + 1, epoch, self.position.batch + 1)
        if position.step % self.log.every == 0:
            self.learner.check(position.step)
        self.log.step(position, parts, lr)
        if self.checkpointer.due(position):
            self.save()

    def save(self) -> None:
        """last.pth, after the finiteness check and with every metric up to it written."""
        self.learner.check(self.position.step)
        self.log.flush()
        self.progress.seconds, self.started = self.seconds(), time.perf_counter()
        self.checkpointer.save(self.learner, self.progress)

    def due(self, epoch: int) -> bool:
        """Whether this student ends `epoch` now with an evaluation (after its finiteness check)."""
        if self.position.epoch != epoch:
            return False
        self.learner.check(self.position.step)
        self.log.flush()
        return self.evaluator.due(epoch)

    def models(self) -> list[tuple[torch.nn.Module, Student]]:
        """What its evaluation evaluates: the model, and the EMA weights when EMA is on."""
        entries = [(self.learner.model, self.learner.student)]
        return entries + ([(self.learner.ema.module, self.learner.student)] if self.learner.ema is not None else [])

    def end_epoch(self, epoch: int, evaluated: list[dict] | None) -> None:
        """Record the epoch's evaluation (`models()`'s results, None when not due; best.pth when it is the best
        so far) and write the epoch's summary row."""
        if self.position.epoch != epoch:
            return
        result = None
        if evaluated is not None:
            result = self.result = evaluated[0] | ({"ema": evaluated[1]} if len(evaluated) > 1 else {})
            self.log.eval(self.position, result)
            if self.progress.best is None or result["top1_joint"] > self.progress.best:
                self.progress.best = result["top1_joint"]
                self.progress.seconds, self.started = self.seconds(), time.perf_counter()
                self.checkpointer.save(self.learner, self.progress, BEST)
        self.log.end_epoch(epoch, self.learner.lr, result)

    def finish(self, cache_fingerprint: str, pass_runs: int, teacher_size: int) -> dict:
        """The last checkpoint, the safetensors export and result.json."""
        self.save()
        self.checkpointer.export(self.learner)
        s = self.m.student
        head = HEADLINE_HEAD[s.distillation]  # the head DeiT reports: the class head for deit_none, else the average
        self.result = {**self.result, "steps": self.position.step, "epochs": s.epochs,
                       "steps_per_epoch": self.log.steps_per_epoch, "seconds": round(self.progress.seconds, 1),
                       "best_top1_joint": self.progress.best, "pass_runs": pass_runs,
                       "cache_fingerprint": cache_fingerprint, "versions": library_versions(),
                       "config": to_dict(self.m), "student_views": student_views(self.m, teacher_size),
                       "headline_head": head, "headline_top1": self.result[f"top1_{head}"]}
        if self.learner.rank == 0:
            write_result(self.run_dir / RESULT, self.result)
        self.log.logger.info("%s: done in %.1f s, val top-1 joint %.4f (best %.4f)", self.run_dir,
                             self.progress.seconds, self.result["top1_joint"], self.progress.best)
        return self.result

    def fail(self, error: Exception) -> None:
        """Stop this student (the others of its pass go on): the error goes to its train.log and error.txt."""
        self.error = error
        self.log.error(f"{self.run_dir} stopped: {type(error).__name__}: {error}")
        if self.learner.rank == 0:
            (self.run_dir / ERROR).write_text(f"{type(error).__name__}: {error}\n")


def _record_failure(run_dir: Path, error: Exception) -> None:
    """A student that could not even start: its error in its train.log and error.txt."""
    message = f"{type(error).__name__}: {error}"
    logging.getLogger(f"train.{run_dir.name}").error("%s stopped: %s", run_dir, message)
    with open(run_dir / LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR {run_dir} stopped: {message}\n")
    (run_dir / ERROR).write_text(message + "\n")


def _prepare(m: Manifest, data: TrainSet, root, answers: Answers, device: torch.device, world: World,
             inputs: BatchInputs) -> Run:
    s = m.student
    run_dir = Path(s.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR).unlink(missing_ok=True)
    steps = data.steps_per_epoch
    learner = build_learner(s, steps, data.num_classes, answers, device, world, inputs)
    if world.rank == 0 and (noise := views.erasing_noise_warning(m.views, learner.student.mean, learner.student.std,
                                                                  f"student {s.model}")):
        warnings.warn(noise, stacklevel=2)
    spec = resume_spec(s, root.attrs["fingerprint"], world, steps)
    checkpointer = Checkpointer(run_dir, s.ckpt_every, spec, world.rank, s.model)
    progress = checkpointer.restore(learner)
    done = progress.position.step == steps * s.epochs and (run_dir / RESULT).is_file()
    learner.wrap(world)
    log = RunLog(m, run_dir.name, progress.position, steps, s.batch_size * world.size, world.rank, done)
    evaluator = Evaluator(m, data_shardlist(m, "val"), learner.student, device, world.rank, world.size)
    run = Run(m, learner, checkpointer, log, evaluator, progress)
    if done:  # a finished run: keep what it recorded (its training time above all)
        run.finished, run.result = True, json.loads((run_dir / RESULT).read_text())
        log.logger.info("%s: finished already (%s); nothing to do", run_dir, run_dir / RESULT)
    return run


def pass_key(m: Manifest, world_size: int = 1) -> str:
    """Everything that decides a student's batches (and where they are computed): students with equal keys
    see the same batches in the same order and can share one data pass."""
    s = m.student
    return json.dumps({"cache": m.cache.path, "data": to_dict(m.data), "views": to_dict(m.views),
                       "img_size": s.img_size, "batch_size": s.batch_size, "epochs": s.epochs,
                       "data_seed": s.shuffle_seed(), "workers": s.workers, "shuffle_buffer": s.shuffle_buffer,
                       "device": s.device, "world_size": world_size}, sort_keys=True)


# --------------------------------------------------------------------------------------------- the pass


def train_shared(manifests: list[Manifest], world: World | None = None, answers: str | Answers = "cache",
                 progress: bool = True) -> list[dict | Exception]:
    """Train the students of `manifests` on one data pass (their `pass_key`s must be equal): each batch is
    read, decoded and rendered once and every student steps on it in turn. Each resumes from its own run
    directory's last.pth; a finished one (result.json and a final checkpoint) is left as it is.

    Returns, per manifest, its result (also in its result.json) or the exception that stopped it: a student
    that fails (a non-finite loss, a bad model) stops with the error in its train.log and error.txt while the
    others go on. Errors of the shared parts (the cache, the data) stop the pass."""
    if not manifests:
        return []
    world = world or World(0, 1, None)
    keys = {pass_key(m, world.size) for m in manifests}
    if len(keys) > 1:
        raise ValueError("these students cannot share a data pass: their batches differ (cache, views, img_size, "
                         "batch_size, epochs, data seed, workers, shuffle_buffer or device); group them with "
                         "pipeline.sweep.group_runs")
    dirs = [str(Path(m.student.run_dir).resolve()) for m in manifests]
    if len(set(dirs)) < len(dirs):
        raise ValueError(f"two students of one pass share a run directory: {sorted(d for d in dirs if dirs.count(d) > 1)[0]}")
    first = manifests[0]
    device = pick_device(first.student.device, world)
    root, data, answers = open_checked_cache(first, world, device, answers,
                                             max(m.student.verify_sample for m in manifests))
    answers = _once_per_batch(answers) if len(manifests) > 1 else answers
    runs: list[Run | Exception] = []
    inputs = BatchInputs()
    for m in manifests:
        try:
            runs.append(_prepare(m, data, root, answers, device, world, inputs))
        except ManifestError as e:  # CheckpointError too
            if world.rank == 0:
                _record_failure(Path(m.student.run_dir), e)
            if len(manifests) == 1:
                raise
            runs.append(e)
    live = [r for r in runs if isinstance(r, Run)]
    loader = data.open_loader(world.rank)  # its workers start with the first epoch and stay for the pass
    try:
        _run_pass(live, data, loader, world, progress)
        loader.close()
        fingerprint = root.attrs["fingerprint"]
        for r in live:
            if r.active:
                _guard(r, lambda: r.finish(fingerprint, len(manifests), root.attrs["teacher_size"]), len(live))
    finally:
        loader.close()  # on an error too: the workers stop with the pass
        for r in live:
            r.log.close()
    if len(manifests) == 1 and live and live[0].error is not None:
        raise live[0].error
    return [r if isinstance(r, Exception) else (r.error or r.result) for r in runs]


def _run_pass(runs: list[Run], data: TrainSet, loader, world: World, progress: bool) -> None:
    steps, epochs = data.steps_per_epoch, data.m.student.epochs
    todo = [r for r in runs if r.active]
    if not todo:
        return
    bar = tqdm(total=steps * epochs * len(todo), initial=sum(r.position.step for r in todo), unit="step",
               desc="train-student" if len(todo) == 1 else f"train {len(todo)} students",
               disable=not progress or world.rank != 0 or not sys.stderr.isatty())
    start = min(r.position.epoch for r in todo)
    for epoch in range(start, epochs):
        todo = [r for r in todo if r.active]
        if not todo:
            break
        for r in todo:
            if r.position.epoch < epoch:
                r.progress.position = Position(r.position.step, epoch, 0)
        skip = min(r.position.batch for r in todo if r.position.epoch == epoch)
        for index, batch in enumerate(loader.epoch(epoch, skip), start=skip):
            for r in todo:
                if r.active:
                    before = r.position.step
                    _guard(r, lambda: r.take(batch, epoch, index), len(runs))
                    bar.update(r.position.step - before)
        due = [r for r in todo if r.active and _guard(r, lambda: r.due(epoch), len(runs))]
        evaluated = evaluate_together([r for r in due if r.active])
        for r in todo:
            if r.active:
                _guard(r, lambda: r.end_epoch(epoch, evaluated.get(id(r))), len(runs))
    bar.close()


def evaluate_together(runs: list[Run]) -> dict[int, list[dict]]:
    """The due evaluations of a pass, students whose eval views are equal (crop_pct) on one pass over the val
    views. Returns {id(run): its models' results}."""
    groups: dict[float, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.learner.student.crop_pct, []).append(r)
    out = {}
    for group in groups.values():
        entries = [entry for r in group for entry in r.models()]
        results = group[0].evaluator.many(entries)
        for r in group:
            out[id(r)], results = results[:len(r.models())], results[len(r.models()):]
    return out


def _guard(run: Run, action: Callable[[], object], students: int) -> object:
    """Run one student's action; in a pass of several, its failure stops it alone (and gives None)."""
    try:
        return action()
    except (NonFiniteLossError, ManifestError, CheckpointError, RuntimeError) as e:
        run.fail(e)
        if students == 1:
            raise


def _once_per_batch(answers: Answers) -> Answers:
    """The teacher's answers computed once per batch when several students step on it."""
    last: list = [None, None]

    def once(batch: dict):
        if last[0] is not batch:
            last[0], last[1] = batch, answers(batch)
        return last[1]

    return once


def train(m: Manifest, world: World | None = None, answers: str | Answers = "cache",
          progress: bool = True) -> dict:
    """Train `m.student` from the cache at `m.cache.path`; resumes from run_dir's last.pth if there is one.

    `answers`: "cache" (the default), "online" (the teacher runs on the replayed views), or a function of the
    batch returning {"topk_logprobs", "topk_ids", "log_leftover"}. Returns the final evaluation (also in result.json)."""
    return train_shared([m], world, answers, progress)[0]
