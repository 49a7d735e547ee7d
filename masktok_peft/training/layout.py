"""Training layouts: where the mask blocks sit, which positions they use, and what each slot may attend to.

Two layouts place blocks of k predictions (the last real token of a prefix plus k-1 mask slots):

- The packed layout splits the text into regions of `region_size` slots: P = region_size - (k-1)
  real tokens followed by k-1 mask slots. The next region restarts at the first token that the
  previous region masked, so every real token appears once and in order. Real tokens attend
  causally to earlier real tokens only. Mask slots attend to every real token up to their
  region's last one, and causally to the earlier slots of their own region.
- The block-slot layout of the cached path contains only mask slots. They attend to the keys and
  values of the text computed beforehand (the first `seq_len` keys) and to the earlier slots of
  their own block.

A mask slot takes the position id of the token it stands for: slot j of a block whose last real
token sits at position i has position i + j. Every function here works on whole tensors, without
a Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MaskTokError

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class PackedLayout:
    """Packed student input for a batch: R regions of real tokens, each followed by k-1 mask slots.

    T = seq_len + R * (k - 1) is the packed length. The layout is the same for every row of the
    batch. Only `input_ids` and `loss_mask` differ between rows.
    """

    input_ids: torch.Tensor  # [batch, T] the text's tokens, with the mask id in the slots
    position_ids: torch.Tensor  # [1, T] source position of each packed slot
    attention_mask: torch.Tensor  # [1, 1, T, T] bool, True where the query (row) may attend to the key (column)
    predict_index: torch.Tensor  # [R, k] packed index of each region's k predicting positions
    target_index: torch.Tensor  # [R, k] source index of the token each predicting position predicts
    block_end: torch.Tensor  # [R] source index of each region's last real token
    loss_mask: torch.Tensor  # [batch, R, k] bool, True where the prediction is supervised

    @property
    def slot_index(self) -> torch.Tensor:
        """Packed index of each region's k-1 mask slots, [R, k-1]."""
        return self.predict_index[:, 1:]

    def with_slot_tokens(self, block_tokens: torch.Tensor) -> torch.Tensor:
        """Return `input_ids` with the slots of each region filled from `block_tokens` [batch, R, k].

        Slot j receives the token predicted at offset j-1, the student's proposal for the token the
        slot stands for. The teacher pass reads the student's own tokens this way.
        """
        filled = self.input_ids.clone()
        batch = filled.shape[0]
        filled[:, self.slot_index.reshape(-1)] = block_tokens[:, :, :-1].reshape(batch, -1)
        return filled


@dataclass(frozen=True)
class BlockSlots:
    """Mask slots of n blocks per row for the cached path, attending to precomputed keys of the text.

    S = n * (k-1) slots per row. Keys are ordered as [text (seq_len) + slots (S)].
    """

    input_ids: torch.Tensor  # [batch, S] the mask id everywhere
    position_ids: torch.Tensor  # [batch, S] source position each slot stands for
    attention_mask: torch.Tensor  # [batch, 1, S, seq_len + S] bool, True where the slot may attend to the key
    target_index: torch.Tensor  # [batch, n, k] source index predicted at each offset of each block
    block_end: torch.Tensor  # [batch, n] source index of each block's last real token
    loss_mask: torch.Tensor  # [batch, n, k] bool, True where the prediction is supervised


