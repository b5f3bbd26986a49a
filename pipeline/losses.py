"""Stage-2 losses: the mixed ground truth, soft targets rebuilt from the sparse cache, and DeiT's loss.

The cache holds, per view, the teacher's top-K log-probabilities (float16, sorted descending), their class
ids and the log of the probability mass outside the top-K (`log_leftover`). `sparse_teacher_log_probs` turns
that back into a full distribution; `deit_loss` follows facebookresearch/deit `losses.py`
(`DistillationLoss`) with the teacher's forward pass replaced by that reconstruction, so a cache with K equal
to the class count gives DeiT's loss on the stored log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import one_hot
from timm.loss import SoftTargetCrossEntropy

from pipeline.cache import decode_answers, encode_answers

soft_target_cross_entropy = SoftTargetCrossEntropy()


def mixed_target(
    labels: torch.Tensor,
    partner_labels: torch.Tensor,
    lam: torch.Tensor | float,
    num_classes: int,
    smoothing: float,
) -> torch.Tensor:
    """The [B, C] ground truth of mixed views, label-smoothed as in timm's `mixup_target`.

    Unlike timm (whose partner is always the flipped batch and whose lambda is one number per batch) the
    partner labels and a per-sample `lam` [B] come from the stored view parameters.
    """
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    own = one_hot(labels, num_classes, on_value=on_value, off_value=off_value)
    partner = one_hot(partner_labels, num_classes, on_value=on_value, off_value=off_value)
    lam = torch.as_tensor(lam, dtype=own.dtype, device=own.device).reshape(-1, 1)
    return own * lam + partner * (1.0 - lam)


def sparse_teacher_log_probs(
    topk_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    log_leftover: torch.Tensor,
    num_classes: int,
    tau: float = 1.0,
) -> torch.Tensor:
    """The teacher's [B, C] log-probabilities at temperature `tau`, rebuilt from its cached top-K.

    Each of the C-K classes outside the top-K gets the uniform-equivalent log-probability
    `log_leftover - log(C - K)` (the leftover mass m spread evenly); the top-K keep theirs; the result is
    `log_softmax(completed / tau)`. At tau = 1 this is the top-K probabilities plus the leftover spread
    uniformly (renormalised, which absorbs the float16 rounding); with K = C it is exactly the softmax of the
    stored log-probabilities at any tau (the leftover is then not used). Since log-probabilities are logits
    shifted by a constant per view, dividing them by tau is the teacher's softmax at tau.

    A leftover of -inf (nothing outside the top-K) gives the missing classes probability 0 (a finite, very
    negative log-probability, so KL stays finite). Computed in float32 whatever the input dtypes.
    """
    if tau <= 0:
        raise ValueError(f"distillation temperature tau must be > 0, got {tau}; set student.tau above 0")
    if topk_logprobs.ndim != 2 or topk_ids.shape != topk_logprobs.shape or log_leftover.shape != topk_logprobs.shape[:1]:
        raise ValueError(
            f"cached teacher answers have mismatched shapes: topk_logprobs {tuple(topk_logprobs.shape)}, "
            f"topk_ids {tuple(topk_ids.shape)}, log_leftover {tuple(log_leftover.shape)}; expected [B, K], [B, K] and [B]"
        )
    k = topk_logprobs.shape[1]
    if k > num_classes:
        raise ValueError(
            f"the cache stores K={k} classes per view but the student has num_classes={num_classes}; "
            f"K must not exceed the class count (check the cache's class map against the student's)"
        )
    log_probs = topk_logprobs.float()
    missing = num_classes - k
    if missing == 0:
        completed = torch.full(log_probs.shape, float("-inf"), device=log_probs.device)
    else:
        uniform = log_leftover.float().unsqueeze(1) - math.log(missing)  # -inf where nothing is left over
        completed = uniform.expand(-1, num_classes).clone()
    completed.scatter_(1, topk_ids.long(), log_probs)
    out = F.log_softmax(completed / tau, dim=1)
    return out.clamp_min(torch.finfo(torch.float32).min)


def sparse_teacher_answers(logits: torch.Tensor, top_k: int, tail_uniforms: torch.Tensor | None = None,
                           stored: bool = False) -> dict[str, torch.Tensor]:
    """What the cache stores and hands back for full teacher logits [B, C]: the top-K log-probabilities (float32,
    descending), their ids, and the log of the mass outside the top-K (-inf for none), snapped to the stored
    form (`cache.encode_answers` then `cache.decode_answers`, on the CPU). The leftover is a logsumexp over the
    other classes, never `1 - sum(top-K)`, so a confident teacher's tiny leftover keeps its relative precision.
    Stage 1 writes these; an online teacher truncated to K uses them too, so both give the student the very
    same targets. With `stored`, also the stored form itself, on the CPU (`topk_logratios` float16 [B, K-1],
    `leftover_logit` int32 [B]): what stage 1 writes, so the cache holds exactly what was computed.

    With `tail_uniforms` [B, T] (numbers in [0, 1)), also T classes drawn with replacement from the tail, the
    teacher's distribution outside the top-K (`tail_ids`, by inverse CDF, so the draws are the uniforms'
    alone), and their log-probabilities (`tail_logprobs`, float16): what `sparse_soft_target` needs for an
    unbiased estimate of the full soft loss (Anshumann et al., ACL 2025, "Sparse Logit Sampling")."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=1)
    top_v, top_i = logits.topk(top_k, dim=1)
    rest = logits.scatter(1, top_i, float("-inf"))
    ratios, logit = encode_answers((top_v - lse.unsqueeze(1)).cpu().numpy(),
                                   (torch.logsumexp(rest, dim=1) - lse).cpu().numpy())
    topk_logprobs, log_leftover = (torch.from_numpy(v).to(logits.device) for v in decode_answers(ratios, logit))
    out = {"topk_logprobs": topk_logprobs, "topk_ids": top_i, "log_leftover": log_leftover}
    if stored:
        out |= {"topk_logratios": torch.from_numpy(ratios), "leftover_logit": torch.from_numpy(logit.astype(np.int32))}
    if tail_uniforms is not None:
        tail = torch.softmax(rest.double(), dim=1)  # zero on the top-K
        cdf = tail.cumsum(dim=1)
        drawn = torch.searchsorted(cdf, tail_uniforms.double() * cdf[:, -1:], right=True)
        drawn = drawn.clamp_max(logits.shape[1] - 1)
        out["tail_ids"] = drawn
        out["tail_logprobs"] = (logits.gather(1, drawn) - lse.unsqueeze(1)).half()
    return out


