"""How the benchmarks time things: alternatives interleaved (A B A B ...) so that a shared, noisy machine
slows them alike; medians over the repetitions; phase timers that wrap a module's functions for the
duration of a run; and `torch.utils.benchmark` for the model steps on pre-made batches (it synchronises
CUDA itself)."""

from __future__ import annotations

import functools
import inspect
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils import benchmark


def interleave(alternatives: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Each alternative once per repetition, in turn (A B A B ...); every alternative's values."""
    values: dict[str, list[float]] = {name: [] for name in alternatives}
    for _ in range(reps):
        for name, measure in alternatives.items():
            values[name].append(measure())
    return values


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def seconds_per_call(fn: Callable[[], object], calls: int, warmup: int = 1) -> float:
    """Mean seconds of one call of `fn` over `calls` calls after `warmup` untimed ones
    (`torch.utils.benchmark.Timer`, which synchronises CUDA around the timed block)."""
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(calls).mean


class PhaseTimer:
    """Wall time per phase, from wrappers put around module functions for the duration of `timing()`.
    Wrapped generators are charged only for the time spent producing each item."""

    def __init__(self, plan: dict[str, list[tuple[object, str]]]):
        self.plan = plan  # phase -> [(module, function name)]
        self.seconds: dict[str, float] = defaultdict(float)

    def _call(self, fn, phase):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
        return timed

    def _iterate(self, fn, phase):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            items = fn(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self.seconds[phase] += time.perf_counter() - start
                yield item
        return timed

    @contextmanager
    def timing(self):
        originals = []
        try:
            for phase, targets in self.plan.items():
                for module, name in targets:
                    fn = getattr(module, name)
                    originals.append((module, name, fn))
                    wrap = self._iterate if inspect.isgeneratorfunction(fn) else self._call
                    setattr(module, name, wrap(fn, phase))
            yield self
        finally:
            for module, name, fn in reversed(originals):
                setattr(module, name, fn)
