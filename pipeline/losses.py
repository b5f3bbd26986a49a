"""Stage-2 losses: the mixed ground truth, soft targets rebuilt from the sparse cache, and DeiT's loss.

The cache holds, per view, the teacher's top-K raw logits (float16, sorted descending), their class ids and
the logsumexp of the full logit vector (float32). `sparse_teacher_log_probs` turns that back into a full
distribution; `deit_loss` follows facebookresearch/deit `losses.py` (`DistillationLoss`) with the teacher's
forward pass replaced by that reconstruction, so a cache with K equal to the class count gives DeiT's loss
on the stored logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from timm.data.mixup import one_hot
from timm.loss import SoftTargetCrossEntropy

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
    topk_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    lse: torch.Tensor,
    num_classes: int,
    tau: float = 1.0,
) -> torch.Tensor:
    """The teacher's [B, C] log-probabilities at temperature `tau`, rebuilt from its cached top-K logits.

    Each of the C-K classes outside the top-K gets the uniform-equivalent logit
    `z_u = lse + log(m / (C - K))`, where `m = 1 - sum_i exp(z_i - lse)` is the leftover probability mass;
    the result is `log_softmax(completed / tau)`. At tau = 1 this is exactly the top-K probabilities
    `exp(z_i - lse)` plus the leftover spread uniformly; with K = C it is exactly the softmax of the stored
    logits at any tau (the logsumexp is then not needed).

    float16 rounding can push the top-K mass slightly above 1: the leftover is clamped at 0, the missing
    classes get probability 0 (a finite, very negative log-probability, so KL stays finite) and the
    softmax renormalises the top-K. Computed in float32 whatever the input dtypes (ids may be uint16).
    """
    if tau <= 0:
        raise ValueError(f"distillation temperature tau must be > 0, got {tau}; set student.tau above 0")
    if topk_logits.ndim != 2 or topk_ids.shape != topk_logits.shape or lse.shape != topk_logits.shape[:1]:
        raise ValueError(
            f"cached teacher answers have mismatched shapes: topk_logits {tuple(topk_logits.shape)}, "
            f"topk_ids {tuple(topk_ids.shape)}, lse {tuple(lse.shape)}; expected [B, K], [B, K] and [B]"
        )
    k = topk_logits.shape[1]
    if k > num_classes:
        raise ValueError(
            f"the cache stores K={k} logits per view but the student has num_classes={num_classes}; "
            f"K must not exceed the class count (check the cache's class map against the student's)"
        )
    logits = topk_logits.float()
    ids = topk_ids.long()
    missing = num_classes - k
    if missing == 0:
        completed = torch.full(logits.shape, float("-inf"), device=logits.device)
    else:
        lse = lse.float().unsqueeze(1)
        leftover = (1.0 - torch.exp(logits - lse).sum(dim=1, keepdim=True)).clamp_min(0.0)
        uniform_logit = lse + torch.log(leftover / missing)  # -inf where nothing is left over
        completed = uniform_logit.expand(-1, num_classes).clone()
    completed.scatter_(1, ids, logits)
    log_probs = F.log_softmax(completed / tau, dim=1)
    return log_probs.clamp_min(torch.finfo(torch.float32).min)


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
    """KL(teacher || student) at temperature tau, with DeiT's reduction.

    DeiT sums the KL over batch and classes and divides by `dist_logits.numel()` = B * C, i.e. the usual
    batch-mean KL divided by C as well (facebookresearch/deit issue #61). That legacy scale is kept on
    purpose so alpha and tau mean what they mean in DeiT's recipes.
    """
    teacher = sparse_teacher_log_probs(
        cached["topk_logits"], cached["topk_ids"], cached["lse"], dist_logits.shape[1], tau
    )
    student = F.log_softmax(dist_logits.float() / tau, dim=1)
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
CACHED_FIELDS = ("topk_logits", "topk_ids", "lse")


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
    exact views (`topk_logits`, `topk_ids`, `lse`; unused, and may be None, in the ground-truth modes).
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
