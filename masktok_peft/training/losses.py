"""Distillation losses: pure functions of logits, labels and a mask of supervised positions.

Every function takes logits of shape [..., vocab] and a boolean `mask` of shape [...], and
returns the mean over the positions where `mask` is True, computed in float32. Logits may hold
-inf entries (a masked-out mask-token logit): such an entry gets probability zero on both sides.
With no supervised position the loss is a zero that still backpropagates (into zero gradients),
so a training step on a batch without supervised positions does not fail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MaskTokError

OBJECTIVES = ("hard", "soft", "ground_truth")


def _check_shapes(logits: torch.Tensor, other: torch.Tensor, mask: torch.Tensor, other_name: str) -> None:
    if mask.shape != logits.shape[:-1]:
        raise MaskTokError(
            f"mask has shape {tuple(mask.shape)}, expected {tuple(logits.shape[:-1])} (logits without vocab)."
        )
    if other.shape[: mask.dim()] != mask.shape:
        raise MaskTokError(
            f"{other_name} has shape {tuple(other.shape)}, which does not match the logits {tuple(logits.shape)}."
        )


def _empty_loss(logits: torch.Tensor) -> torch.Tensor:
    # Summing an empty selection keeps the graph, so backward() runs and gives zero gradients.
    return logits.reshape(-1, logits.shape[-1])[:0].float().sum()


def cross_entropy_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `student_logits` [..., vocab] against `labels` [...] over the positions in `mask` [...]."""
    _check_shapes(student_logits, labels, mask, "labels")
    mask = mask.bool()
    if not mask.any():
        return _empty_loss(student_logits)
    selected = student_logits[mask].float()  # [num_positions, vocab]
    return F.cross_entropy(selected, labels[mask].long())


def hard_teacher_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the student against the teacher's argmax token, over the positions in `mask`.

    The teacher logits carry no gradient. Ties in the teacher's argmax resolve to the lowest token id.
    """
    _check_shapes(student_logits, teacher_logits, mask, "teacher_logits")
    return cross_entropy_loss(student_logits, teacher_logits.detach().argmax(dim=-1), mask)


def soft_teacher_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean token-level KL divergence KL(teacher || student) over the positions in `mask`.

    Both distributions are softmaxes of the logits divided by `temperature`. Tokens that the
    teacher gives probability zero add nothing, even where the student's logit is -inf.
    """
    _check_shapes(student_logits, teacher_logits, mask, "teacher_logits")
    if temperature <= 0:
        raise MaskTokError(f"temperature must be > 0, got {temperature!r}.")
    if teacher_logits.shape != student_logits.shape:
        raise MaskTokError(
            f"teacher_logits {tuple(teacher_logits.shape)} and student_logits {tuple(student_logits.shape)} must have "
            "the same shape (same vocabulary)."
        )
    mask = mask.bool()
    if not mask.any():
        return _empty_loss(student_logits)
    student_log_probs = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach()[mask].float() / temperature, dim=-1)
    teacher_probs = teacher_log_probs.exp()
    # Where the teacher's probability is zero, -inf - -inf would give NaN; those terms are zero by definition.
    log_ratio = (teacher_log_probs - student_log_probs).masked_fill(teacher_probs == 0, 0.0)
    return (teacher_probs * log_ratio).sum(dim=-1).mean()


def ground_truth_loss(student_logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the student against the dataset's own tokens `target_ids`, over the positions in `mask`."""
    return cross_entropy_loss(student_logits, target_ids, mask)


def distillation_loss(
    objective: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Dispatch to the loss named by `objective`: "hard", "soft" or "ground_truth"."""
    if objective == "hard":
        return hard_teacher_loss(student_logits, teacher_logits, mask)
    if objective == "soft":
        return soft_teacher_loss(student_logits, teacher_logits, mask)
    if objective == "ground_truth":
        return ground_truth_loss(student_logits, target_ids, mask)
    raise MaskTokError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
