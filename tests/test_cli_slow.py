"""The `masktok` command with the real default model and the shipped adapter."""

import json

import pytest
import torch
from cli_runner import run_cli

from masktok_peft import load_default_adapter
from masktok_peft.models import DEFAULT_ADAPTER_DIR

pytestmark = pytest.mark.slow




def test_default_adapter_is_shipped():
    assert (DEFAULT_ADAPTER_DIR / "adapter_config.json").is_file()
    assert (DEFAULT_ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_load_default_adapter_generates(smollm2_dir):
    model, tokenizer = load_default_adapter()
    inputs = tokenizer("What is 3 + 4?", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert output.sequences.shape[1] <= inputs["input_ids"].shape[1] + 8
    assert output.masktok_stats["new_tokens"] >= 1
    with torch.no_grad(), model.disable_adapter():
        stock = model.get_base_model().generate(**inputs, max_new_tokens=8, do_sample=False)
    verified = model.generate(**inputs, max_new_tokens=8, do_sample=False, masktok_policy="verify")
    assert torch.equal(verified, stock)


def test_generate_with_default_adapter(capsys, smollm2_dir):
    code, out, err = run_cli(capsys, "generate", "--prompt", "What is 3 + 4?", "--max-new-tokens", "12", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["masktok_stats"]["new_tokens"] <= 12


def test_demo_prints_both_methods(capsys, smollm2_dir):
    code, out, err = run_cli(capsys, "demo", "--questions", "1", "--max-new-tokens", "12")
    assert code == 0, err
    assert "--- stock generate" in out
    assert "--- ConfAdapt (threshold 0.9)" in out
    assert "wall-clock speed-up" in out
