"""One self-distillation step: student and teacher passes over mask blocks, the loss, and its statistics.

For a prefix x_1..x_i and a block size k, the student (adapter on) reads x_1..x_i followed by
k-1 mask tokens and predicts k tokens: the last real position predicts x_{i+1}, mask slot j
predicts x_{i+1+j}. The teacher (the same model with the adapter disabled) reads the same layout
with the student's own argmax tokens written into the slots. Its argmax at each position is the
label for the student's position ("hard teacher"). The "soft" objective uses the teacher's whole
distribution, the "ground_truth" objective the dataset's own next tokens.

Two layouts compute the same thing. "packed" interleaves regions of text and mask slots in one
sequence (works with any masktok adapter). "cached" runs the text once without gradients and
then only the mask slots (gated adapters only: it relies on real tokens seeing the base model).
This module does not draw k: the trainer chooses it for each step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from ..config import MaskTokConfig
from ..errors import MaskTokError
from .cached import run_slot_pass, run_text_pass
from .layout import (
    build_block_slots,
    build_packed_layout,
    check_block_size,
    model_attention_mask,
    sample_block_ends,
)
from .losses import OBJECTIVES, distillation_loss

logger = logging.getLogger(__name__)

LAYOUTS = ("packed", "cached")


@dataclass
class DistillationOutput:
    """Loss and statistics of one distillation step."""

    loss: torch.Tensor  # scalar, differentiable with respect to the adapter parameters
    agreement: torch.Tensor  # [max_k] rate of student argmax == teacher label at each offset, NaN where unused
    confidence: torch.Tensor  # scalar: mean top-1 probability of the student at supervised positions
    tokens_per_pass: torch.Tensor  # scalar: mean accepted length per block under ConfAdapt (estimate)
    num_positions: int  # number of supervised positions in the batch


@dataclass
class BlockPredictions:
    """Student and teacher logits for n blocks of k predictions per row, with their targets."""

    student_logits: torch.Tensor  # [batch, n, k, vocab] float32, with gradients where the adapter acts
    teacher_logits: torch.Tensor  # [batch, n, k, vocab] float32, no gradients
    target_ids: torch.Tensor  # [batch, n, k] the dataset's token at each predicted position (0 past the end)
    loss_mask: torch.Tensor  # [batch, n, k] bool, True where the prediction is supervised


@dataclass
class BlockStatistics:
    """Agreement, confidence and ConfAdapt tokens per pass of a batch of block predictions."""

    agreement: torch.Tensor  # [max_k]
    confidence: torch.Tensor  # scalar
    tokens_per_pass: torch.Tensor  # scalar


@torch.no_grad()
def block_statistics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    threshold: float,
    max_k: int,
) -> BlockStatistics:
    """Measure how the student's blocks [batch, n, k, vocab] compare with the teacher's argmax labels.

    - agreement[j]: share of supervised offset-j positions where the student's argmax equals the
      teacher's; NaN for offsets with no supervised position (and for j >= k).
    - confidence: mean top-1 probability of the student over supervised positions.
    - tokens_per_pass: ConfAdapt's accepted length per block, averaged over blocks whose offset 0
      is supervised. A block accepts the longest prefix of offsets that are supervised, have
      confidence >= threshold and match the teacher label, and at least one token. It is an
      estimate of decoding speed: real decoding feeds the accepted tokens back and may differ.
    """
    mask = loss_mask.bool()
    k = student_logits.shape[2]
    student_tokens = student_logits.argmax(dim=-1)  # [batch, n, k]
    agrees = student_tokens == teacher_logits.argmax(dim=-1)
    top1 = (student_logits.max(dim=-1).values - student_logits.logsumexp(dim=-1)).exp()  # [batch, n, k]

    nan = torch.tensor(float("nan"), device=student_logits.device)
    counts = mask.sum(dim=(0, 1)).float()  # [k]
    agreement = torch.full((max_k,), float("nan"), device=student_logits.device)
    agreement[:k] = torch.where(counts > 0, (agrees & mask).sum(dim=(0, 1)).float() / counts.clamp(min=1), nan)
    confidence = top1[mask].mean() if mask.any() else nan

    accepted = mask & agrees & (top1 >= threshold)
    prefix_length = accepted.long().cumprod(dim=-1).sum(dim=-1).clamp(min=1)  # [batch, n]
    counted = mask[:, :, 0]
    tokens_per_pass = prefix_length[counted].float().mean() if counted.any() else nan
    return BlockStatistics(agreement=agreement, confidence=confidence, tokens_per_pass=tokens_per_pass)


def unwrap_peft_model(model: nn.Module) -> PeftModel:
    """Return the PeftModel inside `model` (itself, or the `.module` of a DistributedDataParallel-style wrapper)."""
    inner = model
    while not isinstance(inner, PeftModel) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not isinstance(inner, PeftModel):
        raise MaskTokError(
            f"distillation_step needs a peft.PeftModel carrying a masktok adapter, got {type(model).__name__}. "
            "Wrap the model with peft.get_peft_model(model, MaskTokConfig(...))."
        )
    return inner


def active_masktok_config(peft_model: PeftModel) -> MaskTokConfig:
    """Return the MaskTokConfig of the active adapter, or raise MaskTokError when it is not a masktok adapter."""
    config = peft_model.peft_config.get(peft_model.active_adapter)
    if not isinstance(config, MaskTokConfig):
        raise MaskTokError(
            f"The active adapter {peft_model.active_adapter!r} is a {type(config).__name__}, not a MaskTokConfig. "
            "Call set_adapter() with the masktok adapter's name."
        )
    return config


@contextmanager
def base_model_mode(peft_model: PeftModel) -> Iterator[None]:
    """Run the enclosed passes as the teacher: adapter disabled, no gradients, eval mode (no dropout).

    Each module's training flag is restored afterwards, so the caller's mode is left as it was.
    """
    training_flags = [(module, module.training) for module in peft_model.modules()]
    peft_model.eval()
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield
    finally:
        for module, flag in training_flags:
            module.training = flag


def _check_full_attention(model_config) -> None:
    layer_types = getattr(model_config, "layer_types", None) or []
    other = sorted({layer_type for layer_type in layer_types if layer_type != "full_attention"})
    if other:
        raise MaskTokError(
            f"This model has {other} layers, but masktok training supports only models whose every layer uses full "
            "attention, because the block attention mask replaces each layer's own mask."
        )


def _mask_out_token(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Return float32 logits with the mask token's logit at -inf, when the mask id has a logit at all.

    The fill is in place, because the logits of many slots are large and the model's output is not reused.
    """
    logits = logits.float()
    if mask_token_id < logits.shape[-1]:
        logits.index_fill_(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    return logits


def _gather_targets(input_ids: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """Return input_ids at `target_index` ([R, k] shared or [batch, n, k]), 0 where the index is past the text."""
    batch, seq_len = input_ids.shape
    inside = target_index < seq_len
    clamped = target_index.clamp(max=seq_len - 1)
    if target_index.dim() == 2:
        targets = input_ids[:, clamped]
    else:
        targets = torch.gather(input_ids, 1, clamped.reshape(batch, -1)).view_as(clamped)
    return torch.where(inside, targets, torch.zeros_like(targets))


def packed_predictions(
    model: nn.Module,
    input_ids: torch.Tensor,
    supervised_mask: torch.Tensor,
    k: int,
    region_size: int,
    offset: int,
) -> BlockPredictions:
    """Run the student and teacher over the packed layout with the region grid shifted by `offset`."""
    peft_model = unwrap_peft_model(model)
    mask_token_id = active_masktok_config(peft_model).mask_token_id
    base_config = peft_model.get_base_model().config
    layout = build_packed_layout(input_ids, supervised_mask, k, mask_token_id, region_size, offset)
    batch = input_ids.shape[0]
    num_regions = layout.predict_index.shape[0]
    dtype = peft_model.get_input_embeddings().weight.dtype
    attention_mask = model_attention_mask(layout.attention_mask, base_config._attn_implementation, dtype)
    position_ids = layout.position_ids.expand(batch, -1)
    keep = layout.predict_index.reshape(-1)  # [R * k] predicting positions, the same for every row

    student = model(
        input_ids=layout.input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=keep,
    )
    student_logits = _mask_out_token(student.logits, mask_token_id).view(batch, num_regions, k, -1)

    teacher_ids = layout.with_slot_tokens(student_logits.detach().argmax(dim=-1))
    with base_model_mode(peft_model):
        teacher = peft_model(
            input_ids=teacher_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep,
        )
    teacher_logits = _mask_out_token(teacher.logits, mask_token_id).view(batch, num_regions, k, -1)
    return BlockPredictions(
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        target_ids=_gather_targets(input_ids, layout.target_index),
        loss_mask=layout.loss_mask,
    )


def cached_predictions(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    supervised_mask: torch.Tensor,
    k: int,
    block_end: torch.Tensor,
    block_valid: torch.Tensor,
) -> BlockPredictions:
    """Run the cached gated path for blocks whose last real token sits at `block_end` [batch, n].

    The offset-0 prediction of each block is the text pass's own logit at its last real token,
    shared by student and teacher and without gradient (with a gated adapter both equal the
    base model there). Only the mask slots run with the adapter and gradients.
    """
    peft_model = unwrap_peft_model(model)
    config = active_masktok_config(peft_model)
    if not config.gated:
        raise MaskTokError(
            "layout='cached' needs a gated adapter (MaskTokConfig(gated=True)), because it reuses the base model's "
            "keys and values for the real tokens. Use layout='packed' for an ungated adapter."
        )
    mask_token_id = config.mask_token_id
    base_config = peft_model.get_base_model().config
    slots = build_block_slots(block_end, block_valid, supervised_mask, k, mask_token_id)
    batch, num_blocks, _ = slots.target_index.shape
    dtype = peft_model.get_input_embeddings().weight.dtype
    slot_attention = model_attention_mask(slots.attention_mask, base_config._attn_implementation, dtype)

    with base_model_mode(peft_model):
        text_logits, prefix = run_text_pass(peft_model, input_ids, attention_mask, slots.block_end)
    text_logits = _mask_out_token(text_logits, mask_token_id)[:, :, None]  # [batch, n, 1, vocab]

    student_slots = _mask_out_token(run_slot_pass(model, slots.input_ids, slots, slot_attention, prefix), mask_token_id)
    student_logits = torch.cat([text_logits, student_slots], dim=2)  # [batch, n, k, vocab]

    student_tokens = student_logits.detach().argmax(dim=-1)  # [batch, n, k]
    teacher_ids = student_tokens[:, :, :-1].reshape(batch, -1)  # slot j contains the proposal of offset j-1
    with base_model_mode(peft_model):
        teacher_slots = run_slot_pass(peft_model, teacher_ids, slots, slot_attention, prefix)
    teacher_logits = torch.cat([text_logits, _mask_out_token(teacher_slots, mask_token_id)], dim=2)
    return BlockPredictions(
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        target_ids=_gather_targets(input_ids, slots.target_index),
        loss_mask=slots.loss_mask,
    )


def _check_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, supervised_mask: torch.Tensor, mask_token_id: int
) -> None:
    if input_ids.dim() != 2:
        raise MaskTokError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}.")
    for name, tensor in (("attention_mask", attention_mask), ("supervised_mask", supervised_mask)):
        if tensor.shape != input_ids.shape:
            raise MaskTokError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(input_ids.shape)} like input_ids."
            )
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise MaskTokError("attention_mask must be right-padded (ones, then zeros in each row). Pad on the right.")
    if (supervised_mask.bool() & ~attention_mask.bool()).any():
        raise MaskTokError("supervised_mask is True at a padding position. Supervise only positions of the text.")
    if (input_ids == mask_token_id).any():
        raise MaskTokError(
            f"input_ids contains the mask token id {mask_token_id}. Training text must not contain the mask token."
        )


