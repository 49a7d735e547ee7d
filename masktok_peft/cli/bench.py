"""`masktok bench`: decoding methods side by side on GSM8K: tokens per pass, speed and fidelity.

All methods answer the same questions in one process and alternate batch by batch (see
`masktok_peft.benchmark`). The report goes to --output-dir: results.json, outputs.jsonl (every
answer), results.md (the table) and speedup_vs_fidelity.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
from pathlib import Path

from ..benchmark import DEFAULT_BATCH_SIZES, DEFAULT_METHODS
from ..benchmark_report import DEFAULT_DOCS_SECTION, validate_docs_section
from .common import positive_int

# --quick: a smoke run that checks the whole pipeline in seconds on a tiny model, or minutes on a real one.
QUICK_LIMIT = 4
QUICK_MAX_NEW_TOKENS = 16
QUICK_BATCH_SIZES = (1, 2)
DEFAULT_MAX_NEW_TOKENS = 256
DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Compare decoding methods side by side: tokens per pass, speed and fidelity.",
        description=(
            "Answer GSM8K test questions with stock greedy decoding, stock prompt lookup decoding and the masktok "
            "policies, alternating the methods batch by batch in one process, and report tokens per forward pass, "
            "tokens per second, the speed-up over stock greedy, and fidelity (answers identical to stock greedy, "
            "accuracy, and the base model's negative log-likelihood of each answer)."
        ),
    )
    options = [
        parser.add_argument(
            "--data",
            required=True,
            help="GSM8K test data: a JSONL/JSON/Parquet file, a folder holding test.jsonl, or a Hub id (openai/gsm8k).",
        ),
        parser.add_argument(
            "--split", default="test", help="Split to read from a folder or Hub dataset (default test)."
        ),
        parser.add_argument(
            "--limit",
            type=positive_int,
            help=f"Use only the first N questions. Default: all; {QUICK_LIMIT} with --quick.",
        ),
        parser.add_argument(
            "--model",
            help="Base model: a Hub id or local folder. Default: the base model named in the adapter's config.",
        ),
        parser.add_argument(
            "--adapter",
            help="masktok adapter: a Hub id or local folder. Default: the adapter shipped for the default model.",
        ),
        parser.add_argument(
            "--label", help="Name of --adapter in the report. Default: 'gated' or 'ungated', from its config."
        ),
        parser.add_argument(
            "--compare-adapter",
            help="A second masktok adapter for the same base model, measured in the same run (for example an ungated "
            "one). The stock methods run once and are the reference for both adapters.",
        ),
        parser.add_argument(
            "--compare-label",
            help="Name of --compare-adapter in the report. Default: 'gated' or 'ungated', from its config.",
        ),
        parser.add_argument(
            "--methods",
            nargs="+",
            default=list(DEFAULT_METHODS),
            metavar="SPEC",
            help="Methods to run: stock, lookup:N (prompt lookup with N tokens), confadapt:THRESHOLD, static:K, or "
            f"another masktok policy by name (such as off). stock is required. Default: {' '.join(DEFAULT_METHODS)}.",
        ),
        parser.add_argument(
            "--batch-sizes",
            nargs="+",
            type=positive_int,
            metavar="N",
            help=f"Batch sizes to measure. Default: {' '.join(map(str, DEFAULT_BATCH_SIZES))}; "
            f"{' '.join(map(str, QUICK_BATCH_SIZES))} with --quick.",
        ),
        parser.add_argument(
            "--max-new-tokens",
            type=positive_int,
            help=f"Max new tokens per answer. Default: {DEFAULT_MAX_NEW_TOKENS}; {QUICK_MAX_NEW_TOKENS} with --quick.",
        ),
        parser.add_argument(
            "--max-k",
            type=positive_int,
            help="Max tokens per pass for the masktok methods other than static:K. Default: the adapter's max_k.",
        ),
        parser.add_argument(
            "--threads", type=positive_int, help="torch CPU threads (torch.set_num_threads). Default: torch's."
        ),
        parser.add_argument("--device", help="Device, such as cpu or cuda:0. Default: cuda when available, else cpu."),
        parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Weight dtype (default float32)."),
        parser.add_argument(
            "--output-dir", default="masktok-bench", help="Folder for the report files (default ./masktok-bench)."
        ),
        parser.add_argument(
            "--docs-file",
            help="Also write the report section into this Markdown file (such as docs/benchmarks.md), between the "
            "markers of --docs-section, and copy the plot next to it.",
        ),
        parser.add_argument(
            "--docs-section",
            type=_docs_section,
            default=DEFAULT_DOCS_SECTION,
            metavar="NAME",
            help="Which section of --docs-file to replace: the one between '<!-- masktok bench NAME: begin -->' and "
            "'<!-- masktok bench NAME: end -->'. Other sections stay. The plot is copied as "
            f"decoding_NAME.png. Default: {DEFAULT_DOCS_SECTION} (plot decoding_speedup_vs_fidelity.png).",
        ),
        parser.add_argument("--no-plot", action="store_true", help="Skip the plot, which needs matplotlib."),
        parser.add_argument(
            "--quick",
            action="store_true",
            help=f"Smoke run: {QUICK_LIMIT} questions, {QUICK_MAX_NEW_TOKENS} new tokens, batch sizes "
            f"{' and '.join(map(str, QUICK_BATCH_SIZES))}, for each of these options not set explicitly.",
        ),
    ]
    parser.set_defaults(bench_options=options)


def _docs_section(value: str) -> str:
    try:
        return validate_docs_section(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def command_line(args: argparse.Namespace) -> str:
    """Rebuild the `masktok bench` command from the parsed options, leaving out those at their defaults."""
    parts = ["masktok", args.command]
    for option in args.bench_options:
        value = getattr(args, option.dest)
        if value is None or value is False or value == option.default:
            continue
        parts.append(option.option_strings[-1])
        if isinstance(value, list):
            parts.extend(str(item) for item in value)
        elif value is not True:
            parts.append(str(value))
    return shlex.join(parts)


def _adapter_label(label: str | None, model) -> str:
    if label:
        return label
    return "gated" if model.peft_config[model.active_adapter].gated else "ungated"


def load_models(args: argparse.Namespace):
    """Load --adapter, and --compare-adapter onto the same base model. Returns ({label: model}, paths, tokenizer)."""
    import peft
    import torch

    from ..models import DEFAULT_ADAPTER_DIR, load_default_adapter, load_masktok_model

    dtype = getattr(torch, args.dtype)
    if args.adapter is None:
        if args.model is not None:
            raise ValueError(
                "--model needs --adapter: the shipped adapter only fits the default model. Train one for this "
                "model with `masktok train`, or drop --model."
            )
        model, tokenizer = load_default_adapter(dtype=dtype)
        adapter_path = str(DEFAULT_ADAPTER_DIR)
    else:
        model, tokenizer = load_masktok_model(args.adapter, args.model, dtype=dtype)
        adapter_path = args.adapter
    models = {_adapter_label(args.label, model): model}
    paths = {_adapter_label(args.label, model): adapter_path}

    if args.compare_adapter is not None:
        recorded = model.peft_config[model.active_adapter].base_model_name_or_path
        compare_recorded = peft.PeftConfig.from_pretrained(args.compare_adapter).base_model_name_or_path
        if args.model is None and compare_recorded != recorded:
            raise ValueError(
                f"--adapter was trained on {recorded!r} but --compare-adapter on {compare_recorded!r}. The comparison "
                "needs one base model: pass --model to load both adapters onto it."
            )
        # The stock methods run once, so both adapters must sit on the very same base weights.
        compare, _ = load_masktok_model(args.compare_adapter, model.get_base_model().name_or_path, dtype=dtype)
        label = _adapter_label(args.compare_label, compare)
        if label in models:
            raise ValueError(
                f"Both adapters would be labelled {label!r} in the report. Pass --label and --compare-label."
            )
        models[label] = compare
        paths[label] = args.compare_adapter

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for peft_model in models.values():
        peft_model.to(device)
    return models, paths, tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmark import BenchmarkSettings, run_benchmark
    from ..benchmark_report import check_docs_file, render_table, write_report
    from ..data import load_training_dataset, require_columns

    limit = args.limit or (QUICK_LIMIT if args.quick else None)
    settings = BenchmarkSettings(
        methods=tuple(args.methods),
        batch_sizes=tuple(args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else DEFAULT_BATCH_SIZES)),
        max_new_tokens=args.max_new_tokens or (QUICK_MAX_NEW_TOKENS if args.quick else DEFAULT_MAX_NEW_TOKENS),
        max_k=args.max_k,
    )
    # Checked before loading anything, so that a missing package or folder does not cost a finished run.
    if args.docs_file is not None:
        check_docs_file(args.docs_file, args.docs_section)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError(
            "The plot needs matplotlib, which is not installed: pip install matplotlib, or pass --no-plot."
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dataset = load_training_dataset(args.data, split=args.split)
    require_columns(dataset, ("question", "answer"), "The GSM8K benchmark")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = [dict(row) for row in dataset]
    models, paths, tokenizer = load_models(args)

    result = run_benchmark(models, tokenizer, rows, settings)
    result.metadata["command"] = command_line(args)
    result.metadata["data"] = args.data
    result.metadata["split"] = args.split
    for label, path in paths.items():
        result.metadata["adapters"][label]["path"] = path
    written = write_report(
        result, args.output_dir, plot=not args.no_plot, docs_file=args.docs_file, docs_section=args.docs_section
    )

    print(render_table(result))
    print()
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0
