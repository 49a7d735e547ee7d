"""GSM8K evaluation: prompts, answer extraction, and accuracy with tokens per forward pass.

The same questions are answered two ways: by the masktok adapter through `generate`, and by the
base model's stock `generate` with the adapter disabled. Accuracy compares the last number of the
answer (or the number after "####" when the answer has one) with the reference's final number.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .data import gsm8k_final_answer

logger = logging.getLogger(__name__)

METHODS = ("masktok", "stock")
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> Optional[str]:
    """Return a number written as text in a canonical form ("1,200.00" -> "1200"), or None."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else str(value)


def predicted_answer(text: str) -> Optional[str]:
    """Extract the answer of a model's solution: the number after the last "####", else the last number."""
    _, marker, tail = text.rpartition("####")
    candidates = NUMBER.findall(tail if marker else text)
    if not candidates:
        return None
    return normalize_number(candidates[0] if marker else candidates[-1])


def gsm8k_messages(question: str) -> list[dict[str, str]]:
    """Return the chat messages that ask one GSM8K question, as the training data formats it."""
    return [{"role": "user", "content": question.strip()}]


def build_prompts(tokenizer, questions: Iterable[str], use_chat_template: bool = True) -> list[str]:
    """Render GSM8K questions as prompt strings, through the chat template when the tokenizer has one."""
    prompts = []
    for question in questions:
        if use_chat_template and tokenizer.chat_template:
            prompts.append(
                tokenizer.apply_chat_template(gsm8k_messages(question), add_generation_prompt=True, tokenize=False)
            )
        else:
            prompts.append(question.strip() + "\n")
    return prompts


@dataclass
class EvaluationResult:
    """Accuracy and decoding figures of one method on a list of GSM8K questions."""

    method: str
    accuracy: float
    tokens_per_pass: float
    new_tokens: int
    forward_passes: int
    seconds: float
    tokens_per_second: float
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self, with_outputs: bool = False) -> dict[str, Any]:
        result = asdict(self)
        if not with_outputs:
            result.pop("outputs")
        return result


def _new_token_counts(new_ids: torch.Tensor, eos_ids: set[int], pad_id: Optional[int]) -> list[int]:
    """Count each row's new tokens up to and including its first EOS token."""
    counts = []
    for row in new_ids.tolist():
        count = 0
        for token in row:
            count += 1
            if token in eos_ids:
                break
        else:
            while count and pad_id is not None and row[count - 1] == pad_id and pad_id not in eos_ids:
                count -= 1
        counts.append(count)
    return counts


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