def check_block_size(k: int, region_size: int | None = None) -> None:
    """Raise MaskTokError unless k (and the region size, when given) can form a block."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise MaskTokError(f"k must be an integer >= 2 (one real prediction plus at least one mask slot), got {k!r}.")
    if region_size is None:
        return
    if isinstance(region_size, bool) or not isinstance(region_size, int) or region_size <= k - 1:
        raise MaskTokError(
            f"region_size must be an integer larger than k - 1 = {k - 1} so that a region contains at least one real "
            f"token, got {region_size!r}. Raise region_size or lower k."
        )


def supervised_targets(supervised_mask: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """Return whether each target index is inside the text and supervised.

    `supervised_mask` is [batch, seq_len], and `target_index` is [R, k] (shared by all rows) or
    [batch, n, k]. The result is [batch, R or n, k] bool.
    """
    batch, seq_len = supervised_mask.shape
    inside = target_index < seq_len
    clamped = target_index.clamp(max=seq_len - 1)
    if target_index.dim() == 2:
        supervised = supervised_mask[:, clamped]  # [batch, R, k]
    else:
        supervised = torch.gather(supervised_mask, 1, clamped.reshape(batch, -1)).view_as(clamped)
    return supervised & inside


def build_packed_layout(
    input_ids: torch.Tensor,
    supervised_mask: torch.Tensor,
    k: int,
    mask_token_id: int,
    region_size: int,
    offset: int = 0,
) -> PackedLayout:
    """Build the packed layout of a right-padded batch [batch, seq_len] for blocks of k predictions.

    `offset` shifts the region grid. The first region contains P - offset real tokens, where
    P = region_size - (k-1), and every later region contains P (the last one may contain fewer).
    """
    check_block_size(k, region_size)
    batch, seq_len = input_ids.shape
    if seq_len == 0:
        raise MaskTokError("input_ids has no tokens (seq_len is 0). Pass at least one token per row.")
    num_slots = k - 1
    real_per_region = region_size - num_slots
    if not 0 <= offset < real_per_region:
        raise MaskTokError(
            f"offset must be in [0, {real_per_region}) for region_size {region_size} and k {k}, got {offset}."
        )
    device = input_ids.device

    token = torch.arange(seq_len, device=device)
    token_region = (token + offset) // real_per_region  # [seq_len]
    num_regions = int(token_region[-1]) + 1
    region = torch.arange(num_regions, device=device)
    block_end = ((region + 1) * real_per_region - offset).clamp(max=seq_len) - 1  # [R]

    slot_number = torch.arange(1, k, device=device)  # [k-1], slot j = 1..k-1
    real_packed = token + num_slots * token_region  # [seq_len]
    predict_index = (block_end + num_slots * region)[:, None] + torch.arange(k, device=device)  # [R, k]
    slot_packed = predict_index[:, 1:]  # [R, k-1]
    packed_len = seq_len + num_slots * num_regions

    # Per packed index: the source position it stands for, its region, and its slot number (0 = real token).
    source = torch.empty(packed_len, dtype=torch.long, device=device)
    source[real_packed] = token
    source[slot_packed] = block_end[:, None] + slot_number
    packed_region = torch.empty(packed_len, dtype=torch.long, device=device)
    packed_region[real_packed] = token_region
    packed_region[slot_packed] = region[:, None].expand(-1, num_slots)
    packed_slot_number = torch.zeros(packed_len, dtype=torch.long, device=device)
    packed_slot_number[slot_packed] = slot_number.expand(num_regions, -1)
    is_slot = packed_slot_number > 0

    # A real token attends to real tokens up to its own position, and a slot to real tokens up to its region's last one.
    visible_until = torch.where(is_slot, block_end[packed_region], source)  # [T]
    sees_real = ~is_slot[None, :] & (source[None, :] <= visible_until[:, None])
    sees_slot = (
        is_slot[:, None]
        & is_slot[None, :]
        & (packed_region[:, None] == packed_region[None, :])
        & (packed_slot_number[None, :] <= packed_slot_number[:, None])
    )
    attention_mask = (sees_real | sees_slot)[None, None]  # [1, 1, T, T]

    packed_ids = input_ids.new_full((batch, packed_len), mask_token_id)
    packed_ids[:, real_packed] = input_ids
    target_index = block_end[:, None] + 1 + torch.arange(k, device=device)  # [R, k]
    return PackedLayout(
        input_ids=packed_ids,
        position_ids=source[None],
        attention_mask=attention_mask,
        predict_index=predict_index,
        target_index=target_index,
        block_end=block_end,
        loss_mask=supervised_targets(supervised_mask, target_index),
    )


def build_block_slots(
    block_end: torch.Tensor,
    block_valid: torch.Tensor,
    supervised_mask: torch.Tensor,
    k: int,
    mask_token_id: int,
) -> BlockSlots:
    """Build the mask slots of the cached path for blocks ending at `block_end` [batch, n].

    Blocks where `block_valid` is False are placeholders for rows with fewer blocks than n. They
    attend to the first token only and take no part in the loss.
    """
    check_block_size(k)
    batch, seq_len = supervised_mask.shape
    num_blocks = block_end.shape[1]
    num_slots = k - 1
    device = block_end.device

    block_end = torch.where(block_valid, block_end, torch.zeros_like(block_end))
    slot_number = torch.arange(1, k, device=device)  # [k-1]
    position_ids = (block_end[:, :, None] + slot_number).reshape(batch, -1)  # [batch, S]

    # Text keys: a slot attends to the text up to its block's last real token.
    text_position = torch.arange(seq_len, device=device)
    slot_block_end = block_end.repeat_interleave(num_slots, dim=1)  # [batch, S]
    sees_text = text_position[None, None, :] <= slot_block_end[:, :, None]  # [batch, S, seq_len]

    # Slot keys: a slot attends to the slots of its own block up to itself, the same pattern for every row.
    slot_block = torch.arange(num_blocks, device=device).repeat_interleave(num_slots)  # [S]
    slot_j = slot_number.repeat(num_blocks)  # [S]
    sees_slot = (slot_block[:, None] == slot_block[None, :]) & (slot_j[None, :] <= slot_j[:, None])  # [S, S]
    attention_mask = torch.cat([sees_text, sees_slot.expand(batch, -1, -1)], dim=2)[:, None]

    target_index = block_end[:, :, None] + 1 + torch.arange(k, device=device)  # [batch, n, k]
    loss_mask = supervised_targets(supervised_mask, target_index) & block_valid[:, :, None]
    return BlockSlots(
        input_ids=block_end.new_full((batch, num_blocks * num_slots), mask_token_id),
        position_ids=position_ids,
        attention_mask=attention_mask,
        target_index=target_index,
        block_end=block_end,
        loss_mask=loss_mask,
    )


def sample_block_ends(
    supervised_mask: torch.Tensor,
    blocks_per_sequence: int | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose block positions for the cached path: (block_end [batch, n], block_valid [batch, n]).

    A candidate is every position i whose next token i+1 is supervised, so each supervised token
    is the first prediction of exactly one candidate block. `blocks_per_sequence` draws that many
    candidates per row without replacement (all of them when a row has fewer), and None keeps
    every candidate. Positions come out sorted within each row.
    """
    batch, seq_len = supervised_mask.shape
    candidate = torch.zeros_like(supervised_mask, dtype=torch.bool)
    candidate[:, :-1] = supervised_mask[:, 1:].bool()
    max_candidates = int(candidate.sum(dim=1).max()) if seq_len > 0 else 0
    num_blocks = max_candidates if blocks_per_sequence is None else min(blocks_per_sequence, max_candidates)

    if blocks_per_sequence is None:
        scores = torch.zeros(supervised_mask.shape, device=supervised_mask.device)
    else:
        draw_device = generator.device if generator is not None else supervised_mask.device
        scores = torch.rand(supervised_mask.shape, generator=generator, device=draw_device).to(supervised_mask.device)
    # Candidates score in [1, 2), others -1: the top n are a uniform draw among candidates.
    scores = torch.where(candidate, scores + 1.0, torch.full_like(scores, -1.0))
    chosen = scores.topk(num_blocks, dim=1).indices.sort(dim=1).values  # [batch, n]
    valid = torch.gather(candidate, 1, chosen)
    # Valid blocks first (sorted), placeholders after them.
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    return torch.gather(chosen, 1, order), torch.gather(valid, 1, order)


def model_attention_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Convert a boolean 4D mask to the form the attention implementation takes.

    transformers 5.25 passes a 4D mask to the attention function unchanged. sdpa takes the
    boolean mask (True = attend). Eager attention adds the mask to the scores, so it gets an
    additive float mask: 0 where allowed, the dtype's minimum elsewhere.
    """
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, blocked)
    raise MaskTokError(
        f"Training with mask blocks needs a custom 4D attention mask, which the {attn_implementation!r} attention "
        "implementation does not take. Load the model with attn_implementation set to one of "
        f"{ATTENTION_IMPLEMENTATIONS}."
    )
