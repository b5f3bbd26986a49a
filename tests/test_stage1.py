"""Stage 1's GPU-ready path: unit writes run on a background thread and keep the done-flag rule, a failed
write reaches the caller and leaves its unit not done; on a CUDA device (skipped without one) the cache
filled with pinned memory, bfloat16 autocast and a compiled teacher verifies against the CPU teacher."""

import threading

import numpy as np
import pytest
import torch

from fault_script import tiny_overrides
from pipeline import cache, teacher_cache, verify
from pipeline.manifest_loader import load

TINY = "manifests/tiny.yaml"


def test_unit_writes_run_off_the_teacher_thread_and_a_failed_write_reaches_the_caller(tmp_path, monkeypatch):
    m = load(TINY, tiny_overrides(tmp_path) + [f"cache.path={tmp_path / 'cache'}", "cache.epochs=1"])
    real_write = cache.write_unit
    threads, calls = [], []

    def write_unit(root, split, epoch, group, data):
        threads.append(threading.current_thread().name)
        calls.append((split, epoch, group))
        if len(calls) == 3:
            raise cache.CacheError(f"writing {split} unit ({epoch}, {group}) failed: disk full")
        real_write(root, split, epoch, group, data)

    monkeypatch.setattr(cache, "write_unit", write_unit)
    with pytest.raises(cache.CacheError, match=r"failed: disk full"):
        teacher_cache.run(m, progress=False)
    assert threads and all(name.startswith("unit-writer") for name in threads)
    assert threading.current_thread().name not in threads
    root = cache.open_cache(m.cache.path)
    split, epoch, group = calls[2]
    done = cache.done_units(root, split)
    assert not done[(group,) if epoch is None else (epoch, group)]  # the failed unit is not marked complete
    assert sum(int(cache.done_units(root, s).sum()) for s in cache.SPLITS) == 2  # the two before it are
    monkeypatch.setattr(cache, "write_unit", real_write)
    teacher_cache.run(m, progress=False)  # the resume completes it
    assert all(cache.done_units(root, s).all() for s in cache.SPLITS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cache_filled_on_cuda_with_a_compiled_teacher_verifies_on_the_cpu(tmp_path):
    overrides = tiny_overrides(tmp_path) + [f"cache.path={tmp_path / 'cache'}", "cache.epochs=1", "cache.workers=2"]
    m = load(TINY, [o for o in overrides if o != "cache.device=cpu"] + ["cache.device=cuda", "cache.compile=true"])
    teacher_cache.run(m, progress=False)
    on_cpu = load(TINY, overrides)
    bf16 = verify.Thresholds(max_prob_error=0.05, max_leftover_error=0.05, max_kl=0.05, max_top1_disagreement=0.05)
    report = verify.verify_cache(on_cpu, m.cache.path, share=0.5, thresholds=bf16)
    assert report.passed, report.failures
    assert report.splits["train"].digest_matches == report.splits["train"].views > 0
    assert np.isfinite(report.splits["train"].max_kl)
