"""A training run's checkpoints, in timm's layout so `timm.models.load_checkpoint` reads them.

`last.pth` is written every `student.ckpt_every` steps and at the end; `best.pth` after an evaluation that
beats the best joint val top-1 so far; the final weights also go to `model.safetensors` (and the EMA's to
`model_ema.safetensors`). A `.pth` holds timm's keys (`arch`, `epoch`, `state_dict`, `state_dict_ema`,
`optimizer`, `metric`) plus what exact resume needs: the scheduler, the data position, the training seconds so
far and the run spec it was made with. `model` names the same tensors as `state_dict` (stored once), for
readers of the older layout.

Every file is written atomically (temporary file, fsync, os.replace) by rank 0, and read with
`torch.load(weights_only=True)`: a checkpoint holds tensors and plain data only, so a pickle planted in a run
directory is refused, never executed.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.manifest import ManifestError

LAST = "last.pth"
BEST = "best.pth"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"


class CheckpointError(ManifestError):
    """A checkpoint in the run directory cannot be used with this run spec; the message names the file and the
    fix."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where training stands: `step` optimizer updates done, `batch` of them in epoch `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass(slots=True)
class Progress:
    """What a run carries across restarts besides its weights: the data position, the best joint val top-1 so
    far (None before the first evaluation) and the seconds spent training in earlier sessions."""

    position: Position = Position()
    best: float | None = None
    seconds: float = 0.0


def load_state(path: Path) -> dict:
    """A checkpoint's contents, tensors and plain data only (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds more than tensors and plain data, so it was not loaded (loading it "
                              f"could run code planted in it): {str(e).splitlines()[0]}. Delete it to start the run "
                              f"over, or give the run a new student.run_dir") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}): delete it to start the run over") from None


def _write_atomic(path: Path, save) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        save(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Writes and restores one run's checkpoints (rank 0 writes; every rank restores)."""

    def __init__(self, run_dir: Path, every: int, spec: dict, rank: int, arch: str):
        self.run_dir, self.every, self.spec, self.rank, self.arch = run_dir, every, spec, rank, arch
        self.path = run_dir / LAST

    def restore(self, learner) -> Progress:
        """Load last.pth into the learner (model, optimizer, scheduler, EMA) when there is one; refuses a
        checkpoint made with another run spec, naming the first field that differs."""
        from pipeline.cache import first_difference

        if not self.path.exists():
            return Progress()
        state = load_state(self.path)
        found = first_difference(state.get("spec"), self.spec, "spec")
        if found:
            where, was, now = found
            raise CheckpointError(f"{self.path} is a checkpoint of another run: {where.removeprefix('spec.')} was "
                                  f"{was!r}, the run spec now has {now!r}. Resume with the run spec it was made "
                                  f"with, or give this run a new student.run_dir")
        learner.model.load_state_dict(state["state_dict"])
        learner.optimizer.load_state_dict(state["optimizer"])
        learner.scheduler.load_state_dict(state["scheduler"])
        if learner.ema is not None:
            learner.ema.module.load_state_dict(state["state_dict_ema"])
        position = Position(**state["position"])
        learner.scheduler.step_update(num_updates=position.step)
        return Progress(position, state["metric"], state["seconds"])

    def due(self, position: Position) -> bool:
        return self.every > 0 and position.step % self.every == 0

    def _state(self, learner, progress: Progress) -> dict:
        model = learner.model.state_dict()
        return {"arch": self.arch, "epoch": progress.position.epoch, "state_dict": model, "model": model,
                "state_dict_ema": None if learner.ema is None else learner.ema.module.state_dict(),
                "optimizer": learner.optimizer.state_dict(), "scheduler": learner.scheduler.state_dict(),
                "metric": progress.best, "position": dataclasses.asdict(progress.position),
                "seconds": progress.seconds, "spec": self.spec, "version": 2}

    def save(self, learner, progress: Progress, name: str = LAST) -> None:
        if self.rank == 0:
            state = self._state(learner, progress)
            _write_atomic(self.run_dir / name, lambda f: torch.save(state, f))

    def export(self, learner) -> list[Path]:
        """The final weights as safetensors (the model's, and the EMA's when there is one)."""
        from safetensors.torch import save

        if self.rank != 0:
            return []
        out = [(self.run_dir / WEIGHTS, learner.model)]
        if learner.ema is not None:
            out.append((self.run_dir / EMA_WEIGHTS, learner.ema.module))
        for path, module in out:
            tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            data = save(tensors, metadata={"arch": self.arch})
            _write_atomic(path, lambda f: f.write(data))
        return [path for path, _ in out]
