"""Loading training datasets and putting them in the formats TRL's SFT trainer reads.

A dataset comes from a Hub id, a local folder or local JSON, JSONL or Parquet files, through
`datasets.load_dataset`. GSM8K rows (`question`, `answer`) become prompt/completion pairs, chat
messages or plain text, with the calculator annotations `<<...>>` removed from the answers.

The three TRL formats handled here:
- language modeling: a `text` column, or a conversational `messages` column;
- prompt/completion: `prompt` and `completion` columns, both strings or both message lists.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset

from .errors import MaskTokError

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
GSM8K_STYLES = ("prompt_completion", "conversational", "messages", "text")
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
FINAL_ANSWER_MARKER = "#### "


def _builder_for(path: Path) -> str:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise MaskTokError(
            f"Unsupported data file type {path.suffix!r} for {path}. Use JSON, JSONL or Parquet files "
            f"({', '.join(FILE_BUILDERS)})."
        )
    return builder


def _split_file(folder: Path, split: str) -> Path | None:
    """Return the file `{split}.{json,jsonl,parquet}` in `folder`, or None when there is none."""
    matches = [folder / f"{split}{suffix}" for suffix in FILE_BUILDERS if (folder / f"{split}{suffix}").is_file()]
    if len(matches) > 1:
        raise MaskTokError(
            f"{folder} contains several files for split {split!r}: {[path.name for path in matches]}. "
            "Keep one, or pass the file itself."
        )
    return matches[0] if matches else None


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).suffix.lower() in FILE_BUILDERS


def load_training_dataset(
    name_or_path: str | os.PathLike | list[str | os.PathLike], split: str = "train", **load_kwargs: Any
) -> Dataset:
    """Load one split of a dataset from local files, a local folder or the Hugging Face Hub.

    - One file or a list of files (JSON, JSONL or Parquet): all their rows, whatever `split` is.
    - A folder holding `{split}.jsonl`, `{split}.json` or `{split}.parquet`: that file.
    - Any other folder or a Hub id: `datasets.load_dataset(name_or_path, split=split)`.

    Raises FileNotFoundError for a path that does not exist, and MaskTokError for an unsupported
    file type or a split that a local folder does not have.
    """
    if isinstance(name_or_path, (list, tuple)):
        paths = [Path(path).expanduser() for path in name_or_path]
        if not paths:
            raise MaskTokError("The list of data files is empty. Pass at least one JSON, JSONL or Parquet file.")
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"Data files not found: {missing}.")
        builders = {_builder_for(path) for path in paths}
        if len(builders) > 1:
            raise MaskTokError(f"The data files mix formats ({sorted(builders)}); pass files of one format.")
        files = [str(path) for path in paths]
        return load_dataset(builders.pop(), data_files=files, split="train", **load_kwargs)

    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return load_dataset(_builder_for(path), data_files=str(path), split="train", **load_kwargs)
    if path.is_dir():
        split_file = _split_file(path, split)
        if split_file is not None:
            return load_dataset(_builder_for(split_file), data_files=str(split_file), split="train", **load_kwargs)
        data_files = [child for child in path.iterdir() if child.suffix.lower() in FILE_BUILDERS]
        if data_files:
            raise MaskTokError(
                f"{path} has no file for split {split!r} (expected {split}.jsonl, {split}.json or {split}.parquet); "
                f"it contains {sorted(child.name for child in data_files)}. Pass split= or the file itself."
            )
        return load_dataset(str(path), split=split, **load_kwargs)
    if _looks_like_path(text):
        raise FileNotFoundError(f"Dataset path not found: {path}. Pass an existing file or folder, or a Hub id.")
    return load_dataset(text, split=split, **load_kwargs)


def require_columns(dataset: Dataset | IterableDataset, columns: tuple[str, ...], purpose: str) -> None:
    """Raise MaskTokError naming the missing columns when `dataset` lacks any of `columns`."""
    if isinstance(dataset, (DatasetDict, dict)):
        raise MaskTokError(
            f"{purpose} needs one split, got a DatasetDict with splits {list(dataset)}. Pass dataset['train']."
        )
    present = list(dataset.column_names or [])
    missing = [column for column in columns if column not in present]
    if missing:
        raise MaskTokError(f"{purpose} needs the columns {list(columns)}, but {missing} are missing; found {present}.")


def strip_calculator_annotations(text: str) -> str:
    """Remove GSM8K's calculator annotations: "48/2 = <<48/2=24>>24" becomes "48/2 = 24"."""
    return CALCULATOR_ANNOTATION.sub("", text)


def gsm8k_final_answer(answer: str) -> str:
    """Return the final answer of a GSM8K solution: the text after "#### ", with thousands separators removed."""
    _, marker, final = answer.rpartition(FINAL_ANSWER_MARKER)
    if not marker:
        raise MaskTokError(f"The GSM8K answer has no final answer after {FINAL_ANSWER_MARKER!r}: {answer[-80:]!r}.")
    return final.strip().replace(",", "")


