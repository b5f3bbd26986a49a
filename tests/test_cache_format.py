"""Cache format v3 against float64 truth: a confident 1000-class teacher keeps its leftover mass and its soft
targets at tau 1 and 3 through the stored form (float16 ratios to rank 1, the 16-bit logit of the leftover),
written and read back through a real Zarr cache, and flat teachers keep theirs too; the view records decode to
the very vectors the sampler gave; v1 and v2 caches are refused with the rebuild command."""

import numpy as np
import pytest
import torch
import zarr

from pipeline import cache, views
from pipeline.losses import sparse_teacher_answers, sparse_teacher_log_probs
from pipeline.manifest import ViewsCfg

C, K, N = 1000, 10, 2048


def confident_logits(rng, n=N, classes=C):
    """An ImageNet-like confident teacher: a N(0, 1.5^2) bulk, the top class 10-20 above it."""
    z = rng.normal(0.0, 1.5, (n, classes))
    z[np.arange(n), rng.integers(classes, size=n)] += rng.uniform(10.0, 20.0, n)
    return z


def float64_truth(z, k):
    """Top-K log-probabilities, ids and the log leftover in float64, summing the tail (no cancellation)."""
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    log_p = z - lse[:, None]
    ids = np.argsort(-z, axis=1, kind="stable")[:, :k]
    tail = log_p.copy()
    np.put_along_axis(tail, ids, -np.inf, axis=1)
    top = tail.max(1)
    log_leftover = top + np.log(np.exp(tail - top[:, None]).sum(1))
    return np.take_along_axis(log_p, ids, 1), ids, log_leftover


def soft_target(log_p_topk, ids, log_leftover, tau):
    """The sparse target in float64: top-K log-probs, the leftover spread uniformly, softmax at tau."""
    full = np.repeat((log_leftover - np.log(C - K))[:, None], C, axis=1)
    np.put_along_axis(full, ids, log_p_topk, axis=1)
    a = full / tau
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))


def _write_and_read(tmp_path, answers, n):
    """Write the answers as one val unit of a real cache and read them back through `read_slab`."""
    layouts = {"val": cache.CacheLayout(shards=1, positions=n, top_k=K, num_classes=C, n_params=0,
                                        shards_per_unit=1, epochs=None),
               "train": cache.CacheLayout(shards=1, positions=1, top_k=K, num_classes=C, n_params=views.N_PARAMS,
                                          shards_per_unit=1, epochs=1)}
    root = cache.create(str(tmp_path / "cache"), layouts, {"classes": [str(c) for c in range(C)], "top_k": K})
    unit = {name: value.numpy()[None] for name, value in answers.items()}
    unit["topk_ids"] = unit["topk_ids"].astype(np.uint16)
    unit["digest"] = np.ones((1, n), np.uint32)
    unit["labels"] = np.zeros((1, n), np.int32)
    cache.write_unit(root, "val", None, 0, unit)
    return cache.read_slab(cache.open_cache(str(tmp_path / "cache")), "val", None, 0,
                           ("topk_logprobs", "topk_ids", "log_leftover"))


def test_confident_1000_class_teacher_keeps_its_leftover_and_soft_targets(tmp_path):
    rng = np.random.default_rng(0)
    z = confident_logits(rng)
    true_lp, true_ids, true_log_leftover = float64_truth(z, K)
    answers = sparse_teacher_answers(torch.from_numpy(z).float(), K)  # what stage 1 computes
    stored = _write_and_read(tmp_path, answers, N)
    np.testing.assert_array_equal(stored["topk_ids"], true_ids)

    leftover = np.exp(stored["log_leftover"].astype(np.float64))
    assert np.isfinite(stored["log_leftover"]).all()  # no view lost its leftover
    rel = np.abs(leftover / np.exp(true_log_leftover) - 1)
    assert rel.max() < 1e-3, rel.max()

    # what v1 did: 1 - sum(exp(float16 raw logit - lse)) loses the leftover of confident views
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    v1_topk = np.take_along_axis(z, true_ids, 1).astype(np.float16).astype(np.float64)
    v1_leftover = 1 - np.exp(v1_topk - lse.astype(np.float32)[:, None]).sum(1)
    assert (v1_leftover <= 0).sum() > N // 20 or np.abs(v1_leftover / np.exp(true_log_leftover) - 1).max() > 0.1

    student = rng.normal(0.0, 2.0, (N, C))
    for tau in (1.0, 3.0):
        truth = soft_target(true_lp, true_ids, true_log_leftover, tau)
        ours = sparse_teacher_log_probs(torch.from_numpy(stored["topk_logprobs"]),
                                        torch.from_numpy(stored["topk_ids"].astype(np.int64)),
                                        torch.from_numpy(stored["log_leftover"]), C, tau).double().numpy()
        log_s = student / tau - np.log(np.exp(student / tau).sum(1, keepdims=True))
        kl_truth = (np.exp(truth) * (truth - log_s)).sum(1)
        kl_ours = (np.exp(ours) * (ours - log_s)).sum(1)
        rel = np.abs(kl_ours / kl_truth - 1)
        assert rel.max() < 1e-3, (tau, rel.max())
        missing = np.ones((N, C), bool)
        np.put_along_axis(missing, true_ids, False, axis=1)
        assert (np.exp(ours)[missing] > 0).all()  # no clamped view: every class outside the top-K keeps mass


