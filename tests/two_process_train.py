"""Train a tiny masktok adapter for a few steps; `test_trainer.py` runs it under `accelerate launch`.

Usage:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        tests/two_process_train.py MODEL_DIR OUTPUT_DIR

`--multi_gpu` selects accelerate's torchrun launcher; ACCELERATE_USE_CPU=1 makes each process run
on the CPU with the gloo backend. (`--cpu` alone starts one process unless mpirun is installed.)

Each process writes OUTPUT_DIR/rank{N}.json with its process count, backend, the SHA-256 of its trained
adapter weights and of the initial ones, and the logged metrics, so the test can check that
data-parallel gradient averaging kept every process's weights identical.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from masktok_peft import MaskTokConfig  # noqa: E402
from masktok_peft.training import MaskTokTrainer, MaskTokTrainingConfig  # noqa: E402


def adapter_digest(model) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(model_dir: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"text": " ".join(f"w{(row * 5 + column) % 90}" for column in range(20))} for row in range(16)]
    args = MaskTokTrainingConfig(
        output_dir=output_dir,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_k=4,
        region_size=8,
        seed=7,
    )
    trainer = MaskTokTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4),
    )
    initial = adapter_digest(trainer.model)
    trainer.train()
    rank = trainer.accelerator.process_index
    result = {
        "num_processes": trainer.accelerator.num_processes,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "initial": initial,
        "trained": adapter_digest(trainer.model),
        "log_history": trainer.state.log_history,
    }
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