def sampled_teacher_target(cached: Mapping[str, torch.Tensor], num_classes: int,
                           tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's [B, C] target at temperature `tau` from the top-K plus the T classes drawn from its tail
    (`tail_ids`, `tail_logprobs`): (q_hat, log_q). q_hat keeps the top-K weights p_i^(1/tau) and gives each
    draw the importance weight (m / T) p_j^(1/tau) / p_j (m = leftover mass), normalised per view; log_q is
    the teacher's own tempered log-probability at the classes q_hat covers (-inf elsewhere).

    At tau = 1 the weights sum to 1 (up to float16 rounding) and E[q_hat] = p exactly, so the soft loss
    -sum q_hat log s and its gradient softmax(s) - q_hat are unbiased estimates of the full ones (Anshumann
    et al., ACL 2025); at other tau the normalisation makes it a self-normalised estimate (consistent in T,
    with a bias of order 1/T). The uniform fill of `sparse_teacher_log_probs` is biased at every tau."""
    lp = cached["topk_logprobs"].float()
    tail_lp = cached["tail_logprobs"].float()
    top_ids, tail_ids = cached["topk_ids"].long(), cached["tail_ids"].long()
    leftover = cached["log_leftover"].float().exp().unsqueeze(1)
    tail_weight = leftover / tail_ids.shape[1] * torch.exp(tail_lp * (1.0 / tau - 1.0))
    weights = torch.zeros(lp.shape[0], num_classes, device=lp.device)
    weights = weights.scatter(1, top_ids, torch.exp(lp / tau)).scatter_add(1, tail_ids, tail_weight)
    total = weights.sum(dim=1, keepdim=True)
    log_q = torch.full_like(weights, float("-inf")).scatter(1, tail_ids, tail_lp / tau).scatter(1, top_ids, lp / tau)
    return weights / total, log_q - total.log()


def teacher_argmax(topk_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's top-1 class per view [B]: the cache sorts ids by logit, so it is column 0."""
    return topk_ids[:, 0].long()


def ground_truth_cross_entropy(logits, target, labelled=None):
    """Soft-target cross-entropy on the ground truth, averaged over the labelled views only (`labelled` [B]
    bool; None = all). A batch without a labelled view contributes 0."""
    if labelled is None:
        return soft_target_cross_entropy(logits, target)
    per_view = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1)
    weight = labelled.to(per_view.dtype)
    return (per_view * weight).sum() / weight.sum().clamp_min(1.0)


def _ground_truth_part(dist_logits, target, cached, tau, labelled):
    return ground_truth_cross_entropy(dist_logits, target, labelled)


