"""Decoding with a masktok adapter on tiny random models: equivalence, batches, stops, streaming, errors."""

import peft
import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, TextStreamer
from transformers import pipeline as hf_pipeline
from transformers.generation.stopping_criteria import StopStringCriteria

from masktok_peft import MaskTokConfig, MaskTokError

PROMPTS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12", "w3 w3", "w40 w41 w42 w43"]
# A pass of 4 proposals: new positions 0-3 come from the prefill, 4-7 from the next pass, and so on.
STATIC_K = 4


def final_norm(model):
    inner = getattr(model, "model", None) or model.transformer
    return getattr(inner, "norm", None) or inner.ln_f


def sharpen(model, factor=20.0):
    """Scale the final norm so that the random model's distributions are peaked and ConfAdapt accepts runs."""
    with torch.no_grad():
        final_norm(model).weight.mul_(factor)
    return model


def masktok_model(model, r=4):
    return peft.get_peft_model(model, MaskTokConfig(r=r, init_lora_weights=False))


def encode(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def new_tokens(sequences, prompt_length):
    return sequences[:, prompt_length:]


@pytest.fixture
def sharp_model(load_tiny, tiny_kind):
    """(masktok model on a sharpened tiny model, tokenizer, the same base model loaded again, mask id)."""
    model, tokenizer = load_tiny(tiny_kind)
    reference, _ = load_tiny(tiny_kind)
    peft_model = masktok_model(sharpen(model))
    return peft_model, tokenizer, sharpen(reference), peft_model.peft_config["default"].mask_token_id


@pytest.fixture(autouse=True)
def seeded():
    # The adapters below start from random LoRA weights; a fixed seed makes each test independent of the order.
    torch.manual_seed(0)


@pytest.fixture
def llama(load_tiny):
    model, tokenizer = load_tiny("llama")
    return masktok_model(sharpen(model)), tokenizer


# Equivalence with stock greedy decoding.


@pytest.mark.parametrize("masktok", [{"masktok_max_k": 1}, {"masktok_policy": "off"}])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch5"])
def test_one_token_per_pass_equals_stock_greedy(sharp_model, masktok, prompts):
    peft_model, tokenizer, reference, mask_id = sharp_model
    inputs = encode(tokenizer, prompts)
    # The mask id is never emitted, so stock decoding gets the same suppression.
    stock = reference.generate(**inputs, max_new_tokens=12, do_sample=False, suppress_tokens=[mask_id])
    with peft_model.disable_adapter():
        disabled = peft_model.generate(
            **inputs, max_new_tokens=12, do_sample=False, suppress_tokens=[mask_id], return_dict_in_generate=True
        )
    output = peft_model.generate(**inputs, max_new_tokens=12, do_sample=False, **masktok)
    assert not hasattr(disabled, "masktok_stats")  # with the adapter disabled, generate() is stock generate()
    assert torch.equal(disabled.sequences, stock)
    assert torch.equal(output, stock)


def test_processors_k1_equal_stock(sharp_model):
    # min_new_tokens reads each row's length and repetition_penalty keeps one padding length per row.
    peft_model, tokenizer, reference, mask_id = sharp_model
    inputs = encode(tokenizer, PROMPTS)
    unstopped = reference.generate(**inputs, max_new_tokens=10, do_sample=False, suppress_tokens=[mask_id])
    eos = int(new_tokens(unstopped, inputs.input_ids.shape[1])[0, 1])  # row 0 would end after 2 tokens
    settings = dict(max_new_tokens=10, do_sample=False, eos_token_id=eos, min_new_tokens=5, repetition_penalty=1.3)
    stock = reference.generate(**inputs, suppress_tokens=[mask_id], **settings)
    output = peft_model.generate(**inputs, masktok_max_k=1, **settings)
    assert torch.equal(output, stock)


# Batches: each row equals that row decoded alone.


@pytest.mark.parametrize("policy, threshold", [("confadapt", 0.3), ("static", 0.9)])
def test_batch_rows_equal_rows_alone(sharp_model, policy, threshold):
    peft_model, tokenizer, _, mask_id = sharp_model
    settings = dict(max_new_tokens=14, masktok_policy=policy, masktok_threshold=threshold, masktok_max_k=STATIC_K)
    inputs = encode(tokenizer, PROMPTS)
    batch = peft_model.generate(**inputs, return_dict_in_generate=True, **settings)
    for row, prompt in enumerate(PROMPTS):
        single = encode(tokenizer, [prompt])
        alone = peft_model.generate(**single, **settings)
        expected = new_tokens(alone, single.input_ids.shape[1])[0]
        generated = new_tokens(batch.sequences, inputs.input_ids.shape[1])[row]
        # A row that ends before the others is filled with the pad token.
        assert torch.equal(generated[: len(expected)], expected), f"row {row}"
        assert (generated[len(expected) :] == tokenizer.pad_token_id).all(), f"row {row}"
    assert mask_id not in new_tokens(batch.sequences, inputs.input_ids.shape[1]).tolist()
    if policy == "confadapt":
        # The rows must have accepted different lengths, or this test would not exercise holes in the cache.
        assert len(batch.masktok_stats["accepted_histogram"]) > 1


def test_adapter_changes_mask_slot_proposals(sharp_model):
    peft_model, tokenizer, _, _ = sharp_model
    inputs = encode(tokenizer, PROMPTS)
    settings = dict(max_new_tokens=12, masktok_policy="static", masktok_max_k=STATIC_K)
    with_lora = peft_model.generate(**inputs, **settings)
    for module in peft_model.modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.zeros_(module.lora_B["default"].weight)
    without_lora = peft_model.generate(**inputs, **settings)
    assert not torch.equal(with_lora, without_lora)


# Lengths and stops inside an accepted block.


def static_reference(peft_model, inputs, max_new_tokens=16, **settings):
    output = peft_model.generate(
        **inputs, max_new_tokens=max_new_tokens, masktok_policy="static", masktok_max_k=STATIC_K, **settings
    )
    return new_tokens(output, inputs.input_ids.shape[1])


@pytest.mark.parametrize("limit", ["max_new_tokens", "max_length"])
def test_length_limit_inside_block(llama, limit):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:2])
    full = static_reference(peft_model, inputs)
    prompt_length = inputs.input_ids.shape[1]
    value = 6 if limit == "max_new_tokens" else prompt_length + 6  # 6 ends inside the second block of 4
    output = peft_model.generate(**inputs, masktok_policy="static", masktok_max_k=STATIC_K, **{limit: value})
    assert output.shape == (2, prompt_length + 6)
    assert torch.equal(new_tokens(output, prompt_length), full[:, :6])


