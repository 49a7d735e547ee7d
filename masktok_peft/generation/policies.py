"""Acceptance policies: how many of a forward pass's k proposals each row keeps.

A policy reads only the proposals of one pass (the chosen token and its confidence at each of the
k predicting positions) and returns one count per row, between 1 and k. It holds no state between
passes, so each policy is a pure function of its inputs and is tested without a model.

Position 0 of a pass is the last real token, which predicts the next token as ordinary decoding
does, so every policy keeps at least that one. A verifying policy, which checks the previous pass's
proposals against the next pass's real-token predictions, is meant to be one more subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import MaskTokError

DEFAULT_POLICY = "confadapt"


@dataclass(frozen=True)
class Proposals:
    """The tokens chosen at the k predicting positions of one pass, for each row."""

    tokens: torch.Tensor
    """[batch, k] token ids: position 0 predicts the next token, position j the token j places later."""

    confidence: torch.Tensor
    """[batch, k] probability of each chosen token under the processed distribution it was chosen from."""

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape != self.confidence.shape:
            raise MaskTokError(
                f"Proposals need tokens and confidence of the same [batch, k] shape, got {tuple(self.tokens.shape)} "
                f"and {tuple(self.confidence.shape)}."
            )


class AcceptancePolicy(ABC):
    """Interface of an acceptance policy: the pass width and the number of proposals kept per row."""

    name: ClassVar[str]

    def proposals_per_pass(self, max_k: int) -> int:
        """Return k, the number of predicting positions per pass (the last real token plus k - 1 mask slots)."""
        return max_k

    @abstractmethod
    def accept(self, proposals: Proposals) -> torch.Tensor:
        """Return a [batch] long tensor with the number of leading proposals each row keeps, in [1, k]."""

    def describe(self) -> dict[str, object]:
        """Return the policy's name and settings, for the statistics of a generation."""
        return {"policy": self.name}


class ConfAdaptPolicy(AcceptancePolicy):
    """Keep the longest run of leading proposals whose confidence is at least `threshold`, and at least one.

    With greedy decoding the confidence is the top-1 probability of each position, which is the
    ConfAdapt rule of Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation" (2026).
    """

    name = "confadapt"

    def __init__(self, threshold: float) -> None:
        self.threshold = validate_threshold(threshold)

    def accept(self, proposals: Proposals) -> torch.Tensor:
        confident = (proposals.confidence >= self.threshold).long()  # [batch, k]
        leading_run = torch.cumprod(confident, dim=1).sum(dim=1)  # [batch]: confident positions before the first miss
        return leading_run.clamp(min=1)

    def describe(self) -> dict[str, object]:
        return {"policy": self.name, "threshold": self.threshold}


class StaticPolicy(AcceptancePolicy):
    """Keep all k proposals every pass: the fastest policy, and the one that loses accuracy fastest as k grows."""

    name = "static"

    def accept(self, proposals: Proposals) -> torch.Tensor:
        batch, k = proposals.tokens.shape
        return torch.full((batch,), k, dtype=torch.long, device=proposals.tokens.device)


class OffPolicy(StaticPolicy):
    """Ordinary one-token decoding with the same model: no mask slots, one token per pass."""

    name = "off"

    def proposals_per_pass(self, max_k: int) -> int:
        return 1


POLICIES: dict[str, type[AcceptancePolicy]] = {
    policy.name: policy for policy in (ConfAdaptPolicy, StaticPolicy, OffPolicy)
}


def validate_threshold(threshold: object) -> float:
    """Return `threshold` as a float, or raise MaskTokError unless it is a number in (0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise MaskTokError(f"masktok_threshold must be a number in (0, 1], got {threshold!r}.")
    if not 0.0 < threshold <= 1.0:
        raise MaskTokError(
            f"masktok_threshold must be in (0, 1], got {threshold!r}. Use a value such as 0.9; 1.0 keeps only "
            "proposals the model is certain of."
        )
    return float(threshold)


def build_policy(name: object, threshold: float) -> AcceptancePolicy:
    """Build the policy called `name`; `threshold` is used by the policies that read confidence."""
    if not isinstance(name, str) or name not in POLICIES:
        raise MaskTokError(f"Unknown masktok_policy {name!r}. Use one of {sorted(POLICIES)}.")
    if name == ConfAdaptPolicy.name:
        return ConfAdaptPolicy(threshold)
    return POLICIES[name]()
