"""`masktok eval gsm8k`: GSM8K accuracy and tokens per pass, for the adapter and for stock `generate`."""

from __future__ import annotations

import argparse
import json

from .common import add_decoding_arguments, add_model_arguments, decoding_kwargs, load_peft_model, positive_int

TASKS = ("gsm8k",)


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Evaluate accuracy and tokens per pass on a benchmark.",
        description=(
            "Answer GSM8K test questions with the masktok adapter and with the base model's stock generate, "
            "and report accuracy (final number) and tokens per forward pass for both."
        ),
    )
    parser.add_argument("task", choices=TASKS, help="Benchmark to run.")
    parser.add_argument(
        "--data",
        required=True,
        help=(
            "GSM8K test data: a JSONL, JSON or Parquet file, a folder holding test.jsonl, or a Hub id such as "
            "openai/gsm8k."
        ),
    )
    parser.add_argument("--split", default="test", help="Split to read from a folder or Hub dataset (default test).")
    parser.add_argument("--limit", type=positive_int, help="Evaluate only the first N questions.")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="Questions per generate call (default 1).")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="Max new tokens per answer.")
    add_model_arguments(parser)
    add_decoding_arguments(parser)
    parser.add_argument("--skip-stock", action="store_true", help="Evaluate only the adapter, not stock generate.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object with both results.")


def run(args: argparse.Namespace) -> int:
    from ..data import load_training_dataset, require_columns
    from ..evaluation import evaluate_gsm8k

    dataset = load_training_dataset(args.data, split=args.split)
    require_columns(dataset, ("question", "answer"), "GSM8K evaluation")
    rows = [dict(row) for row in (dataset.select(range(min(args.limit, len(dataset)))) if args.limit else dataset)]
    model, tokenizer = load_peft_model(args.adapter, args.model)

    methods = ["masktok"] if args.skip_stock else ["stock", "masktok"]
    results = {}
    for method in methods:
        results[method] = evaluate_gsm8k(
            model,
            tokenizer,
            rows,
            method=method,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            generate_kwargs=decoding_kwargs(args) if method == "masktok" else None,
            progress=not args.json,
        )

    if args.json:
        summary = {method: result.as_dict() for method, result in results.items()}
        summary["questions"] = len(rows)
        if "stock" in results:
            summary["speedup"] = _speedup(results)
        print(json.dumps(summary))
        return 0
    print(f"GSM8K, {len(rows)} questions")
    print(f"{'method':<10} {'accuracy':>9} {'tokens/pass':>12} {'tokens/s':>9}")
    for method, result in results.items():
        print(f"{method:<10} {result.accuracy:>9.3f} {result.tokens_per_pass:>12.2f} {result.tokens_per_second:>9.1f}")
    if "stock" in results:
        print(f"wall-clock speed-up (tokens/s, masktok / stock): {_speedup(results):.2f}x")
    return 0


def _speedup(results) -> float:
    stock = results["stock"].tokens_per_second
    return results["masktok"].tokens_per_second / stock if stock else float("nan")
