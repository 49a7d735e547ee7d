"""On-policy training text: the base model's own continuations of a dataset's prompts.

At decoding time the mask slots follow the model's own text, not a dataset's reference answers,
and the teacher's greedy continuation of that text is the most consistent target. So this module
replaces each completion by what the base model (adapter disabled) generates after the prompt.

Generation runs once, in batches, and its result is cached as a JSON Lines file named by a hash
of the model, the tokenizer, the prompts and the generation settings. A later run with the same
inputs reads the file instead of generating. An existing file is never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..data import dataset_format
from ..errors import MaskTokError
from ..models import cache_dir as package_cache_dir

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_SUBFOLDER = "on_policy"


@dataclass(frozen=True)
class OnPolicySettings:
    """Generation settings of on-policy text; all of them are part of the cache key."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0


def _prompts_of(dataset: Dataset) -> tuple[str, list[Any]]:
    """Return the dataset kind and its prompts (strings or message lists), one per row."""
    kind = dataset_format(dataset)
    if kind in ("prompt_completion", "conversational_prompt_completion"):
        return kind, list(dataset["prompt"])
    if kind == "messages":
        prompts = []
        for messages in dataset["messages"]:
            end = len(messages)
            while end > 0 and messages[end - 1].get("role") == "assistant":
                end -= 1
            if end == 0:
                raise MaskTokError("A messages row has no message before its assistant reply, so it has no prompt.")
            prompts.append(list(messages[:end]))
        return kind, prompts
    raise MaskTokError(
        f"On-policy text needs prompts, but the dataset format is {kind!r}. Pass prompt/completion or messages "
        "rows, not plain text or tokenized rows."
    )


def _tensor_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // 4096)
    return hashlib.sha256(flat[::stride].float().cpu().numpy().tobytes()).hexdigest()


def model_fingerprint(model) -> dict[str, Any]:
    """Describe the base model's identity: its name, its config and digests of a few weight tensors.

    Adapter weights are left out, since generation runs with the adapter disabled. The digests
    sample every n-th value of the first three and last three base tensors, so two models that
    differ only elsewhere would get the same fingerprint.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tensors = [
        parameter for name, parameter in base.named_parameters() if "lora_" not in name and "masktok_" not in name
    ]
    sampled = tensors[:3] + tensors[-3:] if len(tensors) > 6 else tensors
    config = base.config.to_dict()
    config.pop("transformers_version", None)
    return {
        "name_or_path": getattr(base.config, "_name_or_path", None),
        "config": config,
        "weights": [_tensor_digest(tensor) for tensor in sampled],
    }


def _tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "vocab_size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos_token": tokenizer.eos_token,
    }


def on_policy_cache_key(model, tokenizer, prompts: list[Any], settings: OnPolicySettings) -> str:
    """Return the hex SHA-256 that names the cached on-policy text for these inputs."""
    description = {
        "format_version": CACHE_FORMAT_VERSION,
        "model": model_fingerprint(model),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "prompts": hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest(),
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def _tokenize_prompt(tokenizer, prompt: Any) -> list[int]:
    # The same tokenization TRL's SFT trainer applies to a prompt, so the generated text follows it.
    if isinstance(prompt, list):
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return list(tokenizer(text=prompt)["input_ids"])


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        ids = set()
    elif isinstance(eos, (list, tuple)):
        ids = set(eos)
    else:
        ids = {eos}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_continuations(
    model, tokenizer, prompts: list[Any], settings: OnPolicySettings, show_progress: bool = True
) -> tuple[list[str], int]:
    """Generate the base model's continuation of each prompt, with any adapter disabled.

    Returns the decoded continuations (special tokens removed) and how many of them reached
    `max_new_tokens` before an end-of-sequence token.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(base.parameters()).device
    eos_ids = _eos_ids(base, tokenizer)
    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        if settings.do_sample
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )

    texts: list[str] = []
    unfinished = 0
    was_training = base.training
    base.eval()
    starts = range(0, len(prompts), settings.batch_size)
    # A forked RNG keeps sampling reproducible from `seed` and leaves the caller's RNG state alone.
    with adapter_off, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        for start in tqdm(starts, desc="Generating on-policy text", unit="batch", disable=not show_progress):
            rows = [_tokenize_prompt(tokenizer, prompt) for prompt in prompts[start : start + settings.batch_size]]
            input_ids, attention_mask = _left_pad(rows, pad_id, device)
            output = base.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                **sampling,
            )
            for generated in output[:, input_ids.shape[1] :].tolist():
                ends = [index for index, token in enumerate(generated) if token in eos_ids]
                if ends:
                    generated = generated[: ends[0]]
                else:
                    unfinished += 1
                texts.append(tokenizer.decode(generated, skip_special_tokens=True))
    base.train(was_training)
    return texts, unfinished


