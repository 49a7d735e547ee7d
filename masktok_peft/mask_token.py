"""Choosing, validating and initialising the mask token's embedding row.

The mask id reuses a row the tokenizer never produces, so the vocabulary does not change:
- a reserved special token (Llama-3 style `<|reserved_special_token_0|>`);
- else the first spare embedding row beyond the tokenizer (Qwen style: the matrix has more rows
  than the tokenizer has tokens);
- else one row past the end of the matrix. That row is virtual: the adapter's embedding layer
  supplies it, and the output layer has no logit for it, so it can never be emitted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import MaskTokError

logger = logging.getLogger(__name__)

RESERVED_MARKER = "reserved"


@dataclass(frozen=True)
class MaskTokenChoice:
    """A mask id and where its row comes from: 'reserved', 'spare', 'added' or 'explicit'."""

    token_id: int
    source: str


def special_token_ids(tokenizer=None, model_config=None, generation_config=None) -> dict[int, str]:
    """Collect the ids that text generation uses (EOS, BOS, PAD, UNK), mapped to their role."""
    roles: dict[int, str] = {}
    sources = [generation_config, model_config, tokenizer]
    for source in sources:
        if source is None:
            continue
        for role in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
            value = getattr(source, role, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            for token_id in values:
                if isinstance(token_id, int):
                    roles.setdefault(token_id, role.removesuffix("_id").upper().replace("_TOKEN", ""))
    return roles


def tokenizer_size(tokenizer) -> int:
    """Return one more than the largest id the tokenizer can produce."""
    largest = max(tokenizer.get_vocab().values(), default=-1)
    return max(len(tokenizer), largest + 1)


def _chat_template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(value) for value in template.values())
    return template or ""


def _reserved_candidates(tokenizer, embedding_rows: int, excluded: Iterable[int]) -> list[int]:
    excluded = set(excluded)
    template = _chat_template_text(tokenizer)
    candidates = []
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = getattr(added, "content", str(added))
        if not getattr(added, "special", False) or RESERVED_MARKER not in content.lower():
            continue
        if token_id in excluded or token_id >= embedding_rows or content in template:
            continue
        candidates.append(token_id)
    return sorted(candidates)


def select_mask_token(
    embedding_rows: int,
    tokenizer=None,
    special_ids: Optional[dict[int, str]] = None,
) -> MaskTokenChoice:
    """Choose a mask id that no text maps to, without resizing the model."""
    special_ids = special_ids or {}
    if tokenizer is not None:
        reserved = _reserved_candidates(tokenizer, embedding_rows, special_ids)
        if reserved:
            return MaskTokenChoice(reserved[0], "reserved")
        first_spare = tokenizer_size(tokenizer)
        if first_spare < embedding_rows and first_spare not in special_ids:
            return MaskTokenChoice(first_spare, "spare")
    else:
        logger.warning(
            "No tokenizer was found, so reserved tokens and spare rows cannot be distinguished from ordinary "
            "tokens; using a new row %d past the end of the embedding matrix as the mask row. Set "
            "tokenizer_name_or_path in MaskTokConfig to let a reserved or spare row be chosen.",
            embedding_rows,
        )
    return MaskTokenChoice(embedding_rows, "added")


def validate_mask_token_id(
    token_id: int,
    embedding_rows: int,
    tokenizer=None,
    special_ids: Optional[dict[int, str]] = None,
) -> MaskTokenChoice:
    """Check an explicit mask id, raising `MaskTokError` that names the id and the fix."""
    special_ids = special_ids or {}
    fix = "Pass mask_token_id=None to let the adapter choose a free row."
    if token_id < 0 or token_id > embedding_rows:
        raise MaskTokError(
            f"mask_token_id {token_id} is out of range: the embedding matrix has {embedding_rows} rows, so valid "
            f"ids are 0 to {embedding_rows - 1}, or {embedding_rows} to add one row. {fix}"
        )
    if token_id == embedding_rows:
        return MaskTokenChoice(token_id, "added")
    if token_id in special_ids:
        raise MaskTokError(
            f"mask_token_id {token_id} is the {special_ids[token_id]} token, which generation relies on. {fix}"
        )
    if tokenizer is None:
        logger.warning(
            "No tokenizer was found, so mask_token_id %d was checked only against the special ids %s.",
            token_id,
            sorted(special_ids),
        )
        return MaskTokenChoice(token_id, "explicit")

    if token_id >= tokenizer_size(tokenizer):
        return MaskTokenChoice(token_id, "spare")
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    token_text = tokenizer.convert_ids_to_tokens(token_id)
    if added is None or not getattr(added, "special", False):
        raise MaskTokError(
            f"mask_token_id {token_id} is the ordinary token {token_text!r}, which text encodes to. Use a reserved "
            f"special token or a spare row instead. {fix}"
        )
    if added.content in _chat_template_text(tokenizer):
        raise MaskTokError(
            f"mask_token_id {token_id} is the special token {added.content!r}, which the chat template uses. {fix}"
        )
    return MaskTokenChoice(token_id, "reserved" if RESERVED_MARKER in added.content.lower() else "explicit")


def initial_mask_row(
    weight: torch.Tensor,
    mode: str,
    token_id: int,
    reference_rows: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Compute the mask row's starting value from the embedding matrix `weight` ([rows, hidden])."""
    if mode == "existing":
        if token_id >= weight.shape[0]:
            raise MaskTokError(
                f"mask_init='existing' needs a row inside the embedding matrix, but mask_token_id {token_id} is "
                f"past its {weight.shape[0]} rows. Use mask_init='mean'."
            )
        return weight[token_id].detach().clone()

    rows = weight.detach()[: reference_rows or weight.shape[0]].float()
    mean = rows.mean(dim=0)
    if mode == "mean":
        return mean.to(weight.dtype)

    # mode == "normal": one draw from N(mean, covariance of the rows).
    centred = rows - mean
    covariance = centred.T @ centred / max(rows.shape[0] - 1, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    scale = eigenvalues.clamp(min=0).sqrt()
    noise = torch.randn(mean.shape[0], generator=generator, dtype=mean.dtype)
    return (mean + eigenvectors @ (scale * noise)).to(weight.dtype)
