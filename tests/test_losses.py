"""Losses against independent computations: a from-scratch DeiT DistillationLoss on full logits, and numpy
reconstructions of the sparse teacher distribution."""

import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target

from pipeline import cache
from pipeline.losses import (
    DISTILLATION_MODES,
    HEADLINE_HEAD,
    deit_loss,
    mixed_target,
    sparse_teacher_answers,
    sparse_teacher_log_probs,
    teacher_argmax,
)

ID_DTYPES = [np.uint16, np.int32]


def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def np_logsumexp(x):
    x = np.asarray(x, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def distinct_logits(rng, batch, num_classes, spread=0.6):
    """Full teacher logits with no ties even after float16 rounding, so the argmax is unambiguous."""
    rows = [rng.permutation(num_classes) * spread + rng.uniform(0, 0.1) for _ in range(batch)]
    return np.stack(rows).astype(np.float32) - 3.0


def cache_views(full_logits, k, id_dtype):
    """What the cache hands back, computed here in float64 and put through the stored form: top-K
    log-probabilities sorted descending, their ids, and the log leftover. Returns also the float64 values."""
    order = np.argsort(-full_logits, axis=1, kind="stable")[:, :k]
    log_p = np_log_softmax(full_logits)
    rest = log_p.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    log_rest = np_logsumexp(rest) if k < full_logits.shape[1] else np.full(len(rest), -np.inf)
    topk, log_leftover = cache.decode_answers(*cache.encode_answers(np.take_along_axis(log_p, order, axis=1), log_rest))
    cached = {
        "topk_logprobs": torch.from_numpy(topk),
        "topk_ids": torch.from_numpy(order.astype(id_dtype)),
        "log_leftover": torch.from_numpy(log_leftover),
    }
    return cached, topk.astype(np.float64), order, log_leftover.astype(np.float64)


def random_soft_target(rng, batch, num_classes):
    return rng.dirichlet(np.ones(num_classes), size=batch)


def reference_deit_loss(class_logits, dist_logits, target, teacher_logits, mode, alpha, tau):
    """facebookresearch/deit DistillationLoss written out in numpy on the teacher's full logit vector."""
    base = np.mean(np.sum(-target * np_log_softmax(class_logits), axis=1))
    if mode == "soft":
        log_t = np_log_softmax(teacher_logits / tau)
        log_s = np_log_softmax(dist_logits / tau)
        distill = np.sum(np.exp(log_t) * (log_t - log_s)) * tau * tau / dist_logits.size
    else:
        top1 = teacher_logits.argmax(axis=1)
        distill = -np.mean(np_log_softmax(dist_logits)[np.arange(len(top1)), top1])
    return (1 - alpha) * base + alpha * distill, base, distill


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize(("mode", "tau"), [("soft", 1.0), ("soft", 2.0), ("soft", 4.0), ("hard", 1.0)])
def test_full_cache_equals_deit_on_float16_logits(mode, tau, id_dtype):
    rng = np.random.default_rng(0)
    batch, num_classes, alpha = 6, 10, 0.3
    full = distinct_logits(rng, batch, num_classes)
    cached, topk, order, _ = cache_views(full, num_classes, id_dtype)
    teacher = np.zeros_like(topk)
    np.put_along_axis(teacher, order, topk, axis=1)  # the teacher's log-probabilities as the cache keeps them
    class_logits = rng.normal(size=(batch, num_classes)) * 2
    dist_logits = rng.normal(size=(batch, num_classes)) * 2
    target = random_soft_target(rng, batch, num_classes)

    parts = deit_loss(
        torch.tensor(class_logits, dtype=torch.float32),
        torch.tensor(dist_logits, dtype=torch.float32),
        torch.tensor(target, dtype=torch.float32),
        cached,
        mode,
        alpha,
        tau,
    )
    loss, base, distill = reference_deit_loss(class_logits, dist_logits, target, teacher, mode, alpha, tau)
    assert parts["loss"].item() == pytest.approx(loss, abs=1e-5)
    assert parts["base"].item() == pytest.approx(base, abs=1e-5)
    assert parts["distill"].item() == pytest.approx(distill, abs=1e-5)


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
def test_sparse_distribution_at_tau_1_is_topk_probs_plus_uniform_leftover(id_dtype):
    rng = np.random.default_rng(1)
    batch, num_classes, k = 5, 12, 4
    full = rng.normal(size=(batch, num_classes)).astype(np.float32) * 2.5
    cached, topk, order, log_leftover = cache_views(full, k, id_dtype)

    log_probs = sparse_teacher_log_probs(cached["topk_logprobs"], cached["topk_ids"], cached["log_leftover"],
                                         num_classes)

    expected = np.empty((batch, num_classes))
    top_probs = np.exp(topk)
    leftover = np.exp(log_leftover)
    assert (leftover > 0).all()
    expected[:] = (leftover / (num_classes - k))[:, None]
    np.put_along_axis(expected, order, top_probs, axis=1)
    expected /= expected.sum(axis=1, keepdims=True)  # float16 rounding leaves the stored sum a hair off 1
    probs = log_probs.exp().double().numpy()
    assert log_probs.dtype == torch.float32
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)

    dist_logits = rng.normal(size=(batch, num_classes)) * 2
    parts = deit_loss(
        torch.tensor(rng.normal(size=(batch, num_classes)), dtype=torch.float32),
        torch.tensor(dist_logits, dtype=torch.float32),
        torch.tensor(random_soft_target(rng, batch, num_classes), dtype=torch.float32),
        cached,
        "soft",
        0.5,
        1.0,
    )
    kl = np.sum(expected * (np.log(expected) - np_log_softmax(dist_logits))) / dist_logits.size
    assert parts["distill"].item() == pytest.approx(kl, abs=1e-6)


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0])
def test_sparse_distribution_at_other_tau_is_softmax_of_completed_logits(tau):
    rng = np.random.default_rng(2)
    batch, num_classes, k = 4, 9, 3
    full = rng.normal(size=(batch, num_classes)).astype(np.float32) * 3
    cached, topk, order, log_leftover = cache_views(full, k, np.int32)

    log_probs = sparse_teacher_log_probs(
        cached["topk_logprobs"], cached["topk_ids"], cached["log_leftover"], num_classes, tau=tau
    )

    completed = np.repeat((log_leftover - np.log(num_classes - k))[:, None], num_classes, axis=1)
    np.put_along_axis(completed, order, topk, axis=1)
    expected = np.exp(np_log_softmax(completed / tau))
    np.testing.assert_allclose(log_probs.exp().double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_no_leftover_gives_the_missing_classes_nothing_and_stays_finite():
    num_classes = 6
    topk = torch.tensor([[2.0, 1.0, 0.5], [0.0, -0.5, -4.0]], dtype=torch.float16)
    lse = torch.full((2,), float("-inf"))  # the stored code for "nothing outside the top-K"
    ids = torch.tensor([[5, 0, 2], [1, 3, 4]], dtype=torch.int32)

    for tau in (1.0, 3.0):
        log_probs = sparse_teacher_log_probs(topk, ids, lse, num_classes, tau=tau)
        assert torch.isfinite(log_probs).all()
        probs = log_probs.exp()
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
        missing = torch.ones_like(probs, dtype=torch.bool).scatter_(1, ids.long(), False)
        assert (probs[missing] == 0).all()
        renormalised = torch.softmax(topk.float() / tau, dim=1)
        torch.testing.assert_close(probs.gather(1, ids.long()), renormalised)

    dist_logits = torch.randn(2, num_classes, requires_grad=True)
    class_logits = torch.randn(2, num_classes, requires_grad=True)
    cached = {"topk_logprobs": topk, "topk_ids": ids, "log_leftover": lse}
    uniform_target = torch.full((2, num_classes), 1 / num_classes)
    parts = deit_loss(class_logits, dist_logits, uniform_target, cached, "soft", 0.5, 2.0)
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"]) and torch.isfinite(dist_logits.grad).all()


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_cache_with_a_peaked_teacher_has_no_nan(tau):
    num_classes = 5
    topk = torch.tensor([[60.0, -20.0, -30.0, -40.0, -50.0]], dtype=torch.float16)
    ids = torch.tensor([[3, 0, 4, 1, 2]], dtype=torch.int32)
    lse = torch.logsumexp(topk.float(), dim=1)
    log_probs = sparse_teacher_log_probs(topk, ids, lse, num_classes, tau=tau)
    assert torch.isfinite(log_probs).all()
    torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(1))
    cached = {"topk_logprobs": topk, "topk_ids": ids, "log_leftover": lse}
    parts = deit_loss(torch.zeros(1, 5), torch.zeros(1, 5), torch.full((1, 5), 0.2), cached, "soft", 0.5, tau)
    assert all(torch.isfinite(value) for value in parts.values())


