"""Acceptance policies: how many of a forward pass's k proposals each row keeps.

A policy reads only the proposals of one pass (the chosen token and its confidence at each of the
k predicting positions) and returns one count per row, between 1 and k. It holds no state between
passes, so each policy is a pure function of its inputs and is tested without a model.

Position 0 of a pass is the last real token, which predicts the next token as ordinary decoding
does, so every policy keeps at least that one. The verify policy keeps all k proposals as a draft
and checks the draft against the base model's predictions in the next pass (`VerifyPolicy.verify`).
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
    verifies: ClassVar[bool] = False
    """True when the kept proposals are a draft that the next pass checks against the base model."""
    adapts_by_default: ClassVar[bool] = False
    """True when the number of proposals per pass follows recent acceptance unless the caller turns it off."""

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
    adapts_by_default = True

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


class VerifyPolicy(AcceptancePolicy):
    """Lossless decoding with a gated adapter: the mask slots' proposals are a draft that the base model checks.

    `accept` keeps all k proposals: the first is the base model's own next token, and the other
    k - 1 are fed as real tokens in the row's next pass. With a gated adapter, the real-token logits
    of that pass are the base model's logits, and `verify` keeps the longest prefix of the draft that
    they confirm plus one token of the base model's own. The output is therefore the base model's.
    """

    name = "verify"
    verifies = True
    adapts_by_default = True

    def accept(self, proposals: Proposals) -> torch.Tensor:
        batch, k = proposals.tokens.shape
        return torch.full((batch,), k, dtype=torch.long, device=proposals.tokens.device)

    @staticmethod
    def verify(scores: torch.Tensor, draft: torch.Tensor, do_sample: bool) -> tuple[int, int]:
        """Check one row's draft against the base model and return (accepted draft tokens, next token).

        `scores` [m + 1, vocab] are the base model's processed scores: row i is the distribution of
        the token at draft position i given the context and draft[:i], and row m the distribution
        after the whole draft. `draft` [m] are the proposed token ids. The next token follows the
        accepted prefix: the correction at the first rejected position, or a token from row m when
        the whole draft is accepted, so every call yields at least one token.

        Greedy: a draft token is accepted while it equals the argmax of its row. Sampling: the
        draft is greedy, so its proposal distribution q is one-hot at each draft token, and
        speculative rejection sampling accepts token d with probability min(1, p(d) / q(d)) = p(d).
        A rejected position is resampled from normalize(max(0, p - q)), which is p with d removed.
        Either way each emitted token has the base model's processed distribution.
        """
        num_draft = draft.shape[0]
        if scores.dim() != 2 or scores.shape[0] != num_draft + 1:
            raise MaskTokError(
                f"verify needs one score row per draft token plus one, got scores of shape {tuple(scores.shape)} for "
                f"a draft of {num_draft} tokens."
            )
        if not do_sample:
            targets = scores.argmax(dim=-1)  # [m + 1]
            matches = (targets[:num_draft] == draft).long()
            accepted = int(torch.cumprod(matches, dim=0).sum()) if num_draft else 0
            return accepted, int(targets[accepted])

        probabilities = torch.softmax(scores.float(), dim=-1)  # [m + 1, vocab]
        accepted = 0
        if num_draft:
            draft_probabilities = probabilities[:num_draft].gather(1, draft[:, None]).squeeze(1)  # [m]
            # One uniform draw per position; only the draws up to the first rejection are used.
            uniform = torch.rand(num_draft, device=scores.device)
            matches = (uniform < draft_probabilities).long()
            accepted = int(torch.cumprod(matches, dim=0).sum())
        if accepted < num_draft:
            residual = probabilities[accepted].clone()
            residual[draft[accepted]] = 0.0
            # The draft token was rejected, so it had probability below 1 and the residual has positive mass.
            return accepted, int(torch.multinomial(residual / residual.sum(), num_samples=1))
        return accepted, int(torch.multinomial(probabilities[accepted], num_samples=1))


POLICIES: dict[str, type[AcceptancePolicy]] = {
    policy.name: policy for policy in (ConfAdaptPolicy, StaticPolicy, OffPolicy, VerifyPolicy)
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
