"""SIGKILL fault driver for `distill teacher-cache`: kill it at random moments, resume, and check that the
resumed cache is bit-identical to an uninterrupted run.

    python tests/fault_script.py --kills 20 --work /tmp/faults          # tiny shards and teacher built here
    python tests/fault_script.py --manifest M --set cache.batch_size=8 --work /tmp/faults --launcher exec

Steps: build (or take) a run spec; fill a reference cache without interruption, timing its units; then, for
each of N kill points drawn from a seeded generator, start `teacher-cache` on the faulted cache, wait until
it has completed a chosen number of units, wait a random part of a unit's time more, and SIGKILL it. After
every kill each done unit must equal the reference's, chunk by chunk. While a writer runs, the driver is a
reader too: every unit it sees done reads back equal to the reference, and a unit not done is refused.
A last run finishes the cache, which must equal the reference array by array. If a run completes before its
kill point, the faulted cache is started again from nothing, so N kills always land.

Launchers: `fork` (default) starts each run from a fork server that has imported torch and timm once, so a
run costs its work and not ~6 s of imports; it runs the `distill teacher-cache` command in a process of its
own. `exec` starts the installed `distill` script itself each time. Every run uses `--threads` torch threads
(default 1: on a few shared cores more threads make a tiny teacher many times slower).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline import cache

TINY_MANIFEST = "manifests/tiny.yaml"
TINY_TRAIN = (8, 6, 8, 7, 8, 5)  # samples per shard (unequal on purpose): 6 shards x 2 epochs + 2 val = 14 units
TINY_VAL = (8, 6)
POLL_S = 0.005


# --------------------------------------------------------------------------------------------- a tiny run spec


def write_tiny_shards(directory: Path, sizes: tuple[int, ...], first_index: int) -> Path:
    """PNG digits in WebDataset tars of the given sizes, and their shard list."""
    from tiny import write_shards

    return write_shards(directory, sizes, first_index)


def write_teacher(path: Path, seed: int = 0) -> Path:
    """An untrained teacher of manifests/tiny.yaml's architecture (the cache does not care how good it is)."""
    import timm
    import torch

    from pipeline.manifest_loader import load

    m = load(TINY_MANIFEST)
    torch.manual_seed(seed)
    model = timm.create_model(m.teacher.model, num_classes=10, **m.teacher.model_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def tiny_overrides(work: Path) -> list[str]:
    """Build tiny shards and a teacher under `work` (once) and return the `--set` overrides that point
    manifests/tiny.yaml at them; the cache path is left to the caller."""
    train, val, teacher = work / "shards" / "train", work / "shards" / "val", work / "teacher.pt"
    if not (train / "shardlist.json").exists():
        write_tiny_shards(train, TINY_TRAIN, 0)
        write_tiny_shards(val, TINY_VAL, sum(TINY_TRAIN))
    if not teacher.exists():
        write_teacher(teacher)
    return [f"data.train={train / 'shardlist.json'}", f"data.val={val / 'shardlist.json'}",
            f"teacher.checkpoint={teacher}", "cache.batch_size=4", "cache.device=cpu"]


# --------------------------------------------------------------------------------------------- reading caches


def load_arrays(path: str) -> dict[tuple[str, str], np.ndarray]:
    root = cache.open_cache(path)
    return {(split, name): arr[...] for split in cache.SPLITS for name, arr in root[split].arrays()}


def all_units(root) -> list[tuple[str, int | None, int]]:
    units = [("val", None, g) for g in range(cache.layout_of(root, "val").groups)]
    train = cache.layout_of(root, "train")
    return units + [("train", e, g) for e in range(train.epochs) for g in range(train.groups)]


def done_list(root) -> list[tuple[str, int | None, int]]:
    done = {split: cache.done_units(root, split) for split in cache.SPLITS}
    return [u for u in all_units(root) if done[u[0]][u[2] if u[1] is None else (u[1], u[2])]]


def count_done(path: str) -> int:
    """Done units on disk, 0 while the cache does not exist yet."""
    try:
        return len(done_list(cache.open_cache(path)))
    except cache.CacheError:
        return 0


def unit_differences(root, reference: dict, unit) -> list[str]:
    """Chunks of a unit that differ from the reference."""
    split, epoch, group = unit
    arrays = dict(root[split].arrays())
    out = []
    for name, coords in cache.unit_chunks(arrays, epoch, group):
        if name == "done":
            continue
        arr = arrays[name]
        ref = reference[(split, name)]
        region = tuple(slice(c * n, (c + 1) * n) for c, n in zip(coords, arr.chunks))
        if not np.array_equal(arr.get_block_selection(coords), ref[region]):
            out.append(f"{split}/{name} chunk {coords}")
    return out


def cache_differences(path: str, reference_path: str) -> list[str]:
    """Every array of both caches compared whole, and their attributes but the creation time."""
    a, b = cache.open_cache(path), cache.open_cache(reference_path)
    out = []
    attrs_a = {k: v for k, v in a.attrs.items() if k != "created"}
    attrs_b = {k: v for k, v in b.attrs.items() if k != "created"}
    if attrs_a != attrs_b:
        out.append(f"attributes differ in {sorted(k for k in attrs_a.keys() | attrs_b.keys() if attrs_a.get(k) != attrs_b.get(k))}")
    arrays_a, arrays_b = load_arrays(path), load_arrays(reference_path)
    if arrays_a.keys() != arrays_b.keys():
        out.append(f"arrays differ: {sorted(arrays_a.keys() ^ arrays_b.keys())}")
    for key in sorted(arrays_a.keys() & arrays_b.keys()):
        x, y = arrays_a[key], arrays_b[key]
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            out.append(f"{key[0]}/{key[1]} differs")
    return out


class Reader:
    """A reader of the cache being written: checks each unit the first time it sees it done, and that a
    unit not done is refused."""

    def __init__(self, path: str, reference: dict):
        self.path, self.reference, self.seen = path, reference, set()
        self.checks = 0

    def poll(self) -> None:
        try:
            root = cache.open_cache(self.path)
        except cache.CacheError:
            return  # not created yet (its attributes are written last)
        done = done_list(root)
        for unit in done:
            if unit in self.seen:
                continue
            split, epoch, group = unit
            for shard in cache.layout_of(root, split).group_shards(group):
                slab = cache.read_slab(root, split, epoch, shard,
                                       ("topk_logprobs", "topk_ids", "log_leftover", "digest", "view", "labels"))
                def ref(name):
                    arr = self.reference[(split, name)]
                    return arr[shard] if epoch is None or name == "labels" else arr[epoch, shard]

                decoded = dict(zip(("topk_logprobs", "log_leftover"),  # the reference's stored answers, decoded
                                   cache.decode_answers(ref("topk_logratios"), ref("leftover_logit"))))
                for name, values in slab.items():
                    want = decoded[name] if name in decoded else ref(name)
                    if name in cache.CODECS:  # the reference holds the stored form
                        values = cache.CODECS[name][0](values)
                    if not np.array_equal(values, want):
                        raise AssertionError(f"a reader saw {split}/{name} of done unit {unit} differ from the "
                                             f"reference while the cache was being written")
            self.seen.add(unit)
            self.checks += 1
        pending = [u for u in all_units(root) if u not in done]
        if pending:
            split, epoch, group = pending[0]
            shard = cache.layout_of(root, split).group_shards(group)[0]
            try:
                cache.read_slab(root, split, epoch, shard)
            except cache.CacheError as e:
                if "not complete" not in str(e):
                    raise
            else:
                if pending[0] not in done_list(cache.open_cache(self.path)):  # not finished in between
                    raise AssertionError(f"a reader could read unit {pending[0]}, which is not done")
            self.checks += 1


# --------------------------------------------------------------------------------------------- launching


def _teacher_cache(argv: list[str], threads: int | None) -> None:
    """Child body for the fork launcher: the `distill` command line itself."""
    import torch

    from pipeline.cli import main

    if threads:
        torch.set_num_threads(threads)
    main(argv, prog_name="distill")


class Launcher:
    """Starts `distill teacher-cache` runs: from a fork server (`fork`) or as the installed script (`exec`)."""

    def __init__(self, kind: str, threads: int | None = None):
        self.kind, self.threads = kind, threads
        if kind == "fork":
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(["fault_script", "pipeline.cli", "stages.teacher_cache"])
            warm = self.ctx.Process(target=time.sleep, args=(0,))  # start the server now, not in a timed run
            warm.start()
            warm.join()

    def start(self, argv: list[str]):
        if self.kind == "fork":
            proc = self.ctx.Process(target=_teacher_cache, args=(argv, self.threads))
            proc.start()
            return proc
        distill = Path(sys.executable).with_name("distill")
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads)) if self.threads else None
        return subprocess.Popen([str(distill), *argv], stdout=subprocess.DEVNULL, env=env)

    @staticmethod
    def alive(proc) -> bool:
        return proc.is_alive() if hasattr(proc, "is_alive") else proc.poll() is None

    @staticmethod
    def kill(proc) -> None:
        proc.kill()  # SIGKILL, for multiprocessing.Process and subprocess.Popen alike

    @staticmethod
    def wait(proc) -> int:
        """Reap the process (so its pid is gone, as a lock check expects) and return its exit code."""
        if hasattr(proc, "join"):
            proc.join()
            return proc.exitcode
        proc.wait()
        return proc.returncode


