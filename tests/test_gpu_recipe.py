"""The GPU recipe and the offline run path, on the CPU with tiny models and tiny time budgets.

The offline path: the model from a local GGUF file (converted once into the cache), the data
from local JSON Lines files, and a wall-clock budget that ends training and still saves the
adapter. benchmarks/gpu_train_run.sh runs all of it as one command.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from cli_runner import run_cli
from gguf import GGUFWriter, TokenType
from transformers import TrainerControl
from transformers.convert_slow_tokenizer import bytes_to_unicode

from masktok_peft import models
from masktok_peft.errors import MaskTokError
from masktok_peft.recipes import build_configs, load_recipe
from masktok_peft.training import MaskTokTrainingConfig
from masktok_peft.training import callbacks as callbacks_module
from masktok_peft.training.callbacks import TimeBudgetCallback

REPO = Path(__file__).resolve().parent.parent
GPU_RECIPE = REPO / "recipes" / "smollm2-135m-gsm8k-gpu.yaml"
RUN_SCRIPT = REPO / "benchmarks" / "gpu_train_run.sh"

TINY_HIDDEN, TINY_LAYERS, TINY_HEADS, TINY_KV_HEADS, TINY_FFN = 32, 2, 4, 2, 64
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Overrides that shrink the GPU recipe to a few seconds on a CPU; each test adds model, data and budget.
TINY_RUN_OVERRIDES = [
    "training.use_cpu=true",
    "training.per_device_train_batch_size=2",
    "training.blocks_per_sequence=4",
    "training.max_length=96",
    "training.on_policy_max_new_tokens=12",
    "training.on_policy_batch_size=4",
    "training.warmup_steps=0",
    "training.logging_steps=1",
    "training.save_strategy='no'",
    "training.disable_tqdm=true",
    "adapter.r=4",
]


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny random Llama with a byte-level BPE tokenizer as a float32 GGUF file; return its tensors."""
    rng = np.random.default_rng(seed)
    tokens = TINY_SPECIAL_TOKENS + list(bytes_to_unicode().values()) + ["Ġt", "Ġth", "Ġthe"]
    merges = ["Ġ t", "Ġt h", "Ġth e"]
    vocab = len(tokens)
    head_dim = TINY_HIDDEN // TINY_HEADS

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(TINY_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(TINY_HIDDEN)
    writer.add_feed_forward_length(TINY_FFN)
    writer.add_head_count(TINY_HEADS)
    writer.add_head_count_kv(TINY_KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    special_count = len(TINY_SPECIAL_TOKENS)
    writer.add_token_types([TokenType.CONTROL] * special_count + [TokenType.NORMAL] * (vocab - special_count))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)

    def random_matrix(rows: int, columns: int) -> np.ndarray:
        return (rng.standard_normal((rows, columns)) * 0.1).astype(np.float32)

    tensors = {
        "token_embd.weight": random_matrix(vocab, TINY_HIDDEN),
        "output_norm.weight": np.ones(TINY_HIDDEN, np.float32),
    }
    for layer in range(TINY_LAYERS):
        prefix = f"blk.{layer}"
        tensors[f"{prefix}.attn_norm.weight"] = np.ones(TINY_HIDDEN, np.float32)
        tensors[f"{prefix}.ffn_norm.weight"] = np.ones(TINY_HIDDEN, np.float32)
        tensors[f"{prefix}.attn_q.weight"] = random_matrix(TINY_HIDDEN, TINY_HIDDEN)
        tensors[f"{prefix}.attn_k.weight"] = random_matrix(TINY_KV_HEADS * head_dim, TINY_HIDDEN)
        tensors[f"{prefix}.attn_v.weight"] = random_matrix(TINY_KV_HEADS * head_dim, TINY_HIDDEN)
        tensors[f"{prefix}.attn_output.weight"] = random_matrix(TINY_HIDDEN, TINY_HIDDEN)
        tensors[f"{prefix}.ffn_gate.weight"] = random_matrix(TINY_FFN, TINY_HIDDEN)
        tensors[f"{prefix}.ffn_up.weight"] = random_matrix(TINY_FFN, TINY_HIDDEN)
        tensors[f"{prefix}.ffn_down.weight"] = random_matrix(TINY_HIDDEN, TINY_FFN)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the package cache (converted models, on-policy text) at a fresh folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny-llama.F32.gguf"
    tensors = write_tiny_gguf(path)
    return path, tensors


@pytest.fixture
def gsm8k_folder(tmp_path):
    """A folder with a GSM8K-shaped train.jsonl of six short questions."""
    rows = [
        {
            "question": f"Tom has {n} apples and buys {n + 2} more. How many?",
            "answer": f"{n}+{n + 2}={2 * n + 2}\n#### {2 * n + 2}",
        }
        for n in range(6)
    ]
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder




def parse_summary(output: str) -> dict:
    # The Trainer prints its own log lines before the summary's JSON object.
    return json.loads(output[output.index("{\n") :])


def test_gpu_recipe_opens_with_its_command():
    assert GPU_RECIPE.read_text().splitlines()[0] == "# Run: masktok train recipes/smollm2-135m-gsm8k-gpu.yaml"


def test_gpu_recipe_passes_dry_run(capsys):
    code, out, err = run_cli(capsys, "train", str(GPU_RECIPE), "--dry-run")
    assert code == 0, err
    assert "valid" in out


def test_gpu_recipe_settings():
    adapter_config, training_config = build_configs(load_recipe(GPU_RECIPE))
    assert training_config.layout == "cached"
    assert adapter_config.gated
    assert training_config.on_policy
    assert training_config.on_policy_batch_size >= 128
    assert adapter_config.max_k in (8, 16)
    assert training_config.blocks_per_sequence >= 16
    assert training_config.per_device_train_batch_size >= 32
    assert 0 < training_config.max_time_minutes <= 8
    # bf16 is left to MaskTokTrainingConfig, which turns it off on a CPU.
    assert yaml.safe_load(GPU_RECIPE.read_text())["training"]["bf16"] is None
    assert training_config.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@pytest.mark.parametrize("value", [0, -1.0, "5", True, float("nan")])
def test_max_time_minutes_rejects_invalid(tmp_path, value):
    with pytest.raises(MaskTokError, match="max_time_minutes"):
        MaskTokTrainingConfig(output_dir=str(tmp_path), use_cpu=True, max_time_minutes=value)


def test_max_time_minutes_accepts_fraction(tmp_path):
    config = MaskTokTrainingConfig(output_dir=str(tmp_path), use_cpu=True, max_time_minutes=0.5)
    assert config.max_time_minutes == 0.5


def test_time_budget_callback_stops_once_spent(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(callbacks_module.time, "monotonic", lambda: now[0])
    callback = TimeBudgetCallback(max_seconds=60.0, started_at=90.0)
    state = SimpleNamespace(global_step=3, max_steps=50)

    control = callback.on_step_end(None, state, TrainerControl())
    assert not control.should_training_stop
    assert callback.stopped_at_step is None

    now[0] = 150.0
    state.global_step = 7
    control = callback.on_step_end(None, state, TrainerControl())
    assert control.should_training_stop
    assert callback.stopped_at_step == 7


def test_time_budget_callback_starts_clock_at_train_begin(monkeypatch):
    monkeypatch.setattr(callbacks_module.time, "monotonic", lambda: 500.0)
    callback = TimeBudgetCallback(max_seconds=30.0)
    callback.on_train_begin(None, SimpleNamespace(), TrainerControl())
    assert callback.started_at == 500.0
    assert callback.elapsed_seconds() == 0.0


def test_time_budget_callback_rejects_zero():
    with pytest.raises(ValueError, match="max_seconds"):
        TimeBudgetCallback(max_seconds=0)


def test_gguf_model_converted_once(tiny_gguf, isolated_cache, monkeypatch):
    path, tensors = tiny_gguf
    folder = Path(models.resolve_model(str(path)))
    assert folder.parent == isolated_cache / "converted"
    assert folder.name.startswith("tiny-llama.F32-")
    assert (folder / "config.json").is_file()

    model, tokenizer = models.load_model_and_tokenizer(str(path))
    embedding = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(embedding, tensors["token_embd.weight"])
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None

    # A second use loads the cached folder and converts nothing.
    def fail_convert(*args, **kwargs):
        raise AssertionError("convert_gguf ran although the converted folder exists")

    monkeypatch.setattr(models, "convert_gguf", fail_convert)
    assert models.resolve_model(str(path)) == str(folder)


def test_gguf_incomplete_folder_kept(tiny_gguf, isolated_cache):
    path, _ = tiny_gguf
    target = Path(models.resolve_model(str(path)))
    (target / "config.json").unlink()
    with pytest.raises(RuntimeError, match="has no config.json"):
        models.resolve_model(str(path))
    assert (target / "model.safetensors").is_file()


def test_gguf_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        models.resolve_model(str(tmp_path / "absent.gguf"))


def test_gpu_recipe_on_gguf_within_budget(capsys, caplog, tiny_gguf, gsm8k_folder, tmp_path):
    """The GPU recipe trains from a GGUF file and local data, stops at its budget and saves the adapter."""
    path, _ = tiny_gguf
    output_dir = tmp_path / "run"
    max_steps = 100_000
    overrides = TINY_RUN_OVERRIDES + [
        f"model={path}",
        f"data.path={gsm8k_folder}",
        f"training.output_dir={output_dir}",
        f"training.max_steps={max_steps}",
        "training.max_time_minutes=0.1",
    ]
    argv = ["train", str(GPU_RECIPE)]
    for override in overrides:
        argv += ["--set", override]

    with caplog.at_level(logging.WARNING, logger="masktok_peft.training.callbacks"):
        code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    summary = parse_summary(out)
    assert 1 <= summary["steps"] < max_steps
    assert summary["final_loss"] is not None
    assert (output_dir / "adapter_config.json").is_file()
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert any("Stopping training at step" in record.getMessage() for record in caplog.records)


def test_spent_budget_runs_one_step(capsys, tiny_model_dirs, gsm8k_folder, tmp_path):
    """A budget spent before the first step ends the run after exactly one step, with the adapter saved."""
    output_dir = tmp_path / "run"
    overrides = TINY_RUN_OVERRIDES + [
        f"model={tiny_model_dirs['qwen3']}",
        f"data.path={gsm8k_folder}",
        f"training.output_dir={output_dir}",
        "training.max_steps=50",
        "training.max_time_minutes=1.0e-6",
        "training.on_policy=false",
        "adapter.target_modules=[q_proj, v_proj]",
        "adapter.max_k=4",
        "training.max_k=4",
    ]
    argv = ["train", str(GPU_RECIPE)]
    for override in overrides:
        argv += ["--set", override]

    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    summary = parse_summary(out)
    assert summary["steps"] == 1
    assert (output_dir / "adapter_config.json").is_file()


def test_run_script_trains_from_gguf(tiny_gguf, gsm8k_folder, tmp_path, isolated_cache):
    """benchmarks/gpu_train_run.sh: one command from a GGUF file and a data folder to a saved adapter."""
    path, _ = tiny_gguf
    output_dir = tmp_path / "script-run"
    environment = dict(
        os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(output_dir), MAX_TIME_MINUTES="0.1", OMP_NUM_THREADS="1"
    )
    environment.pop("WHEELS", None)
    command = ["bash", str(RUN_SCRIPT), str(path), str(gsm8k_folder), "--set", "training.max_steps=100000"]
    for override in TINY_RUN_OVERRIDES:
        command += ["--set", override]

    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (output_dir / "adapter_config.json").is_file()
    summary = json.loads((output_dir / "summary.json").read_text())
    assert 1 <= summary["steps"] < 100_000
    assert '"steps"' in completed.stdout