def first_block_inner_token(tokens, forbidden=()):
    """Return the index of a token that is not the last of its block and that first occurs there."""
    for index in range(1, len(tokens)):
        token = tokens[index]
        if index % STATIC_K != STATIC_K - 1 and token not in tokens[:index] and token not in forbidden:
            return index
    pytest.skip("no token first occurs inside a block in this output")


@pytest.mark.parametrize("as_list", [False, True])
def test_eos_inside_block_ends_row_there(llama, as_list):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:2])
    prompt_length = inputs.input_ids.shape[1]
    full = static_reference(peft_model, inputs)
    row0 = full[0].tolist()
    end = first_block_inner_token(row0, forbidden=full[1].tolist())
    unused = next(token for token in range(len(tokenizer)) if token not in full.tolist()[0] + full.tolist()[1])
    eos = [unused, row0[end]] if as_list else row0[end]

    output = peft_model.generate(
        **inputs,
        max_new_tokens=16,
        masktok_policy="static",
        masktok_max_k=STATIC_K,
        eos_token_id=eos,
        return_dict_in_generate=True,
    )
    generated = new_tokens(output.sequences, prompt_length)
    assert generated[0, : end + 1].tolist() == row0[: end + 1]
    assert (generated[0, end + 1 :] == tokenizer.pad_token_id).all()
    assert torch.equal(generated[1], full[1])  # the other row never generates that token
    assert output.masktok_stats["per_row"][0]["new_tokens"] == end + 1