@pytest.mark.parametrize("teacher", ["confident", "flat", "uniform-ish", "mixed"])
def test_stored_answers_keep_the_top_k_and_the_leftover_in_every_regime(teacher):
    """The leftover m and the top-K's mass 1 - m both keep a relative 1e-3 through the stored logit, and rank 1's
    derived probability is as exact as the stored ones: against float64, for confident (m tiny), flat (m near 1,
    where deriving rank 1 as 1 - m - the rest would lose it) and mixed teachers."""
    rng = np.random.default_rng(3)
    z = {"confident": lambda: confident_logits(rng), "flat": lambda: rng.normal(0.0, 0.3, (N, C)),
         "uniform-ish": lambda: rng.normal(0.0, 0.01, (N, C)),
         "mixed": lambda: rng.normal(0.0, 1.5, (N, C)) + 6.0 * (rng.random((N, C)) < 0.002)}[teacher]()
    true_lp, _, true_log_m = float64_truth(z, K)
    lp, log_m = cache.decode_answers(*cache.encode_answers(true_lp, true_log_m))
    assert lp.dtype == np.float32 and lp.shape == (N, K)
    m, true_m = np.exp(log_m.astype(np.float64)), np.exp(true_log_m)
    assert np.abs(m / true_m - 1).max() < 1e-3
    assert np.abs(-np.expm1(log_m.astype(np.float64)) / -np.expm1(true_log_m) - 1).max() < 1e-3
    rel_p = np.abs(np.exp(lp.astype(np.float64) - true_lp) - 1)
    bound = 2.0**-11 * np.abs(true_lp - true_lp[:, :1]) + 1e-3  # a float16 ratio's rounding, plus 1 - m's error
    assert (rel_p <= bound).all(), (rel_p / bound).max()
    assert rel_p[:, 0].max() < 1e-3  # rank 1 itself: only 1 - m's error and the ratios' rounding weighted by p_i / p_1
    assert (lp[:, :-1] >= lp[:, 1:]).all()  # still descending


def test_stored_answers_mark_nothing_left_and_sparse_answers_are_the_decoded_ones():
    none = cache.decode_answers(*cache.encode_answers(np.array([[-0.1, -2.4]]), np.array([-np.inf])))[1]
    assert np.isneginf(none).all()
    assert cache.encode_answers(np.array([[-1e-30]]), np.array([-70.0]))[1][0] == cache.LOGIT_NONE  # m < e**-48
    logits = torch.tensor([[5.0, 0.0, -1.0, -2.0]])
    torch_side = sparse_teacher_answers(logits, 2)
    z = logits.double().numpy()
    lse = np.log(np.exp(z).sum())
    exact_lp, exact_log_m = z[:, :2] - lse, np.log(np.exp(z[:, 2:]).sum(1)) - lse
    lp, log_m = cache.decode_answers(*cache.encode_answers(exact_lp, exact_log_m))
    np.testing.assert_array_equal(torch_side["log_leftover"].numpy(), log_m)
    np.testing.assert_allclose(torch_side["topk_logprobs"].numpy(), lp, rtol=1e-6)


