"""Known-answer tests of the distillation losses (no model needed)."""

import math

import pytest
import torch
import torch.nn.functional as F

from masktok_peft import MaskTokError
from masktok_peft.training.losses import (
    cross_entropy_loss,
    distillation_loss,
    ground_truth_loss,
    hard_teacher_loss,
    soft_teacher_loss,
)


def _logits_of(probabilities):
    return torch.tensor(probabilities).log()


def test_hard_loss_hand_computed():
    student = _logits_of([[0.25, 0.75], [0.6, 0.4]])
    teacher = torch.tensor([[0.0, 5.0], [1.0, 3.0]])  # argmax 1 at both positions
    mask = torch.tensor([True, True])
    expected = -(math.log(0.75) + math.log(0.4)) / 2
    assert hard_teacher_loss(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)


def test_hard_loss_ignores_masked_positions():
    student = torch.randn(2, 3, 7)
    teacher = torch.randn(2, 3, 7)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[~mask] = 100 * torch.randn_like(changed_student[~mask])
    changed_teacher[~mask] = 100 * torch.randn_like(changed_teacher[~mask])
    assert hard_teacher_loss(student, teacher, mask) == hard_teacher_loss(changed_student, changed_teacher, mask)


def test_hard_loss_gives_teacher_no_gradient():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    hard_teacher_loss(student, teacher, torch.ones(4, dtype=torch.bool)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_soft_loss_zero_for_identical_distributions():
    logits = torch.randn(3, 4, 11)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert soft_teacher_loss(logits, logits.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_loss_hand_computed():
    student = _logits_of([[0.5, 0.5]])
    teacher = _logits_of([[0.75, 0.25]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    loss = soft_teacher_loss(student, teacher, torch.tensor([True]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_soft_loss_matches_torch_kl_div():
    student = torch.randn(6, 9)
    teacher = torch.randn(6, 9)
    mask = torch.tensor([True, False, True, True, False, True])
    reference = F.kl_div(
        F.log_softmax(student[mask], -1), F.log_softmax(teacher[mask], -1), log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(soft_teacher_loss(student, teacher, mask), reference)


def test_soft_loss_with_temperature():
    student = torch.randn(5, 8)
    teacher = torch.randn(5, 8)
    mask = torch.ones(5, dtype=torch.bool)
    expected = soft_teacher_loss(student / 2.0, teacher / 2.0, mask)
    torch.testing.assert_close(soft_teacher_loss(student, teacher, mask, temperature=2.0), expected)
    with pytest.raises(MaskTokError, match="temperature"):
        soft_teacher_loss(student, teacher, mask, temperature=0.0)


def test_soft_loss_ignores_masked_positions():
    student = torch.randn(4, 6)
    teacher = torch.randn(4, 6)
    mask = torch.tensor([True, False, False, True])
    changed = student.clone()
    changed[1:3] = 50.0
    assert soft_teacher_loss(student, teacher, mask) == soft_teacher_loss(changed, teacher, mask)


def test_losses_finite_with_masked_out_token():
    # The mask token's logit is -inf on both sides; loss and gradient must stay finite.
    student = torch.randn(3, 6)
    teacher = torch.randn(3, 6)
    student[:, 4] = float("-inf")
    teacher[:, 4] = float("-inf")
    student.requires_grad_(True)
    mask = torch.ones(3, dtype=torch.bool)
    for loss in (soft_teacher_loss(student, teacher, mask), hard_teacher_loss(student, teacher, mask)):
        assert torch.isfinite(loss)
        (gradient,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(gradient).all()
        assert (gradient[:, 4] == 0).all()


def test_ground_truth_loss_hand_computed():
    student = _logits_of([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
    targets = torch.tensor([2, 0, 1])
    mask = torch.tensor([True, True, False])
    expected = -(math.log(0.7) + math.log(0.3)) / 2
    assert ground_truth_loss(student, targets, mask).item() == pytest.approx(expected, rel=1e-6)


def test_empty_mask_gives_zero_loss_that_backpropagates():
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for objective in ("hard", "soft", "ground_truth"):
        loss = distillation_loss(objective, student, teacher, torch.zeros(2, 3, dtype=torch.long), mask)
        assert loss.item() == 0.0
        (gradient,) = torch.autograd.grad(loss, student)
        assert (gradient == 0).all()


def test_losses_computed_in_float32():
    student = torch.randn(4, 10).bfloat16()
    teacher = torch.randn(4, 10).bfloat16()
    mask = torch.ones(4, dtype=torch.bool)
    assert soft_teacher_loss(student, teacher, mask).dtype == torch.float32
    assert hard_teacher_loss(student, teacher, mask).dtype == torch.float32


def test_distillation_loss_dispatch():
    student = torch.randn(3, 5)
    teacher = torch.randn(3, 5)
    targets = torch.tensor([1, 2, 3])
    mask = torch.ones(3, dtype=torch.bool)
    assert distillation_loss("hard", student, teacher, targets, mask) == hard_teacher_loss(student, teacher, mask)
    assert distillation_loss("soft", student, teacher, targets, mask) == soft_teacher_loss(student, teacher, mask)
    assert distillation_loss("ground_truth", student, teacher, targets, mask) == cross_entropy_loss(
        student, targets, mask
    )
    with pytest.raises(MaskTokError, match="objective"):
        distillation_loss("kl", student, teacher, targets, mask)


def test_loss_rejects_mismatched_mask():
    with pytest.raises(MaskTokError, match="mask has shape"):
        hard_teacher_loss(torch.randn(3, 5), torch.randn(3, 5), torch.ones(2, dtype=torch.bool))