def test_stop_string_inside_block_ends_row_there(load_tiny):
    model, tokenizer = load_tiny("gpt2")  # every token id the model can emit is in the tokenizer
    peft_model = masktok_model(sharpen(model))
    # StopStringCriteria reads each token's text by decoding it after the word "abcdef". The word-level
    # test vocabulary lacks that word, so it is added as a token, which leaves the other ids unchanged.
    tokenizer.add_tokens(["abcdef"])
    inputs = encode(tokenizer, PROMPTS[:1])
    prompt_length = inputs.input_ids.shape[1]
    full = static_reference(peft_model, inputs)
    row = full[0].tolist()
    stop_string = tokenizer.convert_ids_to_tokens(row[first_block_inner_token(row)])
    # The expected end is where the stock stop-string criterion first fires on this very sequence.
    criterion = StopStringCriteria(tokenizer=tokenizer, stop_strings=[stop_string])
    sequence = torch.cat([inputs.input_ids[0], full[0]])
    end = next(index for index in range(len(row)) if criterion(sequence[None, : prompt_length + index + 1], None).any())
    assert end % STATIC_K != STATIC_K - 1

    output = peft_model.generate(
        **inputs,
        max_new_tokens=16,
        masktok_policy="static",
        masktok_max_k=STATIC_K,
        stop_strings=stop_string,
        tokenizer=tokenizer,
    )
    assert new_tokens(output, prompt_length)[0].tolist() == row[: end + 1]


def test_stop_strings_need_tokenizer(llama):
    peft_model, tokenizer = llama
    with pytest.raises(MaskTokError, match="tokenizer"):
        peft_model.generate(**encode(tokenizer, PROMPTS[:1]), max_new_tokens=4, stop_strings="w1")


class StopAllAfter(StoppingCriteria):
    """Stop the whole batch once the sequences reach `length`, returning one value for all rows."""

    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([input_ids.shape[1] >= self.length])


def test_custom_stopping_criteria_for_whole_batch(llama):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:3])
    prompt_length = inputs.input_ids.shape[1]
    full = static_reference(peft_model, inputs)
    output = peft_model.generate(
        **inputs,
        max_new_tokens=16,
        masktok_policy="static",
        masktok_max_k=STATIC_K,
        stopping_criteria=StoppingCriteriaList([StopAllAfter(prompt_length + 5)]),
    )
    assert torch.equal(new_tokens(output, prompt_length), full[:, :5])


# Streaming, pipelines, outputs.


def test_text_streamer_prints_new_text_up_to_stop(llama, capsys):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:1])
    full = static_reference(peft_model, inputs)
    row = full[0].tolist()
    end = first_block_inner_token(row)
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    peft_model.generate(
        **inputs,
        max_new_tokens=16,
        masktok_policy="static",
        masktok_max_k=STATIC_K,
        eos_token_id=row[end],
        streamer=streamer,
    )
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(row[: end + 1]) + "\n"


def test_iterator_streamer_yields_tokens_in_order(llama):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:1])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    output = peft_model.generate(**inputs, max_new_tokens=11, masktok_threshold=0.3, masktok_max_k=5, streamer=streamer)
    streamed = "".join(streamer)  # generate() has already finished, so every chunk is in the queue
    assert streamed == tokenizer.decode(new_tokens(output, inputs.input_ids.shape[1])[0])


def test_pipeline_uses_masktok_decoding(llama):
    peft_model, tokenizer = llama
    tokenizer.padding_side = "left"
    generator = hf_pipeline("text-generation", model=peft_model, tokenizer=tokenizer)
    # The text-generation pipeline of transformers 5.25 samples unless do_sample=False is passed.
    result = generator(
        PROMPTS[0], max_new_tokens=9, do_sample=False, masktok_policy="static", masktok_max_k=3, return_full_text=False
    )
    inputs = encode(tokenizer, PROMPTS[:1])
    expected = peft_model.generate(**inputs, max_new_tokens=9, masktok_policy="static", masktok_max_k=3)
    text = tokenizer.decode(new_tokens(expected, inputs.input_ids.shape[1])[0], skip_special_tokens=True)
    assert result[0]["generated_text"] == text


