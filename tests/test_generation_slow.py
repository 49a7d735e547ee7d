"""Decoding on the real SmolLM2-135M-Instruct with a freshly initialised masktok adapter (slow)."""

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.stopping_criteria import StopStringCriteria

from masktok_peft import MaskTokConfig

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is 2 + 3?",
    "Name a colour.",
    "Write one word that rhymes with cat.",
    "What is the capital of France?",
    "Count from one to five.",
    "Say hello in Spanish.",
    "Is the sun a star? Answer briefly.",
    "What do bees make?",
]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(masktok model with a fresh r=16 adapter, tokenizer, the base model loaded again, mask id)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.padding_side = "left"
    config = MaskTokConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = peft.get_peft_model(model, config)
    return peft_model, tokenizer, reference, peft_model.peft_config["default"].mask_token_id


def chat_inputs(tokenizer, questions):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_one_token_per_pass_equals_stock_greedy(smollm2, batch_size):
    peft_model, tokenizer, reference, mask_id = smollm2
    inputs = chat_inputs(tokenizer, QUESTIONS[:batch_size])
    stock = reference.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, suppress_tokens=[mask_id])
    for masktok in ({"masktok_max_k": 1}, {"masktok_policy": "off"}):
        output = peft_model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **masktok)
        assert torch.equal(output, stock), masktok


def test_confadapt_batch_rows_equal_rows_alone(smollm2):
    peft_model, tokenizer, _, mask_id = smollm2
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, masktok_max_k=4, masktok_threshold=0.5)
    inputs = chat_inputs(tokenizer, QUESTIONS)
    prompt_length = inputs.input_ids.shape[1]
    batch = peft_model.generate(**inputs, return_dict_in_generate=True, **settings)
    generated = batch.sequences[:, prompt_length:]
    for row, question in enumerate(QUESTIONS):
        single = chat_inputs(tokenizer, [question])
        alone = peft_model.generate(**single, **settings)[0, single.input_ids.shape[1] :]
        assert torch.equal(generated[row, : len(alone)], alone), f"row {row}"
        assert (generated[row, len(alone) :] == tokenizer.pad_token_id).all(), f"row {row}"
    assert not (generated == mask_id).any()

    stats = batch.masktok_stats
    assert stats["new_tokens"] == sum(row["new_tokens"] for row in stats["per_row"])
    assert sum(stats["accepted_histogram"].values()) == stats["row_passes"]
    assert stats["forward_passes"] >= max(row["forward_passes"] for row in stats["per_row"])
    for row, row_stats in enumerate(stats["per_row"]):
        row_tokens = generated[row].tolist()
        # A row's new tokens run up to and including its EOS, or to the limit.
        expected = (
            row_tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row_tokens else MAX_NEW_TOKENS
        )
        assert row_stats["new_tokens"] == expected, f"row {row}"


def test_stop_string_inside_block(smollm2):
    peft_model, tokenizer, _, _ = smollm2
    inputs = chat_inputs(tokenizer, ["Count from one to five."])
    prompt_length = inputs.input_ids.shape[1]
    # Static k=2 accepts blocks of two tokens, so a stop at an even new position is inside a block.
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, masktok_policy="static", masktok_max_k=2)
    full = peft_model.generate(**inputs, **settings)[0]
    new_ids = full[prompt_length:].tolist()
    index = next(i for i in range(2, len(new_ids), 2) if tokenizer.decode(new_ids[i]).strip().isalnum())
    stop_string = tokenizer.decode(new_ids[index]).strip()
    criterion = StopStringCriteria(tokenizer=tokenizer, stop_strings=[stop_string])
    end = next(i for i in range(len(new_ids)) if criterion(full[None, : prompt_length + i + 1], None).any())
    assert end % 2 == 0
    assert end < len(new_ids) - 1

    output = peft_model.generate(**inputs, stop_strings=stop_string, tokenizer=tokenizer, **settings)[0]
    assert output.tolist() == full[: prompt_length + end + 1].tolist()


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_verify_equals_stock_greedy(smollm2, batch_size):
    # Stock greedy runs with the adapter disabled and without suppressing the mask id, which the base model
    # never emits.
    peft_model, tokenizer, _, mask_id = smollm2
    inputs = chat_inputs(tokenizer, QUESTIONS[:batch_size])
    with peft_model.disable_adapter():
        stock = peft_model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    output = peft_model.generate(
        **inputs,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        masktok_policy="verify",
        masktok_max_k=4,
        return_dict_in_generate=True,
    )
    assert torch.equal(output.sequences, stock)
    assert not (stock[:, inputs.input_ids.shape[1] :] == mask_id).any()
    assert output.masktok_stats["proposals_verified"] > 0