def test_view_records_decode_to_the_sampled_vectors_and_refuse_off_grid_values():
    cfg = ViewsCfg()
    rng = np.random.default_rng(1)
    params = np.stack([views.sample_params(cfg, e, 0, p, 64, (int(rng.integers(40, 900)), int(rng.integers(40, 900))),
                                          size=224)
                       for e in range(3) for p in range(64)])
    records = views.encode_params(params)
    assert records.dtype == np.uint8 and records.shape == (192, views.PARAM_BYTES)
    np.testing.assert_array_equal(views.decode_params(records), params)  # bit for bit
    off = params[0].copy()
    off[views.PARAM_FIELDS.index("crop_x0")] += 1e-6
    with pytest.raises(ValueError, match=r"field crop_x0=.* is not storable: .* quantise it with views.quantise_params"):
        views.encode_params(off)
    with pytest.raises(ValueError, match=rf"stored view records must be uint8 with {views.PARAM_BYTES} bytes"):
        views.decode_params(np.zeros((2, 31), np.uint8))


def test_v1_and_v2_caches_are_refused_with_the_rebuild_command(tmp_path):
    path = str(tmp_path / "old")
    root = zarr.open_group(path, mode="w")
    root.attrs.update({"schema": "distill-cache/1"})
    with pytest.raises(cache.CacheError, match=r"schema distill-cache/1, .* reads only distill-cache/3. Rebuild it: "
                                               r".*run `make teacher-cache`"):
        cache.open_cache(path)
    with pytest.raises(cache.CacheError, match=r"schema distill-cache/1"):
        cache.create(path, {}, {})
    root.attrs.update({"schema": "distill-cache/2"})
    with pytest.raises(cache.CacheError, match=r"schema distill-cache/2 .* reads only distill-cache/3. Rebuild it: "
                                               r".*run `make teacher-cache`"):
        cache.open_cache(path)


def test_the_readmes_numpy_recipe_rebuilds_the_losss_distribution(tmp_path):
    """The README's plain-zarr reading recipe, run as written on a cache, gives the loss's distribution."""
    import re
    from pathlib import Path

    rng = np.random.default_rng(2)
    n = 64
    z = confident_logits(rng, n)
    answers = sparse_teacher_answers(torch.from_numpy(z).float(), K)
    layouts = {"train": cache.CacheLayout(shards=1, positions=n, top_k=K, num_classes=C, n_params=views.N_PARAMS,
                                          shards_per_unit=1, epochs=1)}
    root = cache.create(str(tmp_path / "cache"), layouts, {"classes": [str(c) for c in range(C)], "top_k": K})
    params = np.stack([views.sample_params(ViewsCfg(), 0, 0, p, n, (300, 200), size=224) for p in range(n)])
    unit = {name: value.numpy()[None] for name, value in answers.items()}
    unit |= {"topk_ids": unit["topk_ids"].astype(np.uint16), "digest": np.ones((1, n), np.uint32),
             "labels": np.zeros((1, n), np.int32), "view": params[None]}
    cache.write_unit(root, "train", 0, 0, unit)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipe = re.search(r"```python\n(.*?)```", readme[readme.index("Reading a cache with zarr"):], re.S).group(1)
    scope = {}
    exec(recipe.replace('"caches/demo"', repr(str(tmp_path / "cache"))), scope)
    ours = sparse_teacher_log_probs(answers["topk_logprobs"], answers["topk_ids"], answers["log_leftover"], C).exp()
    np.testing.assert_allclose(scope["p"], ours.double().numpy(), atol=5e-6)  # the loss computes in float32
    np.testing.assert_allclose(scope["p"].sum(1), 1.0, atol=1e-9)


def test_stage_1_refuses_a_cache_of_another_recipe_naming_the_place_that_differs(tmp_path):
    """Filling into a cache of another recipe version (an upgrade) names `recipe.version` and both values, not
    the whole recipe cut short."""
    recipe = views.recipe(ViewsCfg())
    root = zarr.open_group(str(tmp_path / "cache"), mode="w")
    root.attrs.update({"seed": 0, "recipe": {**recipe, "version": "views/3"}})
    with pytest.raises(cache.CacheError, match=r"different recipe: at recipe\.version the cache has \"views/3\", "
                                               r"the run spec has \"views/4\""):
        cache.check_fingerprint(root, {"seed": 0, "recipe": recipe})
    cache.check_fingerprint(root, {"seed": 0})  # fields the run spec leaves out are not compared
