"""Peak memory and step time of a masktok training step against a plain LoRA SFT step.

Run from the repository root:

    python benchmarks/train_memory.py --rounds 2

Three trainers share one batch of GSM8K chat rows (completion-only supervision) on the same
model, by default SmolLM2-135M-Instruct:
- "lora-sft": TRL's SFTTrainer with a LoraConfig, its own loss (the fused LM head);
- "masktok-packed": MaskTokTrainer, packed layout;
- "masktok-cached": MaskTokTrainer, cached gated layout with --blocks-per-sequence blocks per row.
Both adapters put LoRA rank --rank on all linear layers; masktok adds its mask row. Each round
runs one full step (forward, backward, AdamW) of each trainer in turn, after one warm-up step
each, so all three see the same machine load. k is fixed to --k for every masktok step.

Memory is measured per step as the model's resident bytes (weights, buffers, optimizer state)
plus the step's peak above the memory in use when it starts. On CUDA the peak comes from
torch.cuda.max_memory_allocated. On CPU it is the resident set size sampled every millisecond,
after glibc's malloc_trim has returned freed memory to the system. The CPU figure is an
estimate: it also counts allocator overhead and anything else the process allocates meanwhile.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger("train_memory")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Model folder or Hub id (default: SmolLM2-135M-Instruct).")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Folder with GSM8K train.jsonl.")
    parser.add_argument("--batch-size", type=int, default=4, help="Rows per step.")
    parser.add_argument("--max-length", type=int, default=256, help="Tokens per row after truncation.")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of both adapters.")
    parser.add_argument("--k", type=int, default=8, help="Block size of every masktok step (min_k = max_k = k).")
    parser.add_argument("--region-size", type=int, default=32, help="Packed layout: slots per region.")
    parser.add_argument("--blocks-per-sequence", type=int, default=16, help="Cached layout: blocks per row.")
    parser.add_argument("--rounds", type=int, default=2, help="Measured rounds; each runs one step of each trainer.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument(
        "--no-gradient-checkpointing", action="store_true", help="Turn gradient checkpointing off for all trainers."
    )
    return parser.parse_args()


class PeakMemory:
    """Measure a code block's peak memory above the memory in use when it starts, in bytes."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.libc = None if self.cuda else ctypes.CDLL("libc.so.6")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page_size

    def _sample(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.start = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
            return self
        self.libc.malloc_trim(0)
        self.start = self._rss()
        self.peak = self.start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(self.stop,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.increase = self.torch.cuda.max_memory_allocated() - self.start
            return
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.increase = self.peak - self.start


def resident_bytes(trainer) -> int:
    """Bytes of the model's parameters and buffers plus the optimizer state."""
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    for state in trainer.optimizer.state.values():
        tensors.extend(value for value in state.values() if hasattr(value, "element_size"))
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def build_trainers(args, model_path: str, dataset, tokenizer):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from masktok_peft import MaskTokConfig
    from masktok_peft.training import MaskTokTrainer, MaskTokTrainingConfig

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="masktok-train-memory-"),
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    device_dtype = torch.float32
    trainers = {}

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=device_dtype)
    trainers["lora-sft"] = SFTTrainer(
        model,
        args=SFTConfig(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=args.rank, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for layout in ("packed", "cached"):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=device_dtype)
        config = MaskTokTrainingConfig(
            **common,
            layout=layout,
            min_k=args.k,
            max_k=args.k,
            region_size=args.region_size,
            blocks_per_sequence=args.blocks_per_sequence,
        )
        trainers[f"masktok-{layout}"] = MaskTokTrainer(
            model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=MaskTokConfig(r=args.rank, target_modules="all-linear", max_k=max(args.k, 2)),
        )
    for trainer in trainers.values():
        trainer.create_optimizer()
        # Trainer.train() sets this before its loop; training_step divides the loss by it.
        trainer.current_gradient_accumulation_steps = 1
        if trainer.args.gradient_checkpointing:
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer.model.to(trainer.args.device)
    return trainers


def run_step(trainer, batch) -> float:
    """Run one training step (forward, backward, optimizer step) and return its loss."""
    trainer.model.train()
    loss = trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "trl", "datasets", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import datasets
    import torch
    from transformers import AutoTokenizer

    from masktok_peft.data import format_gsm8k, load_training_dataset
    from masktok_peft.models import resolve_model

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = load_training_dataset(args.data, split="train").select(range(args.batch_size))
    dataset = format_gsm8k(rows, "conversational")

    trainers = build_trainers(args, model_path, dataset, tokenizer)
    reference = trainers["lora-sft"]
    examples = [reference.train_dataset[index] for index in range(args.batch_size)]
    batch = reference.data_collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    batch = {name: value.to(reference.args.device) for name, value in batch.items()}
    tokens = int(batch["attention_mask"].sum())
    supervised = int((batch["labels"] != -100).sum())
    logger.info(
        "model %s, batch %d rows x %d tokens (%d tokens, %d supervised), k=%d, %d threads, device %s, "
        "gradient checkpointing %s",
        Path(model_path).name,
        args.batch_size,
        batch["input_ids"].shape[1],
        tokens,
        supervised,
        args.k,
        torch.get_num_threads(),
        reference.args.device,
        not args.no_gradient_checkpointing,
    )

    for name, trainer in trainers.items():
        start = time.perf_counter()
        run_step(trainer, batch)
        logger.info("warm-up %-15s %.2f s", name, time.perf_counter() - start)

    times = {name: [] for name in trainers}
    increases = {name: [] for name in trainers}
    positions = {name: [] for name in trainers}
    for round_index in range(args.rounds):
        for name, trainer in trainers.items():
            before = getattr(trainer, "_total_supervised_positions", None)
            with PeakMemory(reference.args.device) as memory:
                start = time.perf_counter()
                loss = run_step(trainer, batch)
                elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            increases[name].append(memory.increase)
            if before is not None:
                positions[name].append(trainer._total_supervised_positions - before)
            logger.info(
                "round %d %-15s %.2f s, peak +%.0f MiB, loss %.3f",
                round_index,
                name,
                elapsed,
                memory.increase / 2**20,
                loss,
            )

    baseline_time = statistics.median(times["lora-sft"])
    baseline_peak = resident_bytes(reference) + max(increases["lora-sft"])
    baseline_increase = max(increases["lora-sft"])
    print()
    print(
        "| trainer | step time (s) | time ratio | peak memory (MiB) | memory ratio | step increase (MiB) "
        "| increase ratio | supervised positions/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, trainer in trainers.items():
        step_time = statistics.median(times[name])
        increase = max(increases[name])
        peak = resident_bytes(trainer) + increase
        rate = (
            f"{statistics.median(positions[name]) / step_time:.1f}"
            if positions[name]
            else f"{supervised / step_time:.1f} (SFT tokens)"
        )
        print(
            f"| {name} | {step_time:.2f} | {step_time / baseline_time:.2f} | {peak / 2**20:.0f} | "
            f"{peak / baseline_peak:.2f} | {increase / 2**20:.0f} | "
            f"{increase / max(baseline_increase, 1):.2f} | {rate} |"
        )


if __name__ == "__main__":
    main()
