"""Tiny random models with matching word-level tokenizers, built from configs (no downloads).

Three shapes cover the three ways the mask row is found:
- "llama": untied embeddings; the tokenizer has reserved special tokens (Llama-3 style).
- "qwen3": tied embeddings; the matrix has spare rows beyond the tokenizer (Qwen style).
- "gpt2": tied embeddings, Conv1D projections, no free row (the row is added).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

KINDS = ("llama", "qwen3", "gpt2")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IM_START_ID, IM_END_ID = range(6)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
HIDDEN = 32


def build_tokenizer(num_words: int, reserved: int = 0) -> PreTrainedTokenizerFast:
    """Build a whitespace word-level tokenizer: the special tokens, then w0..w{n-1}, then reserved tokens."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for index in range(num_words):
        vocab[f"w{index}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if reserved:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [f"<|reserved_special_token_{i}|>" for i in range(reserved)]},
            replace_extra_special_tokens=False,
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(kind: str, seed: int = 0):
    """Return (model, tokenizer) of the given kind with random weights."""
    torch.manual_seed(seed)
    common = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if kind == "llama":
        tokenizer = build_tokenizer(num_words=114, reserved=4)  # 124 tokens in 128 rows
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=256,
            **common,
        )
        model = LlamaForCausalLM(config)
    elif kind == "qwen3":
        tokenizer = build_tokenizer(num_words=94)  # 100 tokens in 128 rows
        config = Qwen3Config(
            vocab_size=128,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=True,
            max_position_embeddings=256,
            **common,
        )
        model = Qwen3ForCausalLM(config)
    elif kind == "gpt2":
        tokenizer = build_tokenizer(num_words=94)  # 100 tokens in 100 rows
        config = GPT2Config(vocab_size=100, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; use one of {KINDS}")
    model.generation_config.pad_token_id = PAD_ID
    return model.eval(), tokenizer


def save_tiny(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer to `folder` and return it."""
    model, tokenizer = build_tiny(kind, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
