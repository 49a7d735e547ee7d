"""Round trip of a masktok adapter on the real SmolLM2-135M-Instruct."""

import peft
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from masktok_peft import MaskTokConfig

pytestmark = pytest.mark.slow

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_smollm2_round_trip(smollm2_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    peft_model = peft.get_peft_model(
        model, MaskTokConfig(r=16, target_modules=ATTENTION_PROJECTIONS, init_lora_weights=False)
    )
    mask_id = peft_model.peft_config["default"].mask_token_id
    assert mask_id == 49152  # no reserved or spare row in SmolLM2, so one row is added

    prompt = tokenizer("Natalia sold clips to 48 of her friends.", return_tensors="pt").input_ids
    ids = torch.cat([prompt, torch.full((1, 7), mask_id)], dim=1)
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)

    adapter_file = tmp_path / "adapter_model.safetensors"
    assert adapter_file.stat().st_size < 10 * 1024 * 1024

    stock = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    loaded = PeftModel.from_pretrained(stock, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)
