"""The `masktok` command: one module per subcommand, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from . import bench, demo, evaluate, generate, train

SUBCOMMANDS = {"train": train, "generate": generate, "eval": evaluate, "bench": bench, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masktok",
        description="Multi-token decoding for Hugging Face causal language models with a masktok adapter.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="Log at DEBUG level.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        module.add_parser(subparsers, name)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Third-party INFO lines (weight loading, HTTP) drown the command's own messages.
    for noisy in ("transformers", "peft", "datasets", "accelerate", "httpx", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return SUBCOMMANDS[args.command].run(args) or 0
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"masktok {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
