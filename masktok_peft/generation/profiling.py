"""Profiling of decoding time: the model's forward passes against everything else, for several methods side by side.

Run `python -m masktok_peft.generation.profiling --threads 1` to profile the default model
(SmolLM2-135M-Instruct) with a fresh adapter shaped like the default recipe's (r=16 on all seven
projections), on the bundled demo questions. The methods run in alternation, one round after
another, so that a shared machine's load affects them alike; compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from .loop import _cache_argument_name

RECIPE_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS: dict[str, dict[str, Any] | None] = {
    "stock greedy": None,  # stock `generate` with the adapter disabled
    "off": {"masktok_policy": "off"},
    "confadapt adaptive": {"masktok_policy": "confadapt"},
    "confadapt fixed k": {"masktok_policy": "confadapt", "masktok_adaptive": False},
    "verify adaptive": {"masktok_policy": "verify"},
}


class ForwardTimer:
    """Accumulate the wall time and number of calls of `module.forward`, through forward hooks."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after),
        ]

    def _before(self, module, args) -> None:
        self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class MethodTimes:
    """Per-round measurements of one decoding method."""

    wall: list[float] = field(default_factory=list)  # seconds per generate() call
    forward: list[float] = field(default_factory=list)  # seconds inside the model's forward passes
    passes: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    mask_slots_per_pass: list[float] = field(default_factory=list)

    def summary(self, reference: MethodTimes, batch_size: int) -> dict[str, float]:
        """Return medians over rounds and the ratios to `reference` (stock greedy) in the same rounds."""
        per_pass = [wall / passes for wall, passes in zip(self.wall, self.passes, strict=True)]
        outside = [
            (wall - forward) / passes
            for wall, forward, passes in zip(self.wall, self.forward, self.passes, strict=True)
        ]
        forward_per_pass = [forward / passes for forward, passes in zip(self.forward, self.passes, strict=True)]
        time_ratio = [wall / stock for wall, stock in zip(self.wall, reference.wall, strict=True)]
        return {
            "tokens_per_row_pass": sum(self.new_tokens) / (sum(self.passes) * batch_size),
            "mask_slots_per_pass": statistics.median(self.mask_slots_per_pass) if self.mask_slots_per_pass else 0.0,
            "ms_per_pass": 1000 * statistics.median(per_pass),
            "forward_ms_per_pass": 1000 * statistics.median(forward_per_pass),
            "outside_ms_per_pass": 1000 * statistics.median(outside),
            "outside_share_of_pass": statistics.median(o / f for o, f in zip(outside, forward_per_pass, strict=True)),
            "time_vs_stock": statistics.median(time_ratio),
        }


def time_pass_widths(
    model, mask_token_id: int, context_length: int, widths: list[int], repeats: int
) -> dict[str, float]:
    """Return the median seconds of one decoding pass per layout, with the layouts interleaved.

    Each pass appends one real token plus `width - 1` mask tokens to a cache of `context_length`
    tokens and is then cropped back, as the decoding loop does. "stock" is a one-token pass with
    the adapter disabled. Interleaving the layouts pass by pass keeps a shared machine's changing
    load out of their ratios.
    """
    from transformers import DynamicCache

    base = model.get_base_model()
    context = torch.randint(100, 1000, (1, context_length))
    cache = DynamicCache(config=base.config)
    cache_argument = _cache_argument_name(base)
    with torch.no_grad():
        base(input_ids=context, use_cache=True, **{cache_argument: cache})
    layouts = {"stock": 1, **{f"k={width}": width for width in widths}}
    samples: dict[str, list[float]] = {name: [] for name in layouts}
    with torch.no_grad():
        for _ in range(repeats):
            for name, width in layouts.items():
                input_ids = torch.full((1, width), mask_token_id)
                input_ids[0, 0] = 500
                positions = torch.arange(context_length, context_length + width)[None, :]
                arguments = {"input_ids": input_ids, "position_ids": positions, cache_argument: cache}
                # Entering and leaving disable_adapter() visits every adapter layer, so it stays outside the timing.
                with model.disable_adapter() if name == "stock" else contextlib.nullcontext():
                    start = time.perf_counter()
                    base(**arguments, logits_to_keep=width)
                    samples[name].append(time.perf_counter() - start)
                cache.crop(-width)
    return {name: statistics.median(values) for name, values in samples.items()}