def _soft_part(dist_logits, target, cached, tau, labelled):
    """KL(teacher || student) at temperature tau, with DeiT's reduction. With tail samples in the cache, the
    teacher is `sampled_teacher_target` (unbiased); otherwise the top-K with the uniform fill.

    DeiT sums the KL over batch and classes and divides by `dist_logits.numel()` = B * C, i.e. the usual
    batch-mean KL divided by C as well (facebookresearch/deit issue #61). That legacy scale is kept on
    purpose so alpha and tau mean what they mean in DeiT's recipes.
    """
    student = F.log_softmax(dist_logits.float() / tau, dim=1)
    if "tail_ids" in cached:
        q_hat, log_q = sampled_teacher_target(cached, dist_logits.shape[1], tau)
        terms = torch.where(q_hat > 0, q_hat * (log_q - student), torch.zeros_like(q_hat))
        return terms.sum() * (tau * tau) / dist_logits.numel()
    teacher = sparse_teacher_log_probs(
        cached["topk_logprobs"], cached["topk_ids"], cached["log_leftover"], dist_logits.shape[1], tau
    )
    return F.kl_div(student, teacher, reduction="sum", log_target=True) * (tau * tau) / dist_logits.numel()


def _hard_part(dist_logits, target, cached, tau, labelled):
    return F.cross_entropy(dist_logits, teacher_argmax(cached["topk_ids"]))


def _no_part(dist_logits, target, cached, tau, labelled):
    """DeiT's `none`: the distillation head is not in the loss. A zero that keeps it in the graph (zero
    gradients), so DDP finds every parameter used."""
    return dist_logits.sum() * 0.0


DistillationPart = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], float, torch.Tensor | None],
                            torch.Tensor]

# What the distillation head learns, per mode: signature (dist_logits, target, cached, tau, labelled) -> scalar;
# the teacher answers every view, so only the ground-truth part looks at `labelled`.
DISTILLATION_PARTS: dict[str, DistillationPart] = {
    "none": _ground_truth_part,  # both heads on the ground truth (this project's baseline, weight 0.5 each)
    "soft": _soft_part,
    "hard": _hard_part,
    "deit_none": _no_part,  # DeiT's distillation_type none: the class head alone
}
DISTILLATION_MODES = tuple(DISTILLATION_PARTS)
GROUND_TRUTH_MODES = ("none", "deit_none")  # modes that never read the teacher's answers
# The head whose top-1 is a mode's headline: DeiT evaluates a model trained without distillation on its class
# head (its `none` trains no distillation head); a distilled model on the average of both heads.
HEADLINE_HEAD = {"none": "joint", "soft": "joint", "hard": "joint", "deit_none": "class"}
CACHED_FIELDS = ("topk_logprobs", "topk_ids", "log_leftover")


def deit_loss(
    class_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    target: torch.Tensor,
    cached: Mapping[str, torch.Tensor] | None,
    mode: str,
    alpha: float,
    tau: float,
    labelled: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """DeiT's distillation loss on the two heads; returns the named parts `loss`, `base`, `distill`.

    `target` is the [B, C] mixed, smoothed ground truth; `cached` holds the teacher's answers for these
    exact views (`topk_logprobs`, `topk_ids`, `log_leftover`; unused, and may be None, in the ground-truth modes).
    `base` is soft-target cross-entropy of the class head on `target`. For "soft" and "hard",
    `loss = (1 - alpha) * base + alpha * distill` as in DeiT. Two baselines without a teacher:
    "none" (this project's, both heads on the ground truth): the student keeps both heads (one model for every
    mode, evaluated the same way) and the distillation head also learns the ground truth: `distill` is its
    soft-target cross-entropy and `loss = (base + distill) / 2`, whatever alpha is. "deit_none" (DeiT's
    `distillation_type none`): `loss = base`, the distillation head gets no gradient (`distill` is 0), and the
    headline is the class head's top-1 (`HEADLINE_HEAD`).
    `labelled` [B] bool marks the views whose ground truth may be used (a smaller labelled split): the
    ground-truth terms average over those alone, the teacher's terms over every view.
    """
    if mode not in DISTILLATION_PARTS:
        raise ValueError(f"unknown distillation mode {mode!r}; valid modes: {', '.join(DISTILLATION_MODES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation weight alpha must lie in [0, 1], got {alpha}; set student.alpha")
    if mode not in GROUND_TRUTH_MODES:
        absent = [name for name in CACHED_FIELDS if cached is None or name not in cached]
        if absent:
            raise ValueError(
                f"distillation mode {mode!r} needs the cached teacher answers {', '.join(CACHED_FIELDS)} "
                f"but the batch lacks {', '.join(absent)}; attach them in the student loader or use mode 'none'"
            )
    base = ground_truth_cross_entropy(class_logits, target, labelled)
    distill = DISTILLATION_PARTS[mode](dist_logits, target, cached, tau, labelled)
    weight = {"none": 0.5, "deit_none": 0.0}.get(mode, alpha)
    return {"loss": (1.0 - weight) * base + weight * distill, "base": base, "distill": distill}
