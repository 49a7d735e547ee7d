"""Training throughput of the distillation step: the packed layout against the cached gated path.

Run from the repository root:

    python benchmarks/training_throughput.py

It loads SmolLM2-135M-Instruct (the package's default model), adds a gated masktok adapter (LoRA
r=16 on all seven projections), and times full training steps (distillation_step, backward,
AdamW step) on GSM8K question/answer pairs with completion-only supervision. The two paths
alternate step by step on the same batches and the same k, so both see the same machine load.
It prints supervised positions per second for each path and their ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import peft
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from masktok_peft import MaskTokConfig
from masktok_peft.models import default_model_path
from masktok_peft.training import distillation_step

logger = logging.getLogger("training_throughput")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSON lines with question and answer."
    )
    parser.add_argument("--batch-size", type=int, default=2, help="Rows per step.")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per row after truncation.")
    parser.add_argument("--max-k", type=int, default=8, help="k is drawn uniformly from [2, max-k] for each round.")
    parser.add_argument("--region-size", type=int, default=32, help="Packed layout: slots per region.")
    parser.add_argument(
        "--blocks-per-sequence",
        type=int,
        default=None,
        help="Cached path: blocks per row (default: one per supervised position).",
    )
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds; each runs one step of each path.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the batches, k and layouts.")
    return parser.parse_args()


def load_batches(tokenizer, path: Path, count: int, batch_size: int, max_length: int):
    """Tokenize `count` batches of question + answer; only the answer tokens are supervised."""
    rows = [json.loads(line) for line in path.read_text().splitlines()[: count * batch_size]]
    batches = []
    for start in range(0, len(rows), batch_size):
        encoded = []
        for row in rows[start : start + batch_size]:
            prompt = tokenizer(row["question"] + "\n", add_special_tokens=False)["input_ids"]
            answer = tokenizer(row["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            ids = (prompt + answer)[:max_length]
            encoded.append((ids, min(len(prompt), len(ids))))
        seq_len = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), seq_len), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        supervised = torch.zeros_like(input_ids, dtype=torch.bool)
        for index, (ids, prompt_length) in enumerate(encoded):
            input_ids[index, : len(ids)] = torch.tensor(ids)
            attention_mask[index, : len(ids)] = 1
            supervised[index, prompt_length : len(ids)] = True
        batches.append((input_ids, attention_mask, supervised))
    return batches


def timed_step(model, optimizer, batch, k, settings, generator) -> tuple[float, int]:
    """Run one training step and return (seconds, supervised positions)."""
    start = time.perf_counter()
    output = distillation_step(model, *batch, k, generator=generator, **settings)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    optimizer.step()
    return time.perf_counter() - start, output.num_positions


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    config = MaskTokConfig(
        r=16,
        lora_alpha=32,
        target_modules=PROJECTIONS,
        gated=True,
        max_k=args.max_k,
        tokenizer_name_or_path=str(model_dir),
    )
    model = peft.get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    paths = {
        "packed": dict(layout="packed", region_size=args.region_size),
        "cached": dict(layout="cached", blocks_per_sequence=args.blocks_per_sequence),
    }
    batches = load_batches(tokenizer, args.data, args.rounds + 1, args.batch_size, args.max_length)
    draw = np.random.default_rng(args.seed)
    ks = [int(draw.integers(2, args.max_k + 1)) for _ in batches]
    generator = torch.Generator().manual_seed(args.seed)

    # The first round warms up both paths and is not counted.
    seconds = {name: [] for name in paths}
    positions = {name: [] for name in paths}
    for round_index in tqdm(range(len(batches)), desc="rounds"):
        for name, settings in paths.items():
            elapsed, count = timed_step(model, optimizer, batches[round_index], ks[round_index], settings, generator)
            if round_index > 0:
                seconds[name].append(elapsed)
                positions[name].append(count)

    print(f"model: SmolLM2-135M-Instruct (float32, sdpa), gated masktok adapter r=16 on {len(PROJECTIONS)} projections")
    print(
        f"batch {args.batch_size} x up to {args.max_length} tokens, k drawn from [2, {args.max_k}] per round: "
        f"{ks[1:]}, {args.rounds} timed rounds, {torch.get_num_threads()} threads"
    )
    rates = {}
    for name in paths:
        rates[name] = sum(positions[name]) / sum(seconds[name])
        print(
            f"{name:>6}: {rates[name]:7.1f} supervised positions/s, "
            f"{statistics.mean(seconds[name]):5.2f} s/step (median {statistics.median(seconds[name]):.2f}), "
            f"{statistics.mean(positions[name]):6.1f} positions/step"
        )
    print(f"cached / packed: {rates['cached'] / rates['packed']:.2f}x")


if __name__ == "__main__":
    main()
