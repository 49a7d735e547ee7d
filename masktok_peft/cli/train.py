"""`masktok train RECIPE.yaml`: train a masktok adapter from a recipe."""

from __future__ import annotations

import argparse
import json

from .common import existing_path


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Train a masktok adapter from a YAML recipe.",
        description=(
            "Train a masktok adapter by self-distillation as a YAML recipe describes, save it to the recipe's "
            "training.output_dir and print a summary (steps, time, final teacher agreement, estimated tokens per pass)."
        ),
    )
    parser.add_argument("recipe", type=existing_path, help="Recipe file, for example recipes/smollm2-135m-gsm8k.yaml.")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a recipe value, as in --set training.max_steps=10 (repeatable; values are read as YAML).",
    )
    parser.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in output_dir.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Only parse and validate the recipe; load no model and train nothing."
    )


def run(args: argparse.Namespace) -> int:
    from ..recipes import build_configs, load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        adapter_config, training_config = build_configs(recipe)
        print(f"{args.recipe}: valid (output_dir {training_config.output_dir}, max_k {adapter_config.max_k})")
        return 0
    summary = run_recipe(recipe, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0
