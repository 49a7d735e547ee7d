"""A few MaskTokTrainer steps on SmolLM2-135M-Instruct with GSM8K (slow: a real model on CPU)."""

from pathlib import Path

import peft
import pytest
import torch

from masktok_peft import MaskTokConfig
from masktok_peft.data import format_gsm8k, load_training_dataset
from masktok_peft.models import load_model_and_tokenizer
from masktok_peft.training import MaskTokTrainer, MaskTokTrainingConfig

GSM8K_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").is_file(), reason=f"GSM8K not found at {GSM8K_DIR}"),
]


@pytest.mark.parametrize("layout", ["packed", "cached"])
def test_smollm2_gsm8k_steps(smollm2_dir, tmp_path, layout):
    model, tokenizer = load_model_and_tokenizer(str(smollm2_dir))
    rows = load_training_dataset(GSM8K_DIR, split="train").select(range(3))
    dataset = format_gsm8k(rows, "conversational")
    args = MaskTokTrainingConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=1,
        max_length=128,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_k=8,
        layout=layout,
        blocks_per_sequence=16,
        seed=0,
    )
    trainer = MaskTokTrainer(
        model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=8, target_modules="all-linear"),
    )
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        assert entry["agreement/offset_0"] == 1.0  # gated adapter: the real position is the base model
        assert "agreement/offset_1" in entry
        assert 1.0 <= entry["tokens_per_pass"] <= 8.0
        assert entry["num_supervised_positions"] > 0

    trainer.save_model(str(tmp_path / "adapter"))
    base, _ = load_model_and_tokenizer(str(smollm2_dir))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    mask_rows = {name: parameter for name, parameter in loaded.named_parameters() if "masktok_row" in name}
    trained_rows = {name: parameter for name, parameter in trainer.model.named_parameters() if "masktok_row" in name}
    assert mask_rows.keys() == trained_rows.keys()
    for name in mask_rows:
        torch.testing.assert_close(mask_rows[name], trained_rows[name].detach())
