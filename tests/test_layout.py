"""Packed and block-slot layouts: hand-checked tables, and equivalence with plain forward passes."""

import peft
import pytest
import torch

from masktok_peft import MaskTokConfig, MaskTokError
from masktok_peft.training.layout import (
    build_block_slots,
    build_packed_layout,
    model_attention_mask,
    sample_block_ends,
)

M = 99  # mask id in the hand-checked tables

# seq_len 7, k 3 (two slots), region_size 5 (three real tokens per region), offset 1:
# region 0 = x0 x1 m m, region 1 = x2 x3 x4 m m, region 2 = x5 x6 m m.
PACKED_IDS = [10, 11, M, M, 12, 13, 14, M, M, 15, 16, M, M]
PACKED_POSITIONS = [0, 1, 2, 3, 2, 3, 4, 5, 6, 5, 6, 7, 8]
PACKED_ATTENTION = [
    # keys: x0 x1 m  m  x2 x3 x4 m  m  x5 x6 m  m
    "1000000000000",  # x0
    "1100000000000",  # x1
    "1110000000000",  # region 0, slot 1: x0..x1 and itself
    "1111000000000",  # region 0, slot 2
    "1100100000000",  # x2: real tokens only
    "1100110000000",  # x3
    "1100111000000",  # x4
    "1100111100000",  # region 1, slot 1: x0..x4, never region 0's slots
    "1100111110000",  # region 1, slot 2
    "1100111001000",  # x5
    "1100111001100",  # x6
    "1100111001110",  # region 2, slot 1
    "1100111001111",  # region 2, slot 2
]


def _table(rows):
    return torch.tensor([[char == "1" for char in row] for row in rows])


def test_packed_layout_hand_checked_table():
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    supervised = torch.tensor([[False, False, False, True, True, True, True]])
    layout = build_packed_layout(input_ids, supervised, k=3, mask_token_id=M, region_size=5, offset=1)

    assert layout.input_ids.tolist() == [PACKED_IDS]
    assert layout.position_ids.tolist() == [PACKED_POSITIONS]
    assert torch.equal(layout.attention_mask[0, 0], _table(PACKED_ATTENTION))
    assert layout.predict_index.tolist() == [[1, 2, 3], [6, 7, 8], [10, 11, 12]]
    assert layout.target_index.tolist() == [[2, 3, 4], [5, 6, 7], [7, 8, 9]]
    assert layout.block_end.tolist() == [1, 4, 6]
    # Targets 2 (prompt) and 7..9 (past the text) are not supervised.
    assert layout.loss_mask.tolist() == [[[False, True, True], [True, True, False], [False, False, False]]]


def test_packed_layout_teacher_slots():
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    layout = build_packed_layout(input_ids, torch.ones_like(input_ids, dtype=torch.bool), 3, M, 5, offset=1)
    proposals = torch.tensor([[[50, 51, 52], [60, 61, 62], [70, 71, 72]]])  # [batch, R, k]
    filled = layout.with_slot_tokens(proposals)
    # Slot j holds the proposal of offset j-1; the last offset's proposal has no slot.
    assert filled.tolist() == [[10, 11, 50, 51, 12, 13, 14, 60, 61, 15, 16, 70, 71]]


def test_packed_layout_every_token_once():
    input_ids = torch.arange(1, 41).view(2, 20)
    supervised = torch.ones_like(input_ids, dtype=torch.bool)
    for k in (2, 4, 7):
        for offset in range(8 - (k - 1)):
            layout = build_packed_layout(input_ids, supervised, k, 0, region_size=8, offset=offset)
            real = layout.input_ids[layout.input_ids != 0].view(2, -1)
            assert torch.equal(real, input_ids), (k, offset)
            real_positions = layout.position_ids[0][layout.input_ids[0] != 0]
            assert torch.equal(real_positions, torch.arange(20)), (k, offset)


def test_packed_layout_rejects_bad_sizes():
    input_ids = torch.ones(1, 5, dtype=torch.long)
    supervised = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(MaskTokError, match="region_size"):
        build_packed_layout(input_ids, supervised, k=4, mask_token_id=0, region_size=3)
    with pytest.raises(MaskTokError, match="k must be"):
        build_packed_layout(input_ids, supervised, k=1, mask_token_id=0, region_size=3)
    with pytest.raises(MaskTokError, match="offset"):
        build_packed_layout(input_ids, supervised, k=2, mask_token_id=0, region_size=3, offset=2)


