"""`masktok demo`: the default model answers a few math questions with stock `generate` and with ConfAdapt."""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

from .common import positive_int, threshold_value


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Answer a few math questions with stock generate and with ConfAdapt, side by side.",
        description=(
            "Load the default model (SmolLM2-135M-Instruct) and its shipped masktok adapter, answer a few "
            "grade-school math questions with stock greedy generate and with ConfAdapt, alternating the two, and "
            "print both answers, tokens per forward pass and the wall-clock speed-up measured in this run."
        ),
    )
    parser.add_argument("--questions", type=positive_int, default=5, help="Number of questions (default 5, max 5).")
    parser.add_argument("--max-new-tokens", type=positive_int, default=160, help="Max new tokens per answer.")
    parser.add_argument("--threshold", type=threshold_value, default=0.9, help="ConfAdapt threshold (default 0.9).")


def _demo_rows(count: int) -> list[dict]:
    text = resources.files("masktok_peft").joinpath("demo_questions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()][:count]


def run(args: argparse.Namespace) -> int:
    from ..evaluation import build_prompts, generate_batch, normalize_number, predicted_answer
    from ..models import load_default_adapter

    print("Loading SmolLM2-135M-Instruct and its masktok adapter...", flush=True)
    model, tokenizer = load_default_adapter()
    tokenizer.padding_side = "left"
    decoding = {"masktok_policy": "confadapt", "masktok_threshold": args.threshold}

    # One warm-up call each, so that first-call costs are not timed.
    warm_up = build_prompts(tokenizer, ["What is 2 + 2?"])
    for method in ("stock", "masktok"):
        generate_batch(model, tokenizer, warm_up, method, 8, decoding if method == "masktok" else None)

    totals = {"stock": [0, 0, 0.0, 0], "masktok": [0, 0, 0.0, 0]}  # new tokens, passes, seconds, correct
    for number, row in enumerate(_demo_rows(args.questions), start=1):
        prompt = build_prompts(tokenizer, [row["question"]])
        reference = normalize_number(row["answer"].rpartition("####")[2])
        print(f"\n=== Question {number}: {row['question']}")
        for method in ("stock", "masktok"):
            began = time.perf_counter()
            texts, counts, row_passes, _ = generate_batch(
                model, tokenizer, prompt, method, args.max_new_tokens, decoding if method == "masktok" else None
            )
            seconds = time.perf_counter() - began
            correct = predicted_answer(texts[0]) == reference
            figures = totals[method]
            figures[0] += counts[0]
            figures[1] += row_passes[0]
            figures[2] += seconds
            figures[3] += correct
            label = "stock generate" if method == "stock" else f"ConfAdapt (threshold {args.threshold})"
            print(
                f"--- {label}: {counts[0]} tokens, {row_passes[0]} passes, "
                f"{counts[0] / max(row_passes[0], 1):.2f} tokens/pass, {seconds:.2f} s, "
                f"{'correct' if correct else 'wrong'} (expected {reference})"
            )
            print(texts[0].strip())

    print("\n=== Summary")
    for method, (tokens, passes, seconds, correct) in totals.items():
        print(
            f"{method:<8} {tokens:>5} tokens  {passes:>5} passes  {tokens / max(passes, 1):.2f} tokens/pass  "
            f"{tokens / seconds:.1f} tokens/s  {correct}/{args.questions} correct"
        )
    stock_rate = totals["stock"][0] / totals["stock"][2]
    masktok_rate = totals["masktok"][0] / totals["masktok"][2]
    print(f"wall-clock speed-up (tokens/s, ConfAdapt / stock), measured in this run: {masktok_rate / stock_rate:.2f}x")
    return 0
