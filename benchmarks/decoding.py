"""Decoding speed and fidelity side by side on GSM8K: stock greedy, prompt lookup, ConfAdapt and static k.

This script runs `masktok bench` and takes the same options (`--help` lists them). From the
repository root, with a local copy of the GSM8K test split (a folder holding test.jsonl):

    python benchmarks/decoding.py --data PATH/TO/gsm8k --limit 100 --threads 2 \
        --output-dir benchmark-results/decoding --docs-file docs/benchmarks.md

measures the shipped default adapter on SmolLM2-135M-Instruct at batch sizes 1 and 8 and writes
the table and plot into docs/benchmarks.md. Gated against ungated, in one table:

    python benchmarks/decoding.py --data PATH/TO/gsm8k --limit 100 --adapter runs/gated \
        --compare-adapter runs/ungated --compare-label ungated

`--quick` (4 questions, 16 new tokens, batch sizes 1 and 2) checks the set-up in a few minutes.
"""

from __future__ import annotations

import sys

from masktok_peft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
