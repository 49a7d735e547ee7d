"""The distillation step on tiny models: learning, packed/cached equivalence, checkpointing, statistics."""

import math

import peft
import pytest
import torch

from masktok_peft import MaskTokConfig, MaskTokError
from masktok_peft.training import DistillationOutput, distillation_step
from masktok_peft.training.layout import build_packed_layout
from masktok_peft.training.losses import distillation_loss
from masktok_peft.training.objective import block_statistics, cached_predictions, packed_predictions


def _peft_model(load_tiny, kind, gated=True, attn_implementation="sdpa", max_k=8):
    model, _ = load_tiny(kind)
    model.set_attn_implementation(attn_implementation)
    torch.manual_seed(1)
    config = MaskTokConfig(r=4, init_lora_weights=False, gated=gated, max_k=max_k)
    return peft.get_peft_model(model, config).eval()


def _batch(seed=0, batch=2, seq_len=21, lengths=(21, 15), prompt_len=4):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(6, 90, (batch, seq_len), generator=generator)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    supervised = torch.zeros(batch, seq_len, dtype=torch.bool)
    for row, length in enumerate(lengths):
        input_ids[row, length:] = 0
        attention_mask[row, :length] = 1
        supervised[row, prompt_len:length] = True
    return input_ids, attention_mask, supervised


def _trainable(model):
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def _mask_row(model):
    return model.get_input_embeddings().masktok_row["default"]