def _zero_loss(peft_model: PeftModel) -> torch.Tensor:
    """Return a zero loss connected to every trainable parameter, for a batch with no block at all."""
    parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    if not parameters:
        return torch.zeros(())
    return sum(parameter.sum() for parameter in parameters) * 0.0


def distillation_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    supervised_mask: torch.Tensor,
    k: int,
    *,
    objective: str = "hard",
    layout: str = "packed",
    region_size: int = 32,
    blocks_per_sequence: int | None = None,
    threshold: float = 0.9,
    generator: torch.Generator | None = None,
) -> DistillationOutput:
    """Compute the self-distillation loss and statistics of one batch for blocks of k predictions.

    `input_ids`, `attention_mask` and `supervised_mask` are [batch, seq_len], right-padded;
    `supervised_mask` is True where a token may be predicted. `model` is a PeftModel with an
    active masktok adapter, or a wrapper (DistributedDataParallel) around one: the student pass
    runs through `model`, the no-gradient passes through the PeftModel itself.

    The packed layout draws a random grid offset from `generator`. The cached layout draws
    `blocks_per_sequence` block positions per row, or with None takes every position whose next
    token is supervised. Memory of the cached layout grows with the number of blocks times k times the
    vocabulary size, because every slot's logits are kept for the backward pass.
    """
    peft_model = unwrap_peft_model(model)
    config = active_masktok_config(peft_model)
    base_config = peft_model.get_base_model().config
    check_block_size(k, region_size if layout == "packed" else None)
    if k > config.max_k:
        raise MaskTokError(f"k must be at most the adapter's max_k = {config.max_k}, got {k}.")
    if objective not in OBJECTIVES:
        raise MaskTokError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if layout not in LAYOUTS:
        raise MaskTokError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if blocks_per_sequence is not None and (isinstance(blocks_per_sequence, bool) or blocks_per_sequence < 1):
        raise MaskTokError(f"blocks_per_sequence must be a positive integer or None, got {blocks_per_sequence!r}.")
    if not 0.0 < threshold <= 1.0:
        raise MaskTokError(f"threshold must be in (0, 1], got {threshold!r}.")
    _check_inputs(input_ids, attention_mask, supervised_mask, config.mask_token_id)
    _check_full_attention(base_config)
    supervised_mask = supervised_mask.bool()

    if layout == "packed":
        real_per_region = region_size - (k - 1)
        offset = int(torch.randint(real_per_region, (1,), generator=generator, device=_generator_device(generator)))
        predictions = packed_predictions(model, input_ids, supervised_mask, k, region_size, offset)
    else:
        block_end, block_valid = sample_block_ends(supervised_mask, blocks_per_sequence, generator)
        if block_end.shape[1] == 0:
            logger.debug("Batch has no supervised position to start a block at, so the loss is zero.")
            nan = torch.tensor(float("nan"))
            return DistillationOutput(_zero_loss(peft_model), torch.full((config.max_k,), float("nan")), nan, nan, 0)
        predictions = cached_predictions(model, input_ids, attention_mask, supervised_mask, k, block_end, block_valid)

    loss = distillation_loss(
        objective, predictions.student_logits, predictions.teacher_logits, predictions.target_ids, predictions.loss_mask
    )
    statistics = block_statistics(
        predictions.student_logits.detach(), predictions.teacher_logits, predictions.loss_mask, threshold, config.max_k
    )
    return DistillationOutput(
        loss=loss,
        agreement=statistics.agreement,
        confidence=statistics.confidence,
        tokens_per_pass=statistics.tokens_per_pass,
        num_positions=int(predictions.loss_mask.sum()),
    )


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")
