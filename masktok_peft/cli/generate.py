"""`masktok generate`: answer one prompt with a masktok adapter and print the text and statistics."""

from __future__ import annotations

import argparse
import json

from .common import add_decoding_arguments, add_model_arguments, decoding_kwargs, load_peft_model, positive_int


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Generate text for one prompt with a masktok adapter.",
        description="Generate text for one prompt with a masktok adapter and print the decoding statistics.",
    )
    parser.add_argument(
        "--prompt", required=True, help="The prompt (a user message when the model has a chat template)."
    )
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="Max new tokens (default 256).")
    add_decoding_arguments(parser)
    parser.add_argument(
        "--no-chat-template", action="store_true", help="Feed the prompt as raw text, without the chat template."
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object with `text` and `masktok_stats`.")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_peft_model(args.adapter, args.model)
    if tokenizer.chat_template and not args.no_chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        prompt = args.prompt
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        **decoding_kwargs(args),
    )
    new_tokens = output.sequences[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    stats = output.masktok_stats
    if args.json:
        print(json.dumps({"text": text, "masktok_stats": stats}))
        return 0
    print(text)
    print(
        f"\n[{stats['new_tokens']} tokens in {stats['forward_passes']} forward passes: "
        f"{stats['tokens_per_pass']:.2f} tokens per pass; accepted lengths {stats['accepted_histogram']}]"
    )
    return 0
