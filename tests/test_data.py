"""Tests for dataset loading and formatting (masktok_peft.data)."""

import json
from pathlib import Path

import pytest
from datasets import Dataset

from masktok_peft.data import (
    apply_chat_template_choice,
    dataset_format,
    format_gsm8k,
    gsm8k_final_answer,
    load_training_dataset,
    strip_calculator_annotations,
)
from masktok_peft.errors import MaskTokError

GSM8K_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K_DIR / "train.jsonl").is_file(), reason=f"GSM8K not found at {GSM8K_DIR}")

ANSWER = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
ROWS = [
    {"question": "How many clips?", "answer": ANSWER},
    {"question": "How much did she earn?", "answer": "12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 1,000"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_strip_calculator_annotations():
    assert strip_calculator_annotations(ANSWER) == (
        "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"
    )
    assert strip_calculator_annotations("no annotations <b>") == "no annotations <b>"


def test_gsm8k_final_answer():
    assert gsm8k_final_answer(ANSWER) == "72"
    assert gsm8k_final_answer(ROWS[1]["answer"]) == "1000"
    with pytest.raises(MaskTokError, match="no final answer"):
        gsm8k_final_answer("just text")


def test_format_gsm8k_prompt_completion():
    formatted = format_gsm8k(Dataset.from_list(ROWS), "prompt_completion")
    assert formatted.column_names == ["prompt", "completion"]
    assert formatted[0]["prompt"] == "How many clips?\n"
    assert "<<" not in formatted[0]["completion"]
    assert formatted[0]["completion"].endswith("#### 72")
    assert dataset_format(formatted) == "prompt_completion"


def test_format_gsm8k_chat_styles():
    conversational = format_gsm8k(Dataset.from_list(ROWS), "conversational")
    assert conversational[0]["prompt"] == [{"role": "user", "content": "How many clips?"}]
    assert conversational[0]["completion"][0]["role"] == "assistant"
    assert "<<" not in conversational[0]["completion"][0]["content"]
    assert dataset_format(conversational) == "conversational_prompt_completion"

    messages = format_gsm8k(Dataset.from_list(ROWS), "messages")
    assert [message["role"] for message in messages[0]["messages"]] == ["user", "assistant"]
    assert dataset_format(messages) == "messages"

    text = format_gsm8k(Dataset.from_list(ROWS), "text")
    assert text[0]["text"].startswith("How many clips?\nNatalia sold 48/2 = 24 clips")
    assert dataset_format(text) == "text"


def test_format_gsm8k_rejects_bad_input():
    with pytest.raises(MaskTokError, match=r"\['answer'\] are missing"):
        format_gsm8k(Dataset.from_list([{"question": "q"}]))
    with pytest.raises(MaskTokError, match="style must be one of"):
        format_gsm8k(Dataset.from_list(ROWS), "chat")


def test_load_jsonl_file_and_folder(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert len(load_training_dataset(tmp_path / "train.jsonl")) == 2
    assert len(load_training_dataset(tmp_path)) == 2
    assert len(load_training_dataset(str(tmp_path), split="test")) == 1
    assert len(load_training_dataset([tmp_path / "train.jsonl", tmp_path / "test.jsonl"])) == 3


def test_load_parquet_and_json(tmp_path):
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "rows.parquet"))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    assert load_training_dataset(tmp_path / "rows.parquet")["question"] == [row["question"] for row in ROWS]
    assert load_training_dataset(tmp_path / "rows.json")["question"] == [row["question"] for row in ROWS]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_training_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_training_dataset([tmp_path / "missing.jsonl"])
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    with pytest.raises(MaskTokError, match="Unsupported data file type '.csv'"):
        load_training_dataset(tmp_path / "rows.csv")
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(MaskTokError, match="no file for split 'validation'"):
        load_training_dataset(tmp_path, split="validation")


@needs_gsm8k
def test_load_shared_gsm8k():
    test_split = load_training_dataset(GSM8K_DIR, split="test")
    assert len(test_split) == 1319
    formatted = format_gsm8k(test_split.select(range(50)))
    assert not any("<<" in completion for completion in formatted["completion"])
    assert all("#### " in completion for completion in formatted["completion"])


def test_chat_template_choice_true_wraps_strings():
    plain = format_gsm8k(Dataset.from_list(ROWS), "prompt_completion")
    wrapped = apply_chat_template_choice(plain, True)
    assert dataset_format(wrapped) == "conversational_prompt_completion"
    assert wrapped[0]["prompt"] == [{"role": "user", "content": "How many clips?"}]
    text = format_gsm8k(Dataset.from_list(ROWS), "text")
    with pytest.raises(MaskTokError, match="no roles"):
        apply_chat_template_choice(text, True)


def test_chat_template_choice_false_renders_plain():
    messages = format_gsm8k(Dataset.from_list(ROWS), "messages")
    plain = apply_chat_template_choice(messages, False)
    assert plain.column_names == ["text"]
    assert plain[0]["text"].startswith("How many clips?\nNatalia")

    conversational = format_gsm8k(Dataset.from_list(ROWS), "conversational")
    plain_pairs = apply_chat_template_choice(conversational, False)
    assert dataset_format(plain_pairs) == "prompt_completion"
    assert plain_pairs[0]["prompt"] == "How many clips?\n"


def test_chat_template_choice_none_keeps_dataset():
    messages = format_gsm8k(Dataset.from_list(ROWS), "messages")
    assert apply_chat_template_choice(messages, None) is messages