@pytest.mark.parametrize("objective", ["hard", "soft", "ground_truth"])
def test_cached_matches_packed(load_tiny, tiny_kind, objective):
    model = _peft_model(load_tiny, tiny_kind)
    input_ids, attention_mask, supervised = _batch()
    k, region_size, offset = 4, 9, 3
    names, parameters = zip(*_trainable(model), strict=True)

    packed = packed_predictions(model, input_ids, supervised, k, region_size, offset)
    packed_loss = distillation_loss(
        objective, packed.student_logits, packed.teacher_logits, packed.target_ids, packed.loss_mask
    )
    packed_grads = torch.autograd.grad(packed_loss, parameters, allow_unused=True)

    mask_id = model.peft_config["default"].mask_token_id
    layout = build_packed_layout(input_ids, supervised, k, mask_id, region_size, offset)
    block_end = layout.block_end.expand(input_ids.shape[0], -1)
    cached = cached_predictions(
        model, input_ids, attention_mask, supervised, k, block_end, torch.ones_like(block_end, dtype=torch.bool)
    )
    cached_loss = distillation_loss(
        objective, cached.student_logits, cached.teacher_logits, cached.target_ids, cached.loss_mask
    )
    cached_grads = torch.autograd.grad(cached_loss, parameters, allow_unused=True)

    assert torch.equal(cached.loss_mask, packed.loss_mask)
    assert packed.loss_mask.sum() > 10
    valid = packed.loss_mask
    torch.testing.assert_close(cached.student_logits[valid], packed.student_logits[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.teacher_logits[valid], packed.teacher_logits[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached_loss, packed_loss, atol=1e-6, rtol=1e-5)
    for name, packed_grad, cached_grad in zip(names, packed_grads, cached_grads, strict=True):
        if packed_grad is None:
            assert cached_grad is None or (cached_grad == 0).all(), name
            continue
        torch.testing.assert_close(cached_grad, packed_grad, atol=1e-6, rtol=1e-4, msg=name)
    assert packed_grads[names.index(next(n for n in names if "masktok_row" in n))].abs().sum() > 0


def test_offset_zero_is_base_prediction_when_gated(load_tiny):
    model = _peft_model(load_tiny, "llama")
    input_ids, attention_mask, supervised = _batch()
    packed = packed_predictions(model, input_ids, supervised, 3, 8, 0)
    valid = packed.loss_mask[:, :, 0]
    torch.testing.assert_close(packed.student_logits[:, :, 0][valid], packed.teacher_logits[:, :, 0][valid])


@pytest.mark.parametrize("layout", ["packed", "cached"])
def test_training_lowers_loss_and_raises_agreement(load_tiny, layout):
    model, _ = load_tiny("llama")
    # A random tiny model's logits span well under one nat, so neither teacher nor student could be confident.
    # Scaling the output layer gives the teacher sharp labels and the student room to fit them.
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    torch.manual_seed(1)
    config = MaskTokConfig(r=16, init_lora_weights=False, max_k=4, target_modules="all-linear")
    model = peft.get_peft_model(model, config).eval()
    input_ids, attention_mask, supervised = _batch(seed=5, batch=4, seq_len=24, lengths=(24, 24, 20, 18), prompt_len=2)
    optimizer = torch.optim.Adam([parameter for _, parameter in _trainable(model)], lr=1e-2)
    # The same grid offset (packed) or block positions (cached) at every step: the loop fits one set of blocks.
    settings = dict(layout=layout, region_size=8, blocks_per_sequence=4)

    def step():
        return distillation_step(
            model, input_ids, attention_mask, supervised, 3, generator=torch.Generator().manual_seed(0), **settings
        )

    with torch.no_grad():
        before = step()
    for _ in range(50):
        output = step()
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = step()

    assert after.loss < 0.75 * before.loss, (before.loss, after.loss)
    assert after.agreement[1] > before.agreement[1] + 0.3, (before.agreement, after.agreement)
    assert after.agreement[2] > before.agreement[2], (before.agreement, after.agreement)
    assert after.confidence > before.confidence


@pytest.mark.parametrize("layout", ["packed", "cached"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(load_tiny, layout, use_reentrant):
    model = _peft_model(load_tiny, "llama")
    input_ids, attention_mask, supervised = _batch()
    names, parameters = zip(*_trainable(model), strict=True)
    settings = dict(layout=layout, region_size=9, blocks_per_sequence=6)

    def gradients():
        model.train()
        model.zero_grad()
        output = distillation_step(
            model, input_ids, attention_mask, supervised, 4, generator=torch.Generator().manual_seed(2), **settings
        )
        # Reentrant checkpointing does not support torch.autograd.grad, so the gradients come from backward().
        output.loss.backward()
        return output.loss.detach(), [None if p.grad is None else p.grad.clone() for p in parameters]

    plain_loss, plain_grads = gradients()
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": use_reentrant})
    if use_reentrant:
        # Reentrant checkpointing backpropagates into a layer only when its input requires grad.
        model.enable_input_require_grads()
    checkpointed_loss, checkpointed_grads = gradients()

    assert any(module.gradient_checkpointing for module in model.modules() if hasattr(module, "gradient_checkpointing"))
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    row_index = next(index for index, name in enumerate(names) if "masktok_row" in name)
    assert checkpointed_grads[row_index].abs().sum() > 0
    for name, plain, checkpointed in zip(names, plain_grads, checkpointed_grads, strict=True):
        if plain is None:
            continue
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-4, msg=name)


def test_packed_eager_matches_sdpa(load_tiny, tiny_kind):
    losses = []
    for attn_implementation in ("eager", "sdpa"):
        model = _peft_model(load_tiny, tiny_kind, gated=False, attn_implementation=attn_implementation)
        input_ids, attention_mask, supervised = _batch()
        output = distillation_step(
            model, input_ids, attention_mask, supervised, 3, region_size=7, generator=torch.Generator().manual_seed(4)
        )
        losses.append(output.loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)


def test_output_fields(load_tiny):
    model = _peft_model(load_tiny, "qwen3", max_k=6)
    input_ids, attention_mask, supervised = _batch()
    output = distillation_step(
        model, input_ids, attention_mask, supervised, 3, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(output, DistillationOutput)
    assert output.loss.requires_grad and output.loss.dim() == 0
    assert output.agreement.shape == (6,)
    assert not output.agreement[:3].isnan().any()
    assert output.agreement[3:].isnan().all()
    assert 0 < output.confidence.item() <= 1
    assert 1 <= output.tokens_per_pass.item() <= 3
    assert output.num_positions > 0


def test_cached_every_supervised_position(load_tiny):
    model = _peft_model(load_tiny, "gpt2")
    input_ids, attention_mask, supervised = _batch()
    output = distillation_step(model, input_ids, attention_mask, supervised, 2, layout="cached")
    # Every supervised token is the offset-0 target of one block. At offset 1, each row's last block targets no token.
    first_supervised_token = supervised[:, 1:].sum().item()
    assert output.num_positions == 2 * first_supervised_token - input_ids.shape[0]


def test_mask_logit_never_a_label(load_tiny):
    # The qwen3 tiny model's mask id is a spare row inside the vocabulary, so it has a logit.
    model, tokenizer = load_tiny("qwen3")
    config = MaskTokConfig(r=4, init_lora_weights=False, tokenizer_name_or_path=tokenizer.name_or_path)
    model = peft.get_peft_model(model, config).eval()
    mask_id = model.peft_config["default"].mask_token_id
    assert mask_id < model.get_output_embeddings().weight.shape[0]
    input_ids, _, supervised = _batch()
    predictions = packed_predictions(model, input_ids, supervised, 4, 9, 0)
    assert (predictions.student_logits[..., mask_id] == float("-inf")).all()
    assert (predictions.teacher_logits.argmax(-1) != mask_id).all()


def test_step_rejects_bad_input(load_tiny):
    model = _peft_model(load_tiny, "llama", max_k=4)
    input_ids, attention_mask, supervised = _batch()
    mask_id = model.peft_config["default"].mask_token_id
    with pytest.raises(MaskTokError, match="max_k"):
        distillation_step(model, input_ids, attention_mask, supervised, 5)
    with pytest.raises(MaskTokError, match="layout"):
        distillation_step(model, input_ids, attention_mask, supervised, 3, layout="flat")
    with pytest.raises(MaskTokError, match="right-padded"):
        distillation_step(model, input_ids, attention_mask.flip(1), supervised.flip(1), 3)
    with pytest.raises(MaskTokError, match="mask token id"):
        distillation_step(model, input_ids.masked_fill(supervised, mask_id), attention_mask, supervised, 3)
    with pytest.raises(MaskTokError, match="padding position"):
        distillation_step(model, input_ids, attention_mask, torch.ones_like(supervised), 3)

    ungated = _peft_model(load_tiny, "llama", gated=False)
    with pytest.raises(MaskTokError, match="gated"):
        distillation_step(ungated, input_ids, attention_mask, supervised, 3, layout="cached")


def _logits_from(probabilities):
    return torch.tensor(probabilities).log()


def test_block_statistics_known_answer():
    student = _logits_from(
        [
            [
                [[0.95, 0.03, 0.01, 0.01], [0.02, 0.92, 0.03, 0.03], [0.5, 0.2, 0.2, 0.1]],
                [[0.1, 0.1, 0.7, 0.1], [0.91, 0.03, 0.03, 0.03], [0.97, 0.01, 0.01, 0.01]],
            ]
        ]
    )  # [batch 1, blocks 2, k 3, vocab 4]
    labels = torch.tensor([[[0, 1, 0], [2, 3, 0]]])
    teacher = torch.nn.functional.one_hot(labels, 4).float()
    mask = torch.ones(1, 2, 3, dtype=torch.bool)

    statistics = block_statistics(student, teacher, mask, threshold=0.9, max_k=5)
    torch.testing.assert_close(statistics.agreement[:3], torch.tensor([1.0, 0.5, 1.0]))
    assert statistics.agreement[3:].isnan().all()
    assert statistics.confidence.item() == pytest.approx((0.95 + 0.92 + 0.5 + 0.7 + 0.91 + 0.97) / 6, rel=1e-5)
    # Block 0 accepts offsets 0 and 1 (offset 2 is below the threshold). Block 1's offset 0 is below it: 1 token.
    assert statistics.tokens_per_pass.item() == pytest.approx(1.5)

    mask[0, 0, 1] = False  # an unsupervised offset ends block 0's prefix
    mask[0, 1, 0] = False  # a block whose first prediction is unsupervised is not counted
    statistics = block_statistics(student, teacher, mask, threshold=0.9, max_k=5)
    assert statistics.tokens_per_pass.item() == pytest.approx(1.0)
    torch.testing.assert_close(statistics.agreement[:3], torch.tensor([1.0, 0.0, 1.0]))


def test_block_statistics_nan_without_positions():
    student = torch.randn(1, 2, 3, 5)
    statistics = block_statistics(student, student, torch.zeros(1, 2, 3, dtype=torch.bool), 0.9, 4)
    assert statistics.agreement.isnan().all()
    assert math.isnan(statistics.confidence.item())
    assert math.isnan(statistics.tokens_per_pass.item())


def test_step_keeps_training_mode(load_tiny):
    model = _peft_model(load_tiny, "gpt2")
    model.train()
    input_ids, attention_mask, supervised = _batch()
    for layout in ("packed", "cached"):
        distillation_step(model, input_ids, attention_mask, supervised, 3, layout=layout, blocks_per_sequence=3)
        assert all(module.training for module in model.modules()), layout
        assert _mask_row(model).requires_grad, layout


def test_step_rejects_sliding_window_model(load_tiny):
    model = _peft_model(load_tiny, "qwen3")
    model.get_base_model().config.layer_types = ["sliding_attention", "full_attention"]
    input_ids, attention_mask, supervised = _batch()
    with pytest.raises(MaskTokError, match="full attention"):
        distillation_step(model, input_ids, attention_mask, supervised, 3)