def _gsm8k_row(example: dict[str, Any], style: str) -> dict[str, Any]:
    question = example["question"].strip()
    answer = strip_calculator_annotations(example["answer"]).strip()
    if style == "prompt_completion":
        # TRL joins prompt and completion with no separator, so the prompt carries the line break.
        return {"prompt": question + "\n", "completion": answer}
    if style == "conversational":
        return {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}],
        }
    if style == "messages":
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    return {"text": question + "\n" + answer}


def format_gsm8k(dataset: Dataset, style: str = "prompt_completion") -> Dataset:
    """Format GSM8K rows for training, with the calculator annotations removed from the answers.

    `style` selects the output columns:
    - "prompt_completion": `prompt` (the question and a line break) and `completion` (the answer);
    - "conversational": `prompt` and `completion` as chat messages (user, then assistant);
    - "messages": one `messages` column holding the user and assistant messages;
    - "text": one `text` column, the question and the answer on separate lines.
    The answer keeps its final line "#### <number>". Other columns are dropped.
    """
    if style not in GSM8K_STYLES:
        raise MaskTokError(f"style must be one of {GSM8K_STYLES}, got {style!r}.")
    require_columns(dataset, ("question", "answer"), "GSM8K formatting")
    return dataset.map(_gsm8k_row, fn_kwargs={"style": style}, remove_columns=list(dataset.column_names))


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) and "content" in item for item in value)


def _join_contents(messages: list[dict[str, Any]]) -> str:
    return "\n".join(str(message["content"]) for message in messages)


def _to_plain_text(example: dict[str, Any], text_field: str) -> dict[str, Any]:
    if "messages" in example:
        return {text_field: _join_contents(example["messages"])}
    prompt = _join_contents(example["prompt"])
    return {"prompt": prompt + "\n" if prompt else prompt, "completion": _join_contents(example["completion"])}


def _to_conversational(example: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": example["prompt"].strip()}],
        "completion": [{"role": "assistant", "content": example["completion"].strip()}],
    }


def dataset_format(dataset: Dataset | IterableDataset, text_field: str = "text") -> str:
    """Name the TRL format of a dataset from its first row.

    Returns "messages" (conversational language modeling), "text" (a `text_field` column),
    "prompt_completion" (strings),
    "conversational_prompt_completion" (message lists) or "tokenized" (an `input_ids` column).
    Raises MaskTokError for any other set of columns.
    """
    columns = list(dataset.column_names or [])
    if "input_ids" in columns:
        return "tokenized"
    first = next(iter(dataset))
    if "prompt" in first and "completion" in first:
        if _is_message_list(first["prompt"]) and _is_message_list(first["completion"]):
            return "conversational_prompt_completion"
        if isinstance(first["prompt"], str) and isinstance(first["completion"], str):
            return "prompt_completion"
        raise MaskTokError(
            "The prompt and completion columns must both be strings or both be lists of chat messages, got "
            f"{type(first['prompt']).__name__} and {type(first['completion']).__name__}."
        )
    if "messages" in first and _is_message_list(first["messages"]):
        return "messages"
    if text_field in first:
        return "text"
    raise MaskTokError(
        f"Unrecognized dataset format with columns {columns}. Provide {text_field!r}, 'messages', or 'prompt' and "
        "'completion' (strings or chat messages)."
    )


def apply_chat_template_choice(
    dataset: Dataset | IterableDataset, use_chat_template: bool | None, text_field: str = "text"
) -> Dataset | IterableDataset:
    """Convert a dataset so that the tokenizer's chat template is used, or not, as requested.

    - None: leave the dataset as it is (TRL applies the template to conversational rows only).
    - True: turn string prompt/completion rows into a user message and an assistant message, so
      the training text has the layout of a chat at inference. A `text` dataset has no
      roles to put in a template, so it raises MaskTokError.
    - False: render conversational rows as plain text, the message contents joined by line breaks,
      so the chat template is never applied.
    Already tokenized datasets are returned unchanged.
    """
    if use_chat_template is None:
        return dataset
    kind = dataset_format(dataset, text_field)
    if kind == "tokenized":
        return dataset
    if use_chat_template:
        if kind in ("messages", "conversational_prompt_completion"):
            return dataset
        if kind == "text":
            raise MaskTokError(
                f"use_chat_template=True needs prompt/completion or messages rows, but this dataset has only a "
                f"{text_field!r} column, which has no roles to put in a chat template. Pass use_chat_template=None "
                "or False, or give the dataset prompt and completion columns."
            )
        return dataset.map(_to_conversational)
    if kind in ("text", "prompt_completion"):
        return dataset
    remove = ["messages"] if kind == "messages" else None
    return dataset.map(_to_plain_text, fn_kwargs={"text_field": text_field}, remove_columns=remove)