def test_block_slots_hand_checked_table():
    supervised = torch.tensor([[False, True, True, True, True]])
    block_end = torch.tensor([[1, 3]])
    slots = build_block_slots(block_end, torch.tensor([[True, True]]), supervised, k=3, mask_token_id=M)

    assert slots.input_ids.tolist() == [[M, M, M, M]]
    assert slots.position_ids.tolist() == [[2, 3, 4, 5]]
    expected = _table(
        [
            # keys: text x0..x4, then slots b0j1 b0j2 b1j1 b1j2
            "110001000",
            "110001100",
            "111100010",
            "111100011",
        ]
    )
    assert torch.equal(slots.attention_mask[0, 0], expected)
    assert slots.target_index.tolist() == [[[2, 3, 4], [4, 5, 6]]]
    assert slots.loss_mask.tolist() == [[[True, True, True], [True, False, False]]]


def test_block_slots_placeholder_blocks_left_out():
    supervised = torch.ones(2, 6, dtype=torch.bool)
    block_end = torch.tensor([[0, 2], [1, 3]])
    valid = torch.tensor([[True, False], [True, True]])
    slots = build_block_slots(block_end, valid, supervised, k=2, mask_token_id=M)
    assert slots.loss_mask[0, 1].tolist() == [False, False]
    assert slots.loss_mask[1].all()


def test_sample_block_ends_every_candidate():
    supervised = torch.tensor([[False, False, True, True, True], [False, True, True, False, False]])
    block_end, valid = sample_block_ends(supervised, None)
    assert block_end[0][valid[0]].tolist() == [1, 2, 3]
    assert block_end[1][valid[1]].tolist() == [0, 1]
    assert valid.tolist() == [[True, True, True], [True, True, False]]


def test_sample_block_ends_draws_candidates_only():
    supervised = torch.zeros(3, 40, dtype=torch.bool)
    supervised[:, 10:30] = True
    generator = torch.Generator().manual_seed(3)
    block_end, valid = sample_block_ends(supervised, 5, generator)
    assert block_end.shape == (3, 5)
    assert valid.all()
    assert ((block_end >= 9) & (block_end <= 28)).all()
    assert (block_end.diff(dim=1) > 0).all()
    again, _ = sample_block_ends(supervised, 5, torch.Generator().manual_seed(3))
    assert torch.equal(block_end, again)


def _peft_model(load_tiny, kind, gated, attn_implementation="sdpa"):
    model, _ = load_tiny(kind)
    model.set_attn_implementation(attn_implementation)
    torch.manual_seed(1)
    config = MaskTokConfig(r=4, init_lora_weights=False, gated=gated, max_k=8)
    return peft.get_peft_model(model, config).eval()


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_slots_match_plain_forward(load_tiny, tiny_kind, gated, attn_implementation):
    model = _peft_model(load_tiny, tiny_kind, gated, attn_implementation)
    mask_id = model.peft_config["default"].mask_token_id
    torch.manual_seed(2)
    input_ids = torch.randint(6, 90, (2, 23))
    lengths = [23, 17]
    supervised = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, length in enumerate(lengths):
        input_ids[row, length:] = 0
        supervised[row, :length] = True
    k = 4
    layout = build_packed_layout(input_ids, supervised, k, mask_id, region_size=9, offset=2)
    dtype = model.get_input_embeddings().weight.dtype
    with torch.no_grad():
        packed = model(
            input_ids=layout.input_ids,
            attention_mask=model_attention_mask(layout.attention_mask, attn_implementation, dtype),
            position_ids=layout.position_ids.expand(2, -1),
        ).logits

    checked = 0
    for row, length in enumerate(lengths):
        for region, end in enumerate(layout.block_end.tolist()):
            if end >= length:
                continue
            prefix = torch.cat([input_ids[row, : end + 1], torch.full((k - 1,), mask_id)])
            with torch.no_grad():
                plain = model(input_ids=prefix[None]).logits[0, -k:]
            got = packed[row, layout.predict_index[region]]
            torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-4, msg=f"row {row} region {region}")
            checked += 1
    assert checked >= 5