def test_mixed_target_matches_timm_mixup_target_for_flipped_partner():
    labels = torch.tensor([0, 3, 7, 7, 2, 9])
    lam, smoothing, num_classes = 0.35, 0.1, 10
    expected = mixup_target(labels, num_classes, lam=lam, smoothing=smoothing)
    per_sample_lam = torch.full((len(labels),), lam)
    ours = mixed_target(labels, labels.flip(0), per_sample_lam, num_classes, smoothing)
    torch.testing.assert_close(ours, expected)


def test_mixed_target_uses_each_samples_own_lambda_and_partner():
    labels = torch.tensor([1, 4, 2])
    partners = torch.tensor([4, 4, 0])
    lam = torch.tensor([1.0, 0.25, 0.6])
    smoothing, num_classes = 0.2, 5
    target = mixed_target(labels, partners, lam, num_classes, smoothing)
    off, on = smoothing / num_classes, 1 - smoothing + smoothing / num_classes
    expected = np.full((3, num_classes), off)
    for row, (label, partner, weight) in enumerate(zip(labels.tolist(), partners.tolist(), lam.tolist())):
        expected[row, label] += weight * (on - off)
        expected[row, partner] += (1 - weight) * (on - off)
    np.testing.assert_allclose(target.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(target.sum(dim=1).numpy(), 1.0, atol=1e-6)


def test_hard_mode_learns_the_cached_top1_id():
    rng = np.random.default_rng(3)
    batch, num_classes = 4, 8
    ids = torch.tensor([[6, 1, 2], [0, 7, 5], [3, 3, 3], [7, 0, 1]], dtype=torch.int32)
    cached = {"topk_logprobs": torch.zeros(batch, 3, dtype=torch.float16), "topk_ids": ids,
              "log_leftover": torch.zeros(batch)}
    dist_logits = rng.normal(size=(batch, num_classes))
    parts = deit_loss(
        torch.zeros(batch, num_classes),
        torch.tensor(dist_logits, dtype=torch.float32),
        torch.full((batch, num_classes), 1 / num_classes),
        cached,
        "hard",
        0.5,
        1.0,
    )
    assert teacher_argmax(ids).tolist() == [6, 0, 3, 7]
    expected = -np.mean(np_log_softmax(dist_logits)[np.arange(batch), [6, 0, 3, 7]])
    assert parts["distill"].item() == pytest.approx(expected, abs=1e-6)


def test_none_mode_trains_both_heads_on_the_ground_truth():
    rng = np.random.default_rng(4)
    batch, num_classes = 3, 6
    class_logits, dist_logits = rng.normal(size=(2, batch, num_classes))
    target = random_soft_target(rng, batch, num_classes)
    parts = deit_loss(
        torch.tensor(class_logits, dtype=torch.float32),
        torch.tensor(dist_logits, dtype=torch.float32),
        torch.tensor(target, dtype=torch.float32),
        None,
        "none",
        0.9,
        1.0,
    )
    base = np.mean(np.sum(-target * np_log_softmax(class_logits), axis=1))
    distill = np.mean(np.sum(-target * np_log_softmax(dist_logits), axis=1))
    assert parts["base"].item() == pytest.approx(base, abs=1e-6)
    assert parts["distill"].item() == pytest.approx(distill, abs=1e-6)
    assert parts["loss"].item() == pytest.approx((base + distill) / 2, abs=1e-6)


@pytest.mark.parametrize("mode", DISTILLATION_MODES)
def test_gradients_reach_both_heads(mode):
    torch.manual_seed(0)
    batch, num_classes = 4, 7
    full = torch.randn(batch, num_classes) * 3
    topk, ids = full.topk(3, dim=1)
    cached = sparse_teacher_answers(full, 3)
    cached["topk_ids"] = cached["topk_ids"].to(torch.uint16)
    class_logits = torch.randn(batch, num_classes, requires_grad=True)
    dist_logits = torch.randn(batch, num_classes, requires_grad=True)
    target = mixed_target(torch.arange(batch), torch.arange(batch).flip(0), torch.rand(batch), num_classes, 0.1)
    deit_loss(class_logits, dist_logits, target, cached, mode, 0.5, 2.0)["loss"].backward()
    for grad in (class_logits.grad, dist_logits.grad):
        assert torch.isfinite(grad).all()
    assert class_logits.grad.abs().sum() > 0
    # DeiT's `none` leaves the distillation head out of the loss: it is in the graph with zero gradient
    assert (dist_logits.grad.abs().sum() > 0) == (mode != "deit_none")


def test_deit_none_is_deits_base_loss_alone():
    """facebookresearch/deit DistillationLoss with distillation_type 'none' returns
    `base_criterion(outputs, labels)`: timm's SoftTargetCrossEntropy of the class head on the mixed target,
    computed here in float64 by timm's own class, whatever alpha and tau are."""
    from timm.loss import SoftTargetCrossEntropy

    rng = np.random.default_rng(7)
    batch, num_classes = 5, 9
    class64, dist64 = (torch.tensor(rng.normal(size=(batch, num_classes)) * 2, requires_grad=True) for _ in range(2))
    target = mixed_target(torch.tensor([0, 3, 3, 8, 1]), torch.tensor([2, 2, 5, 0, 1]), torch.rand(batch), num_classes, 0.1)
    expected = SoftTargetCrossEntropy()(class64, target.double())
    expected.backward()
    class32 = class64.detach().float().requires_grad_()
    dist32 = dist64.detach().float().requires_grad_()
    parts = deit_loss(class32, dist32, target, None, "deit_none", 0.7, 3.0)
    parts["loss"].backward()
    assert parts["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts["base"].item() == parts["loss"].item() and parts["distill"].item() == 0.0
    assert torch.allclose(class32.grad.double(), class64.grad, atol=1e-7)
    assert not dist32.grad.any()
    assert HEADLINE_HEAD["deit_none"] == "class" and HEADLINE_HEAD["none"] == "joint"


def test_unknown_mode_lists_the_valid_modes():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"unknown distillation mode 'kd'; valid modes: none, soft, hard, deit_none"):
        deit_loss(logits, logits, logits, None, "kd", 0.5, 1.0)


def test_alpha_outside_unit_interval_is_rejected():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5; set student.alpha"):
        deit_loss(logits, logits, logits, None, "hard", 1.5, 1.0)


def test_missing_cached_answers_are_named():
    logits = torch.zeros(2, 3)
    cached = {"topk_logprobs": torch.zeros(2, 3), "log_leftover": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"mode 'soft' needs .* batch lacks topk_ids; attach them"):
        deit_loss(logits, logits, logits, cached, "soft", 0.5, 1.0)
    with pytest.raises(ValueError, match=r"batch lacks topk_logprobs, topk_ids, log_leftover"):
        deit_loss(logits, logits, logits, None, "hard", 0.5, 1.0)


def test_cache_with_more_logits_than_classes_is_rejected():
    with pytest.raises(ValueError, match=r"K=5 classes per view but the student has num_classes=4; K must not exceed the class count"):
        sparse_teacher_log_probs(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2), 4)


