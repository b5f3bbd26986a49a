"""K < C against an online teacher (issue #12 item 8): training from a top-K cache follows training with the
teacher run online on the same replayed views, its full logits truncated to the same top-K and completed the
same way, step by step, soft and hard, tau 1 and 3, with the student at another resolution than the teacher.
At 1000 classes with a confident teacher, the v2 storage keeps the online losses where v1's float16 raw
logits lose the leftover mass (the v1 rule is written out here as the reference that fails)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import cache
from pipeline.losses import deit_loss, sparse_teacher_answers
from pipeline.teacher_cache import run as fill_cache
from pipeline.train import METRICS, train

K = 4  # of the tiny teacher's 10 classes


def _records(run_dir):
    lines = (Path(run_dir) / METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "step"]


@pytest.fixture(scope="module")
def topk_cache(tiny_cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("topk") / "cache"
    m = tiny_cache.manifest(f"cache.path={path}", f"cache.top_k={K}")
    fill_cache(m, progress=False)
    return tiny_cache, path


@pytest.mark.parametrize(("mode", "tau"), [("soft", 1.0), ("soft", 3.0), ("hard", 1.0)])
def test_a_top_k_cache_gives_the_truncated_online_teachers_losses(topk_cache, tmp_path, mode, tau):
    tiny_cache, path = topk_cache
    overrides = (f"cache.path={path}", f"cache.top_k={K}", f"student.distillation={mode}", "student.alpha=0.7",
                 f"student.tau={tau}", "student.epochs=1", "student.img_size=8", "student.verify_sample=0",
                 "student.optim.lr=0.01", "student.sched.warmup_epochs=0")
    m = tiny_cache.manifest(*overrides, run_dir=tmp_path / "cached")
    assert m.student.img_size != m.teacher.img_size and cache.layout_of(cache.open_cache(str(path)), "train").top_k < 10
    train(m, progress=False)
    train(tiny_cache.manifest(*overrides, run_dir=tmp_path / "online"), answers="online-topk", progress=False)
    cached, online = _records(tmp_path / "cached"), _records(tmp_path / "online")
    assert len(cached) == len(online) > 0
    for part in ("loss", "base", "distill"):
        a = np.array([r[part] for r in cached])
        b = np.array([r[part] for r in online])
        assert a.min() > 0.01, part
        # the same stored form on both sides: only the teacher's forward on another batch differs (1e-6)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=0, err_msg=part)


def _v1_answers(logits: torch.Tensor, k: int) -> dict:
    """What schema 1 stored: float16 raw top-K logits and the float32 logsumexp; its loss took the leftover as
    1 - sum(exp(z16 - lse)), clamped at 0."""
    top_v, top_i = logits.topk(k, dim=1)
    lse = torch.logsumexp(logits, dim=1)
    z16 = top_v.half().float()
    leftover = (1 - torch.exp(z16 - lse[:, None]).sum(1)).clamp_min(0)
    return {"topk_logprobs": z16 - lse[:, None], "topk_ids": top_i, "log_leftover": leftover.log()}


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_at_1000_classes_a_confident_teachers_cache_follows_the_online_teacher_where_v1_did_not(tmp_path, tau):
    rng = np.random.default_rng(0)
    n, c, k, steps = 256, 1000, 10, 5
    teacher = rng.normal(0.0, 1.5, (n, c))
    teacher[np.arange(n), rng.integers(c, size=n)] += rng.uniform(10.0, 20.0, n)  # top logit 10-20 above
    teacher = torch.from_numpy(teacher).float()
    online = sparse_teacher_answers(teacher, k)
    # the cache: written through a real v2 cache and read back
    layouts = {"val": cache.CacheLayout(shards=1, positions=n, top_k=k, num_classes=c, n_params=0,
                                        shards_per_unit=1, epochs=None),
               "train": cache.CacheLayout(shards=1, positions=1, top_k=k, num_classes=c, n_params=31,
                                          shards_per_unit=1, epochs=1)}
    root = cache.create(str(tmp_path / "cache"), layouts, {"classes": [str(i) for i in range(c)], "top_k": k})
    unit = {name: value.numpy()[None] for name, value in online.items()}
    unit |= {"topk_ids": unit["topk_ids"].astype(np.uint16), "digest": np.ones((1, n), np.uint32),
             "labels": np.zeros((1, n), np.int32)}
    cache.write_unit(root, "val", None, 0, unit)
    slab = cache.read_slab(root, "val", None, 0, ("topk_logprobs", "topk_ids", "log_leftover"))
    stored = {name: torch.from_numpy(value.astype(np.int64) if name == "topk_ids" else value)
              for name, value in slab.items()}

    def run(answers):
        torch.manual_seed(0)
        student = torch.nn.Linear(32, c)
        features = torch.randn(n, 32)
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        losses = []
        for _ in range(steps):
            logits = student(features)
            target = torch.full((n, c), 1.0 / c)
            loss = deit_loss(logits, logits, target, answers, "soft", 1.0, tau)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return np.array(losses)

    reference, ours, v1 = run(online), run(stored), run(_v1_answers(teacher, k))
    np.testing.assert_allclose(ours, reference, rtol=1e-5)  # the cache gives the online teacher's steps
    assert np.abs(v1 / reference - 1).max() > 1e-3  # v1's storage did not


def test_a_cache_with_tail_samples_stores_tail_draws_and_a_soft_student_trains_on_them(topk_cache, tmp_path):
    tiny_cache, _ = topk_cache
    path = tmp_path / "cache"
    m = tiny_cache.manifest(f"cache.path={path}", f"cache.top_k={K}", "cache.tail_samples=3", "cache.epochs=1",
                            "student.distillation=soft", "student.epochs=1", "student.verify_sample=0",
                            run_dir=tmp_path / "run")
    fill_cache(m, progress=False)
    root = cache.open_cache(str(path))
    assert cache.layout_of(root, "train").tail_samples == 3 and "tail_ids" not in root["val"]
    slab = cache.read_slab(root, "train", 0, 0)
    held = slab["digest"] != 0
    ids, tail = slab["topk_ids"][held], slab["tail_ids"][held]
    assert tail.shape == (held.sum(), 3)
    assert not any(set(a) & set(b) for a, b in zip(ids.tolist(), tail.tolist()))  # drawn outside the top-K
    assert (slab["tail_logprobs"][held] <= slab["topk_logprobs"][held, -1:]).all()  # no tail class beats the K-th
    result = train(m, progress=False)
    assert all(np.isfinite(r["distill"]) and r["distill"] > 0 for r in _records(tmp_path / "run"))
    assert result is not None
