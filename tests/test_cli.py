"""The `masktok` command on tiny models: every subcommand, a tiny recipe, and bad arguments."""

import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from cli_runner import run_cli
from transformers import AutoModelForCausalLM

from masktok_peft import MaskTokConfig
from masktok_peft.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DEFAULT_RECIPE = REPO / "recipes" / "smollm2-135m-gsm8k.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_adapter(tiny_model_dirs, tmp_path):
    """A gated adapter on the tiny Llama, saved to a folder."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    peft_model = peft.get_peft_model(model, MaskTokConfig(r=4, init_lora_weights=False, max_k=4))
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def fake_gsm8k(tmp_path):
    """Three GSM8K-shaped rows written with the tiny tokenizer's words."""
    rows = [{"question": f"w{index} w{index + 1} w{index + 2}", "answer": f"w7 w8\n#### {index}"} for index in range(3)]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path




@pytest.mark.parametrize("command", [[]] + [[name] for name in SUBCOMMANDS] + [["eval", "gsm8k"]])
def test_help_for_every_subcommand(capsys, command):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    assert "usage: masktok" in out


def test_generate_prints_json(capsys, tiny_adapter, tiny_model_dirs):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--prompt",
        "w1 w2 w3",
        "--adapter",
        str(tiny_adapter),
        "--model",
        str(tiny_model_dirs["llama"]),
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert isinstance(result["text"], str)
    assert result["masktok_stats"]["new_tokens"] <= 6
    assert result["masktok_stats"]["policy"] == "confadapt"


def test_generate_prints_text_and_figures(capsys, tiny_adapter, tiny_model_dirs):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--prompt",
        "w1 w2",
        "--adapter",
        str(tiny_adapter),
        "--model",
        str(tiny_model_dirs["llama"]),
        "--max-new-tokens",
        "4",
        "--policy",
        "static",
        "--max-k",
        "2",
    )
    assert code == 0
    assert "tokens per pass" in out


def test_eval_gsm8k_reports_both_methods(capsys, tiny_adapter, tiny_model_dirs, fake_gsm8k):
    code, out, _ = run_cli(
        capsys,
        "eval",
        "gsm8k",
        "--data",
        str(fake_gsm8k),
        "--limit",
        "2",
        "--adapter",
        str(tiny_adapter),
        "--model",
        str(tiny_model_dirs["llama"]),
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["questions"] == 2
    assert set(result) >= {"stock", "masktok", "speedup"}
    assert result["stock"]["tokens_per_pass"] == 1.0
    for method in ("stock", "masktok"):
        assert 0.0 <= result[method]["accuracy"] <= 1.0
        assert result[method]["new_tokens"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "gsm8k", "--data", "/no/such/file.jsonl"], "not found"),
        (["generate", "--prompt", "x", "--threshold", "1.5"], "invalid threshold 1.5"),
        (["generate", "--prompt", "x", "--threshold", "0"], "invalid threshold 0.0"),
        (["generate", "--prompt", "x", "--policy", "greedy"], "invalid choice: 'greedy'"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "it must be at least 1"),
        (["train", "/no/such/recipe.yaml"], "/no/such/recipe.yaml not found"),
        (["generate", "--prompt", "x", "--model", "/some/model"], "--model needs --adapter"),
    ],
)
def test_bad_arguments_exit_with_message(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err


def test_generate_rejects_missing_adapter_folder(capsys, tiny_model_dirs):
    code, _, err = run_cli(
        capsys, "generate", "--prompt", "x", "--adapter", "/no/such/adapter", "--model", str(tiny_model_dirs["llama"])
    )
    assert code == 2
    assert "/no/such/adapter" in err


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipes_pass_dry_run(capsys, recipe):
    code, out, err = run_cli(capsys, "train", str(recipe), "--dry-run")
    assert code == 0, err
    assert "valid" in out


def test_every_recipe_opens_with_its_command():
    for recipe in RECIPES:
        first_line = recipe.read_text().splitlines()[0]
        assert first_line == f"# Run: masktok train recipes/{recipe.name}", recipe


def test_recipe_override_errors(capsys):
    code, _, err = run_cli(capsys, "train", str(RECIPES[0]), "--dry-run", "--set", "optimizer.lr=1")
    assert code == 2
    assert "optimizer.lr" in err
    code, _, err = run_cli(capsys, "train", str(RECIPES[0]), "--dry-run", "--set", "adapter.threshold=2")
    assert code == 2
    assert "threshold" in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["adapter.gated=false"], "layout='cached' needs an adapter with gated=True"),
        (["adapter.max_k=4"], "must be at most the adapter config's max_k (4)"),
        (["adapter.gated=maybe"], "gated must be True or False"),
    ],
)
def test_dry_run_checks_both_configs(capsys, overrides, message):
    argv = ["train", str(DEFAULT_RECIPE), "--dry-run"]
    for override in overrides:
        argv += ["--set", override]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "valid" not in out


def test_dry_run_ungated_packed_is_valid(capsys):
    argv = ["train", str(DEFAULT_RECIPE), "--dry-run", "--set", "adapter.gated=false"]
    argv += ["--set", "training.layout=packed"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "valid" in out


def test_tiny_recipe_trains_and_saves(capsys, tiny_model_dirs, tmp_path):
    rows = [{"text": " ".join(f"w{(row * 5 + column) % 90}" for column in range(24))} for row in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = {
        "model": str(tiny_model_dirs["qwen3"]),
        "data": {"path": str(data)},
        "adapter": {"r": 4, "max_k": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "layout": "cached",
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "report_to": "none",
            "use_cpu": True,
            "save_strategy": "no",
        },
    }
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))

    code, out, err = run_cli(capsys, "train", str(recipe_path), "--set", "training.learning_rate=0.01")
    assert code == 0, err
    summary = json.loads(out[out.index("{\n") :])  # the Trainer prints its own log lines first
    assert summary["steps"] == 2
    assert "offset_1" in summary["teacher_agreement"]
    assert summary["estimated_tokens_per_pass"] >= 1.0
    assert (tmp_path / "run" / "adapter_config.json").is_file()

    # A second run into the same folder is rejected rather than overwriting the adapter.
    code, _, err = run_cli(capsys, "train", str(recipe_path))
    assert code == 2
    assert "already contains a trained adapter" in err
