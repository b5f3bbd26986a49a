"""Unbiased sparse targets (cache.tail_samples): on a 1000-class teacher, the soft loss's gradient from the
top-K plus T tail draws equals the full-distribution gradient within sampling error when averaged over many
draws, while the top-K with the uniform fill is biased far beyond it. Float64 truth from the full logits."""

import numpy as np
import torch

from pipeline.losses import deit_loss, sparse_teacher_answers

C, K, T, B, DRAWS = 1000, 10, 16, 8, 400


def teacher_logits(rng):
    """An ImageNet-like teacher on mixed views: a N(0, 1.5^2) bulk, its own class 4-9 above, a mix partner
    2-5 above, so a third of the mass lies outside the top-10 (where the uniform fill guesses)."""
    z = rng.normal(0.0, 1.5, (B, C))
    z[np.arange(B), rng.integers(C, size=B)] += rng.uniform(4.0, 9.0, B)
    z[np.arange(B), rng.integers(C, size=B)] += rng.uniform(2.0, 5.0, B)
    return torch.from_numpy(z)


def soft_gradient(student, cached, tau):
    s = student.clone().requires_grad_(True)
    zeros = torch.zeros_like(s)
    deit_loss(zeros, s, torch.full_like(s, 1.0 / C), cached, "soft", 1.0, tau)["loss"].backward()
    return s.grad.double()


def full_gradient(z, student, tau):
    """d/ds of DeiT's soft loss with the teacher's full distribution, in float64."""
    s = student.double().clone().requires_grad_(True)
    log_t = torch.log_softmax(z / tau, dim=1)
    log_s = torch.log_softmax(s / tau, dim=1)
    (torch.sum(log_t.exp() * (log_t - log_s)) * tau * tau / s.numel()).backward()
    return s.grad


def bias_report(tau, seed=0):
    rng = np.random.default_rng(seed)
    z = teacher_logits(rng)
    student = torch.from_numpy(rng.normal(0.0, 2.0, (B, C))).float()
    truth = full_gradient(z, student, tau)
    uniform = soft_gradient(student, sparse_teacher_answers(z.float(), K), tau)
    draws = torch.stack([soft_gradient(student, sparse_teacher_answers(
        z.float(), K, torch.from_numpy(rng.random((B, T)))), tau) for _ in range(DRAWS)])
    mean = draws.mean(0)
    sampling = draws.var(0).sum() / DRAWS  # E ||mean - truth||^2 if the estimator is unbiased
    return {"leftover": float(1 - torch.softmax(z, 1).topk(K, 1).values.sum(1).mean()),
            "estimator_sq_error_over_sampling": float(((mean - truth) ** 2).sum() / sampling),
            "uniform_sq_error_over_sampling": float(((uniform - truth) ** 2).sum() / sampling),
            "estimator_relative_bias": float((mean - truth).norm() / truth.norm()),
            "uniform_relative_bias": float((uniform - truth).norm() / truth.norm())}


def test_tail_draws_give_the_full_gradient_within_sampling_error_and_the_uniform_fill_does_not():
    r = bias_report(tau=1.0)
    assert r["leftover"] > 0.1  # a real tail
    # unbiased: the squared error of the mean of DRAWS estimates is what their variance predicts (about 1)
    assert r["estimator_sq_error_over_sampling"] < 2.0, r
    assert r["uniform_sq_error_over_sampling"] > 8.0, r  # the uniform fill's bias is far beyond the sampling error
    assert r["uniform_relative_bias"] > 3 * r["estimator_relative_bias"], r


def test_tail_draws_follow_the_tail_distribution_and_are_fixed_by_their_uniforms():
    rng = np.random.default_rng(3)
    z = teacher_logits(rng)[:1].float()
    u = torch.from_numpy(rng.random((1, 20000)))
    answers = sparse_teacher_answers(z, K, u)
    top = set(answers["topk_ids"][0].tolist())
    drawn = answers["tail_ids"][0].numpy()
    assert not top & set(drawn.tolist())  # never a top-K class
    tail = torch.softmax(z.double(), 1)[0].numpy()
    tail[list(top)] = 0
    tail /= tail.sum()
    counts = np.bincount(drawn, minlength=C)
    heavy = np.argsort(-tail)[:20]  # the most likely tail classes: frequencies within 5 standard errors
    expected = tail[heavy] * len(drawn)
    assert (np.abs(counts[heavy] - expected) < 5 * np.sqrt(expected) + 1).all()
    np.testing.assert_array_equal(answers["tail_logprobs"][0].numpy(),
                                  torch.log_softmax(z, 1)[0, drawn].half().numpy())
    again = sparse_teacher_answers(z, K, u)
    assert torch.equal(again["tail_ids"], answers["tail_ids"])


def test_hard_mode_ignores_the_tail_draws():
    rng = np.random.default_rng(4)
    z = teacher_logits(rng).float()
    student = torch.randn(B, C)
    with_tail = sparse_teacher_answers(z, K, torch.from_numpy(rng.random((B, T))))
    without = sparse_teacher_answers(z, K)
    target = torch.full((B, C), 1.0 / C)
    a = deit_loss(student, student, target, with_tail, "hard", 0.5, 1.0)
    b = deit_loss(student, student, target, without, "hard", 0.5, 1.0)
    assert torch.equal(a["loss"], b["loss"])
