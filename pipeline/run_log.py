"""What a training run reports about itself while it runs, all written by rank 0 into its run directory:

- `train.log` (and the console, through Python logging, logger `train.<run name>`): the resolved config's
  place, then a line every `student.log.every` steps (epoch, step, loss parts, lr, images/s, ETA) and one per
  evaluation (val top-1 of each head and the joint, agreement with the teacher). Plain lines, no carriage
  returns, readable in a file and in CI.
- `config.yaml`: the full resolved manifest, written when the run starts.
- `metrics.jsonl`: one JSON object per step ({"event": "step", step, epoch, loss, base, distill, lr,
  images_per_s}) and per evaluation ({"event": "eval", step, epoch, top1_*, agree_*, teacher_top1, samples}).
- `summary.csv`: one row per epoch in timm's layout (`timm.utils.update_summary`: epoch, train_*, eval_*, lr).
- `tensorboard/`: event files with the same scalars, when `student.log.tensorboard` is set.

A step's loss parts stay on the device until the log's next write: the loop never waits for the device
except every `log.every` steps (and before a checkpoint, an evaluation and the end), when they are read back
together. On resume the records the checkpoint does not cover (later steps, evaluations and summary rows of
unfinished epochs, a line a kill cut short) are dropped, so the files read as if the run had never stopped.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import torch
import yaml
from timm.utils import update_summary

from pipeline.checkpoint import Position
from pipeline.manifest import Manifest, ManifestError, to_dict

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.csv"
LOG = "train.log"
TENSORBOARD = "tensorboard"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def console_logging(level: int = logging.INFO) -> None:
    """Log lines of the `train.*` loggers (and warnings) to stderr, one line each, when nothing else does."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.captureWarnings(True)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _keep_lines(path: Path, keep) -> None:
    """Rewrite `path` with the lines `keep(line)` accepts, stopping at the first it refuses."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            if not keep(line):
                break
            kept.append(line + "\n")
    _replace(path, "".join(kept))


def _tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ManifestError("student.log.tensorboard=true needs the tensorboard package: `pip install tensorboard` "
                            "(or the project's [tensorboard] extra), or set it to false") from None
    return SummaryWriter(str(directory))


class RunLog:
    """The reports of one run (rank 0 writes; other ranks keep nothing)."""

    def __init__(self, m: Manifest, name: str, resume: Position, steps_per_epoch: int, global_batch: int,
                 rank: int, finished: bool = False):
        """`finished`: the run is complete and recorded; only log lines are appended (to train.log)."""
        s = m.student
        self.run_dir, self.every, self.rank = Path(s.run_dir), s.log.every, rank
        self.steps_per_epoch, self.total = steps_per_epoch, steps_per_epoch * s.epochs
        self.global_batch = global_batch
        # a logger of its own (not from the registry), so two runs of one name never share a file handler;
        # its lines still reach the console through the `train` logger
        self.logger = logging.Logger(f"train.{name}", logging.INFO)
        self.logger.parent = logging.getLogger("train")
        self.handler = None
        self.pending: list[tuple[Position, dict[str, torch.Tensor], float]] = []
        self.epoch_losses: list[dict[str, float]] = []  # the current epoch's step records (for summary.csv)
        self.tick, self.tick_step, self.started_step = time.perf_counter(), resume.step, resume.step
        self.tb = None
        if rank != 0:
            return
        self.handler = logging.FileHandler(self.run_dir / LOG)
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self.logger.addHandler(self.handler)
        if finished:
            return
        _replace(self.run_dir / CONFIG, yaml.safe_dump(to_dict(m), sort_keys=False))
        self._drop_after(resume)
        if s.log.tensorboard:
            self.tb = _tensorboard(self.run_dir / TENSORBOARD)
            self.tb.add_text("config", "```\n" + yaml.safe_dump(to_dict(m), sort_keys=False) + "\n```", resume.step)
        where = f"resuming after step {resume.step} (epoch {resume.epoch}, batch {resume.batch})" if resume.step \
            else "starting"
        self.logger.info("%s: %d steps (%d epochs x %d, global batch %d), %s; config in %s", s.model, self.total,
                         s.epochs, steps_per_epoch, global_batch, where, self.run_dir / CONFIG)

    def _drop_after(self, resume: Position) -> None:
        def metric(line: str) -> bool:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return False
            keep = record["step"] <= resume.step and (record["event"] == "step" or record["epoch"] < resume.epoch)
            if keep and record["event"] == "step" and record["epoch"] == resume.epoch:
                self.epoch_losses.append(record)
            return keep

        _keep_lines(self.run_dir / METRICS, metric if resume.step else lambda line: False)
        summary = self.run_dir / SUMMARY
        rows = []
        if resume.step and summary.exists():
            with open(summary, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["epoch"]) < resume.epoch]
        if rows:
            with open(summary.with_name(SUMMARY + ".tmp"), "w", newline="") as f:
                writer = csv.DictWriter(f, list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            os.replace(summary.with_name(SUMMARY + ".tmp"), summary)
        else:
            summary.unlink(missing_ok=True)

    # ----------------------------------------------------------------------------------------- per step

    def step(self, position: Position, parts: dict[str, torch.Tensor], lr: float) -> None:
        """Keep a step's loss parts (device tensors, not read yet); write every `log.every` steps."""
        self.pending.append((position, {k: v.detach() for k, v in parts.items()}, lr))
        if position.step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        """Read the kept loss parts back in one transfer, write their records and a log line."""
        if not self.pending:
            return
        names = list(self.pending[0][1])
        values = torch.stack([torch.stack([parts[k].float() for k in names])
                              for _, parts, _ in self.pending]).tolist()
        now = time.perf_counter()
        last = self.pending[-1][0]
        images_per_s = (last.step - self.tick_step) * self.global_batch / max(now - self.tick, 1e-9)
        records = [{"event": "step", "step": position.step, "epoch": position.epoch, **dict(zip(names, row)),
                    "lr": lr, "images_per_s": round(images_per_s, 1)}
                   for (position, _, lr), row in zip(self.pending, values)]
        self.pending = []
        self.tick, self.tick_step = now, last.step
        self.epoch_losses += records
        if self.rank != 0:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        if self.tb is not None:
            for r in records:
                for k in (*names, "lr"):
                    self.tb.add_scalar(f"train/{k}", r[k], r["step"])
        r = records[-1]
        eta = (self.total - last.step) * self.global_batch / max(images_per_s, 1e-9)
        parts = " ".join(f"{k} {r[k]:.4f}" for k in names if k != "loss")
        self.logger.info("epoch %d step %d/%d (%.0f%%) loss %.4f (%s) lr %.3g %.0f img/s ETA %s", last.epoch,
                         last.step, self.total, 100 * last.step / self.total, r["loss"], parts, r["lr"],
                         images_per_s, _duration(eta))

    # ----------------------------------------------------------------------------------------- per epoch

    def eval(self, position: Position, result: dict) -> None:
        self.flush()
        if self.rank == 0:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps({"event": "eval", "step": position.step, "epoch": position.epoch, **result}) + "\n")
            if self.tb is not None:
                for k, v in result.items():
                    if k.startswith(("top1", "agree")) and isinstance(v, float):
                        self.tb.add_scalar(f"eval/{k}", v, position.step)
            ema = result.get("ema")
            self.logger.info("epoch %d step %d: val top-1 joint %.4f class %.4f dist %.4f (teacher %.4f); agreement "
                             "with the teacher joint %.4f class %.4f dist %.4f%s", position.epoch, position.step,
                             result["top1_joint"], result["top1_class"], result["top1_dist"], result["teacher_top1"],
                             result["agree_joint"], result["agree_class"], result["agree_dist"],
                             "" if ema is None else f"; EMA joint {ema['top1_joint']:.4f}")
        self.tick = time.perf_counter()  # the evaluation is not training time

    def end_epoch(self, epoch: int, lr: float, result: dict | None) -> None:
        """One summary.csv row in timm's layout: the epoch's mean loss parts, the evaluation (empty cells when
        the epoch was not evaluated), the lr at its end."""
        self.flush()
        records = [r for r in self.epoch_losses if r["epoch"] == epoch]
        self.epoch_losses = []
        if self.rank != 0 or not records:
            return
        train = {k: sum(r[k] for r in records) / len(records) for k in ("loss", "base", "distill")}
        keys = ("top1_joint", "top1_class", "top1_dist", "agree_joint")
        evals = {k.replace("top1_joint", "top1"): (None if result is None else result[k]) for k in keys}
        update_summary(epoch, train, evals, self.run_dir / SUMMARY, lr=lr)

    def error(self, message: str) -> None:
        self.logger.error("%s", message)

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()
            self.handler = None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