def test_statistics_are_consistent(llama):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS)
    prompt_length = inputs.input_ids.shape[1]
    output = peft_model.generate(
        **inputs, max_new_tokens=13, masktok_threshold=0.3, masktok_max_k=5, return_dict_in_generate=True
    )
    stats = output.masktok_stats
    assert stats["policy"] == "confadapt"
    assert stats["max_k"] == 5
    assert stats["threshold"] == 0.3
    assert stats["new_tokens"] == sum(row["new_tokens"] for row in stats["per_row"])
    assert stats["row_passes"] == sum(row["forward_passes"] for row in stats["per_row"])
    assert sum(stats["accepted_histogram"].values()) == stats["row_passes"]
    assert stats["tokens_per_pass"] == pytest.approx(stats["new_tokens"] / stats["row_passes"])
    for row, row_stats in enumerate(stats["per_row"]):
        generated = new_tokens(output.sequences, prompt_length)[row]
        tokens = generated.tolist()
        # A row's new tokens run up to and including its EOS, or to the limit.
        expected = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens else 13
        assert row_stats["new_tokens"] == expected
        assert sum(length * count for length, count in row_stats["accepted_histogram"].items()) >= expected
        assert row_stats["forward_passes"] <= stats["forward_passes"]
        assert all(1 <= length <= 5 for length in row_stats["accepted_histogram"])
    assert output.cache is None


def test_default_output_is_one_tensor(llama):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:2])
    output = peft_model.generate(**inputs, max_new_tokens=5)
    assert isinstance(output, torch.Tensor)
    assert torch.equal(output[:, : inputs.input_ids.shape[1]], inputs.input_ids)


def test_generation_config_carries_masktok_settings(llama):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:2])
    config = GenerationConfig(max_new_tokens=8, masktok_policy="static", masktok_max_k=4)
    output = peft_model.generate(**inputs, generation_config=config, return_dict_in_generate=True)
    assert output.masktok_stats["accepted_histogram"] == {4: 4}
    assert output.masktok_stats["policy"] == "static"


def test_runs_without_gradients(llama):
    peft_model, tokenizer = llama
    grad_modes = []
    handle = peft_model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: grad_modes.append(torch.is_grad_enabled())
    )
    try:
        peft_model.generate(**encode(tokenizer, PROMPTS[:1]), max_new_tokens=4)
    finally:
        handle.remove()
    assert grad_modes and not any(grad_modes)


def test_mask_id_never_emitted(load_tiny):
    model, tokenizer = load_tiny("qwen3")  # the mask id is a spare row, so the model has a logit for it
    peft_model = masktok_model(model)
    mask_id = peft_model.peft_config["default"].mask_token_id
    assert mask_id < model.config.vocab_size
    # Make the mask id the model's favourite token at every position.
    handle = model.lm_head.register_forward_hook(
        lambda module, args, output: output.index_add(
            -1, torch.tensor([mask_id]), torch.full(output.shape[:-1] + (1,), 100.0)
        )
    )
    try:
        output = peft_model.generate(**encode(tokenizer, PROMPTS), max_new_tokens=8, masktok_max_k=3)
    finally:
        handle.remove()
    assert not (output == mask_id).any()


def test_sampling_with_top_k_one_accepts_whole_blocks(llama):
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:2])
    # min_new_tokens keeps EOS out, so that every row decodes all 8 tokens whatever the random LoRA weights are.
    greedy = peft_model.generate(
        **inputs, max_new_tokens=8, min_new_tokens=8, masktok_policy="static", masktok_max_k=4
    )
    # top_k=1 makes every processed distribution one-hot, so confidence is 1 and ConfAdapt keeps all 4.
    sampled = peft_model.generate(
        **inputs,
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=True,
        top_k=1,
        masktok_max_k=4,
        masktok_threshold=0.99,
        return_dict_in_generate=True,
    )
    assert torch.equal(sampled.sequences, greedy)
    assert sampled.masktok_stats["accepted_histogram"] == {4: 4}


# Adaptive number of mask slots.


