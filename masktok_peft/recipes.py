"""Training recipes: YAML files with `model`, `data`, `adapter` and `training` sections.

`adapter` holds `MaskTokConfig` fields and `training` holds `MaskTokTrainingConfig` fields, so a
recipe is checked by building both configs. `data` names the dataset (`path`: a Hub id, local
folder or files, relative to the current directory), its `split`, an optional `limit` of rows and
`format: gsm8k` to turn GSM8K's question/answer rows into chat messages, or `prompt_column` and
`completion_column` to read other question/answer datasets (MetaMathQA's `query` and `response`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import MaskTokError

logger = logging.getLogger(__name__)

SECTIONS = ("model", "data", "adapter", "training")
DATA_KEYS = ("path", "name", "split", "limit", "format", "style", "prompt_column", "completion_column")
DATA_FORMATS = ("gsm8k", "trl")


@dataclass
class Recipe:
    """A parsed training recipe; `source` is the file it came from."""

    model: Optional[str]
    data: dict[str, Any]
    adapter: dict[str, Any]
    training: dict[str, Any]
    source: str


def _set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    keys = dotted_key.split(".")
    if keys[0] not in SECTIONS:
        raise MaskTokError(
            f"Invalid override key {dotted_key!r}: it must start with one of {SECTIONS}, as in training.max_steps=10."
        )
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise MaskTokError(f"Invalid override key {dotted_key!r}: {key!r} is not a section.")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Return a copy of `tree` with `key=value` overrides applied; values are parsed as YAML."""
    tree = copy.deepcopy(tree)
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key:
            raise MaskTokError(f"Invalid override {override!r}: use key=value, as in training.max_steps=10.")
        _set_dotted(tree, key.strip(), yaml.safe_load(text))
    return tree


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    """Read a recipe file, apply `key=value` overrides and check its sections (not yet its values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {path} not found.")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise MaskTokError(f"Recipe {path} must be a mapping with the sections {SECTIONS}.")
    tree = apply_overrides(tree, overrides or [])
    unknown = sorted(set(tree) - set(SECTIONS))
    if unknown:
        raise MaskTokError(f"Recipe {path} has unknown sections {unknown}; the sections are {SECTIONS}.")
    data = tree.get("data") or {}
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise MaskTokError(f"Recipe {path}: unknown data keys {unknown}; the keys are {DATA_KEYS}.")
    if "path" not in data:
        raise MaskTokError(f"Recipe {path}: data.path is missing. Set a Hub dataset id or local files.")
    if data.get("format", "trl") not in DATA_FORMATS:
        raise MaskTokError(f"Recipe {path}: data.format must be one of {DATA_FORMATS}, got {data['format']!r}.")
    training = dict(tree.get("training") or {})
    if "output_dir" not in training:
        raise MaskTokError(f"Recipe {path}: training.output_dir is missing. Set the folder for the adapter.")
    return Recipe(
        model=tree.get("model"),
        data=data,
        adapter=dict(tree.get("adapter") or {}),
        training=training,
        source=str(path),
    )


def build_configs(recipe: Recipe):
    """Build and validate (MaskTokConfig, MaskTokTrainingConfig) from a recipe, without loading anything."""
    from .config import MaskTokConfig
    from .training import MaskTokTrainingConfig

    try:
        adapter_config = MaskTokConfig(**recipe.adapter)
        training_config = MaskTokTrainingConfig(**recipe.training)
    except TypeError as error:
        raise MaskTokError(f"Recipe {recipe.source}: {error}. Check the key names against the config fields.") from None
    # The checks that need both configs, which the trainer repeats, so that --dry-run catches them too.
    training_config.resolve_block_settings(adapter_config)
    return adapter_config, training_config


def load_recipe_dataset(recipe: Recipe):
    """Load the recipe's training data and put it in a format the trainer reads."""
    from .data import apply_chat_template_choice, format_gsm8k, load_training_dataset, require_columns

    data = recipe.data
    load_kwargs = {"name": data["name"]} if data.get("name") else {}
    dataset = load_training_dataset(data["path"], split=data.get("split", "train"), **load_kwargs)
    if data.get("limit"):
        dataset = dataset.select(range(min(int(data["limit"]), len(dataset))))
    if data.get("format") == "gsm8k":
        return format_gsm8k(dataset, style=data.get("style", "conversational"))
    if data.get("prompt_column") or data.get("completion_column"):
        columns = {
            data.get("prompt_column", "prompt"): "prompt",
            data.get("completion_column", "completion"): "completion",
        }
        require_columns(dataset, tuple(columns), f"Recipe {recipe.source}")
        dataset = dataset.select_columns(list(columns)).rename_columns(
            {old: new for old, new in columns.items() if old != new}
        )
        if data.get("style", "conversational") == "conversational":
            dataset = apply_chat_template_choice(dataset, use_chat_template=True)
    return dataset


def check_output_dir(output_dir: str, resume: bool) -> None:
    """Reject an output folder that contains a finished adapter, or checkpoints that would be ignored."""
    folder = Path(output_dir)
    if (folder / "adapter_config.json").is_file():
        raise MaskTokError(
            f"{folder} already contains a trained adapter. Choose another training.output_dir, or move that adapter."
        )
    checkpoints = sorted(folder.glob("checkpoint-*")) if folder.is_dir() else []
    if checkpoints and not resume:
        raise MaskTokError(
            f"{folder} contains checkpoints ({checkpoints[-1].name} is the latest). Pass --resume to continue that "
            "run, or choose another training.output_dir."
        )


def summarize(trainer, seconds: float) -> dict[str, Any]:
    """Collect the final figures of a training run from the trainer's log history."""
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = history[-1] if history else {}
    agreement = {key.removeprefix("agreement/"): value for key, value in last.items() if key.startswith("agreement/")}
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "final_loss": last.get("loss"),
        "teacher_agreement": agreement,
        "mean_confidence": last.get("mean_confidence"),
        "estimated_tokens_per_pass": last.get("tokens_per_pass"),
        "supervised_positions": last.get("num_supervised_positions"),
    }


def run_recipe(recipe: Recipe, resume: bool = False) -> dict[str, Any]:
    """Train an adapter as the recipe says, save it to training.output_dir and return a summary."""
    import peft

    from .models import load_model_and_tokenizer
    from .training import MaskTokTrainer

    adapter_config, training_config = build_configs(recipe)
    check_output_dir(training_config.output_dir, resume)
    dataset = load_recipe_dataset(recipe)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    peft_model = peft.get_peft_model(model, adapter_config)
    trainer = MaskTokTrainer(model=peft_model, args=training_config, train_dataset=dataset, processing_class=tokenizer)
    began = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - began
    trainer.save_model(training_config.output_dir)
    summary = summarize(trainer, seconds)
    summary["output_dir"] = training_config.output_dir
    return summary