# --------------------------------------------------------------------------------------------- the run


def _argv(manifest: str, overrides: list[str], path: str) -> list[str]:
    sets = [a for o in overrides + [f"cache.path={path}"] for a in ("--set", o)]
    return ["teacher-cache", "--manifest", manifest, *sets, "--no-progress"]


def _run_to_end(launcher: Launcher, argv: list[str], path: str, reader: Reader | None = None) -> list[float]:
    """Run until the process exits; returns the times at which the done count grew."""
    started, times, done = time.monotonic(), [], 0
    proc = launcher.start(argv)
    while launcher.alive(proc):
        now = count_done(path)
        times += [time.monotonic() - started] * (now - done)
        done = max(done, now)
        if reader:
            reader.poll()
        time.sleep(POLL_S)
    code = launcher.wait(proc)
    if code != 0:
        raise RuntimeError(f"teacher-cache exited with {code} on {path}")
    return times + [time.monotonic() - started] * (count_done(path) - done)


def run_faults(manifest: str, overrides: list[str], work: Path, kills: int = 5, seed: int = 0,
               launcher: str = "fork", threads: int | None = 1) -> dict:
    """Reference run, `kills` SIGKILLed runs, a final run; returns a report (raises on any difference).
    `threads`: torch threads per run (None: torch's default); the same for every run, so results compare."""
    work = Path(work)
    reference, faulted = str(work / "reference"), str(work / "faulted")
    for path in (reference, faulted):
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path + ".locks", ignore_errors=True)
    launch = Launcher(launcher, threads)
    times = _run_to_end(launch, _argv(manifest, overrides, reference), reference)
    ref_arrays = load_arrays(reference)
    total = count_done(reference)
    startup = times[0]
    unit_s = (times[-1] - times[0]) / max(1, total - 1)
    rng = np.random.default_rng(seed)
    argv = _argv(manifest, overrides, faulted)
    reader = Reader(faulted, ref_arrays)
    points, restarts = [], 0
    while len(points) < kills:
        done_now = count_done(faulted)
        if done_now == total:  # the last run outran its kill point: start over so every kill lands
            shutil.rmtree(faulted)
            restarts += 1
            reader.seen.clear()
            done_now = 0
        room = max(1, (total - done_now) // (kills - len(points) + 1))
        target = done_now + int(rng.integers(0, room))
        delay = float(rng.uniform(0, startup + unit_s if target == done_now else unit_s))
        proc = launch.start(argv)
        started = time.monotonic()
        reached = started if target == done_now else None
        while launch.alive(proc):
            if reached is None and count_done(faulted) >= target:
                reached = time.monotonic()
            if reached is not None and time.monotonic() - reached >= delay:
                launch.kill(proc)
                break
            reader.poll()
            time.sleep(POLL_S)
        code = launch.wait(proc)
        if code not in (0, -signal.SIGKILL):
            raise RuntimeError(f"teacher-cache exited with {code} before its kill point {len(points)}")
        if code != -signal.SIGKILL:
            continue  # finished first: not a kill point
        root = cache.open_cache(faulted) if count_done(faulted) else None
        done = done_list(root) if root is not None else []
        bad = [d for unit in done for d in unit_differences(root, ref_arrays, unit)]
        if bad:
            raise AssertionError(f"after kill {len(points)}, done units differ from the reference: {bad[:5]}")
        points.append({"target_done": target, "delay_s": round(delay, 3), "after_s": round(time.monotonic() - started, 3),
                       "done_before": done_now, "done_after": len(done)})
    _run_to_end(launch, argv, faulted, reader)
    differences = cache_differences(faulted, reference)
    if differences:
        raise AssertionError(f"the resumed cache differs from the uninterrupted one: {differences}")
    return {"kills": len(points), "points": points, "restarts": restarts, "units": total, "reader_checks": reader.checks,
            "unit_s": round(unit_s, 3), "startup_s": round(startup, 3), "reference": reference, "faulted": faulted}


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILL points (default 5; up to 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch directory (caches, tiny shards); default: a new temporary directory, kept")
    parser.add_argument("--manifest", default=None, help="run spec; default: manifests/tiny.yaml on tiny shards")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--launcher", choices=("fork", "exec"), default="fork")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    opts = parser.parse_args(args)
    if not 1 <= opts.kills <= 20:
        parser.error("--kills must lie in 1..20")
    if opts.work is None:
        opts.work = Path(tempfile.mkdtemp(prefix="fault-script-"))
        print(f"scratch directory: {opts.work}", file=sys.stderr)
    overrides = opts.overrides if opts.manifest else tiny_overrides(opts.work) + opts.overrides
    report = run_faults(opts.manifest or TINY_MANIFEST, overrides, opts.work, opts.kills, opts.seed, opts.launcher,
                        opts.threads or None)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    import fault_script  # this file as a module of its own name, so the fork server can find `_teacher_cache`

    sys.exit(fault_script.main())