def test_adaptive_drops_mask_slots_when_proposals_fail(load_tiny):
    # An unsharpened random model is never confident, so ConfAdapt keeps one token per pass whatever k is.
    model, tokenizer = load_tiny("llama")
    peft_model = masktok_model(model)
    mask_id = peft_model.peft_config["default"].mask_token_id
    inputs = encode(tokenizer, PROMPTS[:3])
    with peft_model.disable_adapter():
        stock = peft_model.generate(**inputs, max_new_tokens=40, do_sample=False, suppress_tokens=[mask_id])
    settings = dict(max_new_tokens=40, masktok_max_k=8, masktok_threshold=0.99, return_dict_in_generate=True)
    adaptive = peft_model.generate(**inputs, **settings)
    fixed = peft_model.generate(**inputs, masktok_adaptive=False, **settings)
    assert torch.equal(adaptive.sequences, stock)
    assert torch.equal(fixed.sequences, stock)
    assert adaptive.masktok_stats["adaptive"] is True
    assert fixed.masktok_stats["adaptive"] is False
    assert fixed.masktok_stats["mask_slots_per_pass"] > 6  # 7, less in the last passes, which the budget cuts
    # Prefill has 7 mask slots, the next pass 1, then only probes of 1 slot after growing waits.
    assert adaptive.masktok_stats["mask_slots_per_pass"] < 0.5


def test_min_k_equal_max_k_disables_adaptation(sharp_model):
    peft_model, tokenizer, _, _ = sharp_model
    inputs = encode(tokenizer, PROMPTS)
    settings = dict(max_new_tokens=14, masktok_threshold=0.3, masktok_max_k=STATIC_K, return_dict_in_generate=True)
    pinned = peft_model.generate(**inputs, masktok_min_k=STATIC_K, **settings)
    fixed = peft_model.generate(**inputs, masktok_adaptive=False, **settings)
    assert torch.equal(pinned.sequences, fixed.sequences)
    assert pinned.masktok_stats["mask_slots_per_pass"] == fixed.masktok_stats["mask_slots_per_pass"]
    assert pinned.masktok_stats["min_k"] == STATIC_K


def test_adaptive_grows_k_after_full_acceptance(llama):
    # top_k=1 makes every confidence 1, so every pass keeps all its proposals and k climbs by 2 up to max_k.
    peft_model, tokenizer = llama
    inputs = encode(tokenizer, PROMPTS[:1])
    output = peft_model.generate(
        **inputs, max_new_tokens=20, do_sample=True, top_k=1, masktok_max_k=6, return_dict_in_generate=True
    )
    assert output.masktok_stats["accepted_histogram"] == {6: 3, 2: 1}


# Invalid input.


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"masktok_threshold": 0.0}, "masktok_threshold"),
        ({"masktok_threshold": 1.5}, "masktok_threshold"),
        ({"masktok_max_k": 0}, "masktok_max_k"),
        ({"masktok_max_k": 2.5}, "masktok_max_k"),
        ({"masktok_policy": "fast"}, "Unknown masktok_policy"),
        ({"masktok_adaptive": "yes"}, "masktok_adaptive"),
        ({"masktok_min_k": 0}, "masktok_min_k"),
        ({"masktok_min_k": 5, "masktok_max_k": 4}, "masktok_min_k"),
        ({"num_beams": 2}, "num_beams"),
        ({"generation_config": GenerationConfig(masktok_policy="fast")}, "Unknown masktok_policy"),
        ({"generation_config": GenerationConfig(num_beams=3)}, "num_beams"),
    ],
)
def test_invalid_arguments_raise(llama, arguments, message):
    peft_model, tokenizer = llama
    with pytest.raises(MaskTokError, match=message):
        peft_model.generate(**encode(tokenizer, PROMPTS[:1]), max_new_tokens=4, **arguments)


def test_assistant_model_raises(llama, load_tiny):
    peft_model, tokenizer = llama
    assistant, _ = load_tiny("llama")
    with pytest.raises(MaskTokError, match="assistant_model"):
        peft_model.generate(**encode(tokenizer, PROMPTS[:1]), max_new_tokens=4, assistant_model=assistant)
