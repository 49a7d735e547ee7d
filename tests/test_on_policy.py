"""Tests for on-policy training text (masktok_peft.training.on_policy) on tiny random models."""

import json

import peft
import pytest
import torch
from datasets import Dataset

from masktok_peft import MaskTokConfig
from masktok_peft.errors import MaskTokError
from masktok_peft.training import on_policy
from masktok_peft.training.on_policy import OnPolicySettings, build_on_policy_dataset

PROMPTS = ["w1 w2 w3 ", "w4 w5 ", "w6 w7 w8 w9 ", "w10 "]
SETTINGS = OnPolicySettings(max_new_tokens=6, batch_size=3)


def prompt_completion_rows():
    return Dataset.from_list([{"prompt": prompt, "completion": "w20 w21"} for prompt in PROMPTS])


def greedy_text(model, tokenizer, prompt, max_new_tokens):
    input_ids = tokenizer(text=prompt, return_tensors="pt")["input_ids"]
    output = model.generate(
        input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    generated = output[0, input_ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    return tokenizer.decode(generated, skip_special_tokens=True)


def test_completions_are_greedy_continuations(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    result = build_on_policy_dataset(model, tokenizer, prompt_completion_rows(), SETTINGS, cache_dir=tmp_path)
    assert result["prompt"] == PROMPTS
    # Batched, left-padded generation must give what one prompt at a time gives.
    expected = [greedy_text(model, tokenizer, prompt, SETTINGS.max_new_tokens) for prompt in PROMPTS]
    assert result["completion"] == expected


def test_adapter_is_disabled(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    expected = [greedy_text(model, tokenizer, prompt, SETTINGS.max_new_tokens) for prompt in PROMPTS]
    peft_model = peft.get_peft_model(model, MaskTokConfig(r=4, gated=False, init_lora_weights=False))
    with_adapter = [greedy_text(peft_model.get_base_model(), tokenizer, p, SETTINGS.max_new_tokens) for p in PROMPTS]
    assert with_adapter != expected, "the random LoRA weights should change the greedy text"

    result = build_on_policy_dataset(peft_model, tokenizer, prompt_completion_rows(), SETTINGS, cache_dir=tmp_path)
    assert result["completion"] == expected


def test_cache_is_reused(load_tiny, tmp_path, monkeypatch):
    model, tokenizer = load_tiny("llama")
    first = build_on_policy_dataset(model, tokenizer, prompt_completion_rows(), SETTINGS, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.jsonl"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("generation ran although the cache holds the text")

    monkeypatch.setattr(on_policy, "generate_continuations", fail)
    second = build_on_policy_dataset(model, tokenizer, prompt_completion_rows(), SETTINGS, cache_dir=tmp_path)
    assert second.to_list() == first.to_list()


def test_cache_key_changes_with_inputs(load_tiny):
    model, tokenizer = load_tiny("llama")
    key = on_policy.on_policy_cache_key(model, tokenizer, PROMPTS, SETTINGS)
    assert key == on_policy.on_policy_cache_key(model, tokenizer, list(PROMPTS), SETTINGS)
    assert key != on_policy.on_policy_cache_key(model, tokenizer, PROMPTS[:-1], SETTINGS)
    sampled = OnPolicySettings(max_new_tokens=6, batch_size=3, do_sample=True)
    assert key != on_policy.on_policy_cache_key(model, tokenizer, PROMPTS, sampled)
    other_model, _ = load_tiny("qwen3")
    assert key != on_policy.on_policy_cache_key(other_model, tokenizer, PROMPTS, SETTINGS)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1.0
    assert key != on_policy.on_policy_cache_key(model, tokenizer, PROMPTS, SETTINGS)


def test_foreign_file_is_not_overwritten(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    key = on_policy.on_policy_cache_key(model, tokenizer, PROMPTS, SETTINGS)
    data_file = tmp_path / f"on-policy-{key[:24]}.jsonl"
    meta_file = tmp_path / f"on-policy-{key[:24]}.json"
    data_file.write_text('{"mine": 1}\n')
    meta_file.write_text(json.dumps({"key": "someone else's"}))
    with pytest.raises(MaskTokError, match="not overwritten"):
        build_on_policy_dataset(model, tokenizer, prompt_completion_rows(), SETTINGS, cache_dir=tmp_path)
    assert data_file.read_text() == '{"mine": 1}\n'

    meta_file.unlink()
    with pytest.raises(MaskTokError, match="only one of"):
        build_on_policy_dataset(model, tokenizer, prompt_completion_rows(), SETTINGS, cache_dir=tmp_path)
    assert data_file.read_text() == '{"mine": 1}\n'


def test_messages_become_conversational_pairs(load_tiny, tmp_path):
    model, tokenizer = load_tiny("qwen3")
    rows = [
        {"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]},
        {"messages": [{"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5 w6"}]},
    ]
    result = build_on_policy_dataset(model, tokenizer, Dataset.from_list(rows), SETTINGS, cache_dir=tmp_path)
    assert result[0]["prompt"] == [{"role": "user", "content": "w1 w2"}]
    assert [message["role"] for message in result[0]["completion"]] == ["assistant"]

    prompt_ids = tokenizer.apply_chat_template(result[1]["prompt"], add_generation_prompt=True, return_tensors="pt")
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    output = model.generate(prompt_ids, max_new_tokens=SETTINGS.max_new_tokens, do_sample=False)
    generated = output[0, prompt_ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    assert result[1]["completion"][0]["content"] == tokenizer.decode(generated, skip_special_tokens=True)


def test_sampling_is_seeded(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    sampled = OnPolicySettings(max_new_tokens=8, batch_size=4, do_sample=True, seed=3)
    first = build_on_policy_dataset(model, tokenizer, prompt_completion_rows(), sampled, cache_dir=tmp_path / "a")
    second = build_on_policy_dataset(model, tokenizer, prompt_completion_rows(), sampled, cache_dir=tmp_path / "b")
    assert first["completion"] == second["completion"]


def test_text_rows_are_rejected(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    with pytest.raises(MaskTokError, match="needs prompts"):
        build_on_policy_dataset(model, tokenizer, Dataset.from_list([{"text": "w1 w2"}]), SETTINGS, cache_dir=tmp_path)