@dataclass
class GeneratedBatch:
    """New tokens of one batch of prompts, with the forward passes and the time spent on them."""

    new_ids: list[list[int]]
    """Each row's new tokens, up to and including its first EOS token."""
    row_passes: list[int]
    """Forward passes each row took part in."""
    forward_passes: int
    """Model calls for the whole batch."""
    seconds: float
    """Wall-clock time of the `generate` call alone (tokenizing and decoding excluded)."""
    masktok_stats: Optional[dict[str, Any]] = None
    """The `masktok_stats` of a masktok generation; None for stock decoding."""


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_ids(
    model, tokenizer, prompts: list[str], method: str, max_new_tokens: int, generate_kwargs: Optional[dict] = None
) -> GeneratedBatch:
    """Answer a batch of prompts and return the new token ids, forward passes and wall-clock time.

    "stock" runs the base model's own `generate` with the adapter disabled, and `generate_kwargs`
    may add stock options such as `prompt_lookup_num_tokens`. Its forward passes are counted as model
    calls. In a batch of one row the row takes part in every call. In a larger batch, which
    transformers allows for plain decoding but not for prompt lookup, a row takes part in one call
    per new token.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    settings.update(generate_kwargs or {})
    prompt_length = inputs["input_ids"].shape[1]
    eos_ids = _eos_ids(model)

    if method == "stock":
        base = model.get_base_model()
        calls = [0]
        hook = base.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            with model.disable_adapter(), torch.no_grad():
                _synchronize(model.device)
                began = time.perf_counter()
                sequences = base.generate(**inputs, **settings)
                _synchronize(model.device)
                seconds = time.perf_counter() - began
        finally:
            hook.remove()
        new_ids = sequences[:, prompt_length:]
        counts = _new_token_counts(new_ids, eos_ids, tokenizer.pad_token_id)
        row_passes = [calls[0]] if len(prompts) == 1 else list(counts)
        stats = None
        forward_passes = calls[0]
    else:
        _synchronize(model.device)
        began = time.perf_counter()
        output = model.generate(**inputs, return_dict_in_generate=True, **settings)
        _synchronize(model.device)
        seconds = time.perf_counter() - began
        new_ids = output.sequences[:, prompt_length:]
        stats = output.masktok_stats
        forward_passes = stats["forward_passes"]
        counts = [row["new_tokens"] for row in stats["per_row"]]
        row_passes = [row["forward_passes"] for row in stats["per_row"]]

    rows = [row[:count] for row, count in zip(new_ids.tolist(), counts, strict=True)]
    return GeneratedBatch(rows, row_passes, forward_passes, seconds, stats)


def generate_batch(
    model, tokenizer, prompts: list[str], method: str, max_new_tokens: int, generate_kwargs: Optional[dict] = None
) -> tuple[list[str], list[int], list[int], int]:
    """Answer a batch of prompts.

    Returns the texts, each row's new-token count, the passes each row took part in, and the
    forward passes of the batch. Stock decoding spends one pass per new token of a row.
    """
    batch = generate_ids(model, tokenizer, prompts, method, max_new_tokens, generate_kwargs)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch.new_ids]
    counts = [len(ids) for ids in batch.new_ids]
    return texts, counts, batch.row_passes, batch.forward_passes


def evaluate_gsm8k(
    model,
    tokenizer,
    rows: list[dict[str, str]],
    method: str = "masktok",
    batch_size: int = 1,
    max_new_tokens: int = 256,
    generate_kwargs: Optional[dict] = None,
    use_chat_template: bool = True,
    progress: bool = True,
) -> EvaluationResult:
    """Answer GSM8K rows (`question`, `answer`) with one method and score the final numbers."""
    tokenizer.padding_side = "left"
    outputs: list[dict[str, Any]] = []
    total_passes = 0
    total_seconds = 0.0
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc=f"gsm8k ({method})", disable=not progress):
        batch = rows[start : start + batch_size]
        prompts = build_prompts(tokenizer, [row["question"] for row in batch], use_chat_template)
        began = time.perf_counter()
        texts, counts, row_passes, passes = generate_batch(
            model, tokenizer, prompts, method, max_new_tokens, generate_kwargs
        )
        total_seconds += time.perf_counter() - began
        total_passes += passes
        for row, text, count, row_pass_count in zip(batch, texts, counts, row_passes, strict=True):
            reference = normalize_number(gsm8k_final_answer(row["answer"]))
            predicted = predicted_answer(text)
            outputs.append(
                {
                    "question": row["question"],
                    "text": text,
                    "new_tokens": count,
                    "forward_passes": row_pass_count,
                    "predicted": predicted,
                    "reference": reference,
                    "correct": predicted is not None and predicted == reference,
                }
            )

    new_tokens = sum(output["new_tokens"] for output in outputs)
    row_passes = sum(output["forward_passes"] for output in outputs)
    return EvaluationResult(
        method=method,
        accuracy=sum(output["correct"] for output in outputs) / max(len(outputs), 1),
        tokens_per_pass=new_tokens / max(row_passes, 1),
        new_tokens=new_tokens,
        forward_passes=total_passes,
        seconds=total_seconds,
        tokens_per_second=new_tokens / total_seconds if total_seconds else 0.0,
        outputs=outputs,
    )
