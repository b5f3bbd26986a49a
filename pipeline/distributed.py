"""Rank and world size for the stages: `torchrun` (a process group, used only for barriers) or independent
array jobs (`--rank/--world-size`, no communication at all)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class World:
    rank: int
    size: int
    barrier: Callable[[], None] | None  # None for independent jobs
    local_rank: int = 0


@contextmanager
def world(rank: int | None = None, world_size: int | None = None):
    """Under torchrun (RANK/WORLD_SIZE in the environment) join the process group (NCCL on GPUs, gloo on
    CPUs); otherwise use the given rank/world size for an independent job. Destroys the group on exit."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if rank is not None and rank != int(os.environ["RANK"]):
            raise ValueError("--rank conflicts with torchrun's RANK: pass one or the other")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        try:
            yield World(dist.get_rank(), dist.get_world_size(), dist.barrier, local_rank)
        finally:
            dist.destroy_process_group()
        return
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} must lie in [0, --world-size {world_size})")
    yield World(rank, world_size, None)