def _read_cache(data_file: Path, meta_file: Path, key: str) -> list[dict[str, Any]] | None:
    """Return the cached rows when both files exist and belong to `key`; raise on a file of something else."""
    if not data_file.exists() and not meta_file.exists():
        return None
    if not (data_file.is_file() and meta_file.is_file()):
        raise MaskTokError(
            f"Found only one of {data_file} and {meta_file}. They are not overwritten: remove the leftover file "
            "or choose another on_policy_cache_dir."
        )
    metadata = json.loads(meta_file.read_text())
    if metadata.get("key") != key:
        raise MaskTokError(
            f"{meta_file} does not describe the expected on-policy text (key {key}). It is not overwritten: "
            "remove it or choose another on_policy_cache_dir."
        )
    with data_file.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_new_file(path: Path, content: str) -> None:
    """Write `content` to `path` through a temporary file; fail if `path` appeared meanwhile."""
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(content)
        # os.link fails when `path` exists, unlike os.replace, so a file written by someone else survives.
        os.link(temporary, path)
    finally:
        os.unlink(temporary)


def build_on_policy_dataset(
    model,
    tokenizer,
    dataset: Dataset,
    settings: OnPolicySettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> Dataset:
    """Return a prompt/completion dataset whose completions are the base model's own continuations.

    `dataset` contains prompt/completion rows (strings or chat messages) or `messages` rows, whose
    trailing assistant messages are dropped to form the prompt. Conversational prompts are
    rendered with the tokenizer's chat template and a generation prompt, and the completion is
    returned as one assistant message; string prompts get string completions.

    The result is cached under `cache_dir` (default: the package cache folder, subfolder
    "on_policy") and reused when the model, tokenizer, prompts and settings are the same.
    """
    if not isinstance(dataset, Dataset):
        raise MaskTokError(
            f"On-policy text needs a map-style datasets.Dataset, got {type(dataset).__name__}. Load the prompts "
            "without streaming."
        )
    settings = settings or OnPolicySettings()
    kind, prompts = _prompts_of(dataset)
    key = on_policy_cache_key(model, tokenizer, prompts, settings)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else package_cache_dir() / CACHE_SUBFOLDER
    data_file = folder / f"on-policy-{key[:24]}.jsonl"
    meta_file = folder / f"on-policy-{key[:24]}.json"

    rows = _read_cache(data_file, meta_file, key)
    if rows is not None:
        logger.info("Reusing on-policy text for %d prompts from %s.", len(rows), data_file)
        return Dataset.from_list(rows)

    texts, unfinished = generate_continuations(model, tokenizer, prompts, settings, show_progress)
    if unfinished:
        logger.warning(
            "%d of %d on-policy continuations reached on_policy_max_new_tokens=%d before an end-of-sequence token; "
            "they are kept as cut.",
            unfinished,
            len(texts),
            settings.max_new_tokens,
        )
    conversational = kind != "prompt_completion"
    rows = [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": text}] if conversational else text}
        for prompt, text in zip(prompts, texts, strict=True)
    ]

    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "key": key,
        "rows": len(rows),
        "unfinished": unfinished,
        "settings": asdict(settings),
        "model": model_fingerprint(model)["name_or_path"],
    }
    _write_new_file(data_file, "".join(json.dumps(row) + "\n" for row in rows))
    _write_new_file(meta_file, json.dumps(metadata, indent=2) + "\n")
    logger.info("Wrote on-policy text for %d prompts to %s.", len(rows), data_file)
    return Dataset.from_list(rows)