def load_questions(count: int) -> list[str]:
    text = resources.files("masktok_peft").joinpath("demo_questions.jsonl").read_text()
    questions = [json.loads(line)["question"] for line in text.splitlines() if line.strip()]
    return (questions * (count // len(questions) + 1))[:count]


def profile(model, tokenizer, batch_size: int, max_new_tokens: int, rounds: int, max_k: int) -> dict[str, MethodTimes]:
    """Run every method of METHODS once per round on the same prompts and return their measurements."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in load_questions(batch_size)
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_length = inputs.input_ids.shape[1]
    timer = ForwardTimer(model.get_base_model())
    times = {name: MethodTimes() for name in METHODS}
    try:
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for name, arguments in METHODS.items():
                timer.reset()
                start = time.perf_counter()
                if arguments is None:
                    # Entering and leaving disable_adapter() visits every adapter layer, so it stays outside the timing.
                    with model.disable_adapter():
                        start = time.perf_counter()
                        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                        wall = time.perf_counter() - start
                    slots = 0.0
                else:
                    output = model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        masktok_max_k=max_k,
                        return_dict_in_generate=True,
                        **arguments,
                    )
                    sequences, slots = output.sequences, output.masktok_stats["mask_slots_per_pass"]
                    wall = time.perf_counter() - start
                record = times[name]
                record.wall.append(wall)
                record.forward.append(timer.seconds)
                record.passes.append(timer.calls)
                record.new_tokens.append(int((sequences[:, prompt_length:] != tokenizer.pad_token_id).sum()))
                record.mask_slots_per_pass.append(slots)
    finally:
        timer.remove()
    for record in times.values():  # drop the warm-up round
        for values in (record.wall, record.forward, record.passes, record.new_tokens, record.mask_slots_per_pass):
            del values[0]
    return times


def main() -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..config import MaskTokConfig
    from ..models import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="Batch sizes to profile.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="New tokens per row.")
    parser.add_argument("--rounds", type=int, default=3, help="Measured rounds after one warm-up round.")
    parser.add_argument("--max-k", type=int, default=8, help="masktok_max_k, as in the default recipe.")
    parser.add_argument("--widths-only", action="store_true", help="Time single passes by width and stop.")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = MaskTokConfig(r=16, lora_alpha=32, target_modules=RECIPE_TARGET_MODULES, init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()

    widths = [1, 2, 4, 8, 16]
    pass_times = time_pass_widths(model, model.peft_config["default"].mask_token_id, 200, widths, repeats=30)
    print(f"\none pass after 200 cached tokens, batch size 1, {args.threads} thread(s), median of 30, interleaved")
    for name, seconds in pass_times.items():
        print(f"{name}: {1000 * seconds:.1f} ms, {seconds / pass_times['stock']:.2f}x stock")
    if args.widths_only:
        return

    for batch_size in args.batch_sizes:
        times = profile(model, tokenizer, batch_size, args.max_new_tokens, args.rounds, args.max_k)
        reference = times["stock greedy"]
        rows = {name: record.summary(reference, batch_size) for name, record in times.items()}
        columns = list(next(iter(rows.values())))
        print(f"\nbatch size {batch_size}, {args.threads} thread(s), {args.rounds} rounds, medians")
        print("| method | " + " | ".join(columns) + " |")
        print("| --- " * (len(columns) + 1) + "|")
        for name, summary in rows.items():
            print(f"| {name} | " + " | ".join(f"{summary[column]:.3g}" for column in columns) + " |")


if __name__ == "__main__":
    main()