def test_mismatched_cached_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"mismatched shapes: topk_logprobs \(2, 3\), topk_ids \(2, 2\), log_leftover \(2,\)"):
        sparse_teacher_log_probs(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2), 4)


def test_non_positive_temperature_is_rejected():
    with pytest.raises(ValueError, match=r"tau must be > 0, got 0.0; set student.tau"):
        sparse_teacher_log_probs(torch.zeros(1, 2), torch.tensor([[0, 1]]), torch.zeros(1), 3, tau=0.0)


def test_labelled_mask_restricts_the_ground_truth_terms_to_labelled_views():
    """A smaller labelled split: ground-truth terms average over the labelled views only (numpy reference);
    the teacher's terms still use every view; a batch with no labelled view adds no ground-truth loss."""
    torch.manual_seed(0)
    b, c = 6, 5
    cls_logits, dist_logits = torch.randn(b, c), torch.randn(b, c)
    target = mixed_target(torch.randint(0, c, (b,)), torch.randint(0, c, (b,)), torch.rand(b), c, 0.1)
    labelled = torch.tensor([True, False, True, False, False, True])
    ids = torch.argsort(-torch.randn(b, c), dim=1).to(torch.int32)
    cached = {"topk_logprobs": torch.randn(b, c).sort(dim=1, descending=True).values.half(), "topk_ids": ids,
              "log_leftover": torch.full((b,), -3.0)}

    def ce(logits, rows):
        z = logits.numpy().astype(np.float64)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        per_view = -(target.numpy() * log_p).sum(1)
        return per_view[rows].mean()

    rows = labelled.numpy()
    none = deit_loss(cls_logits, dist_logits, target, None, "none", 0.5, 1.0, labelled)
    assert none["base"].item() == pytest.approx(ce(cls_logits, rows), rel=1e-5)
    assert none["distill"].item() == pytest.approx(ce(dist_logits, rows), rel=1e-5)
    hard = deit_loss(cls_logits, dist_logits, target, cached, "hard", 0.5, 1.0, labelled)
    assert hard["base"].item() == pytest.approx(ce(cls_logits, rows), rel=1e-5)
    every = deit_loss(cls_logits, dist_logits, target, cached, "hard", 0.5, 1.0)
    assert hard["distill"].item() == pytest.approx(every["distill"].item())  # the teacher labels every view
    nobody = deit_loss(cls_logits, dist_logits, target, cached, "hard", 0.5, 1.0, torch.zeros(b, dtype=torch.bool))
    assert nobody["base"].item() == 0.0 and nobody["loss"].item() == pytest.approx(0.5 * every["distill"].item())
