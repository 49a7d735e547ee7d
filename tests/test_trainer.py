"""Tests for MaskTokTrainer and MaskTokTrainingConfig on tiny random models."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from datasets import Dataset
from tiny_models import IM_START_ID
from transformers import AutoModelForCausalLM, TrainerCallback

from masktok_peft import MaskTokConfig
from masktok_peft.errors import MaskTokError
from masktok_peft.training import MaskTokTrainer, MaskTokTrainingConfig, objective
from masktok_peft.training.config import bf16_supported
from masktok_peft.training.on_policy import CACHE_SUBFOLDER

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and two threads on a busy two-core machine are far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_rows(count=8, length=16):
    return [
        {"text": " ".join(f"w{(row * 7 + column * column) % 80}" for column in range(length))} for row in range(count)
    ]


def prompt_rows(count=4):
    return [
        {
            "prompt": " ".join(f"w{row + column}" for column in range(5)) + " ",
            "completion": f"w{40 + row} w{50 + row} w60",
        }
        for row in range(count)
    ]


def conversational_rows(count=4):
    return [
        {
            "prompt": [{"role": "user", "content": f"w{row} w{row + 1} w{row + 2}"}],
            "completion": [{"role": "assistant", "content": f"w{40 + row} w{50 + row}"}],
        }
        for row in range(count)
    ]


def messages_rows(count=4):
    return [{"messages": row["prompt"] + row["completion"]} for row in conversational_rows(count)]


def make_config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_k=4,
        region_size=8,
        seed=0,
    )
    settings.update(overrides)
    return MaskTokTrainingConfig(**settings)


def trainable_state(model):
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.fixture
def recorded_batches(monkeypatch):
    """Record the arguments of every distillation_step call, then run the real one."""
    calls = []
    real = objective.distillation_step

    def record(model, input_ids, attention_mask, supervised_mask, k, **kwargs):
        calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "supervised": supervised_mask, "k": k})
        return real(model, input_ids, attention_mask, supervised_mask, k, **kwargs)

    monkeypatch.setattr(objective, "distillation_step", record)
    return calls


def test_short_run_lowers_loss_and_raises_agreement(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    # A random tiny model's logits are nearly uniform; sharpening them gives the student a teacher worth copying.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    # Short cycles give few distinct contexts, so 60 steps are enough to learn the teacher's continuations.
    rows = [{"text": " ".join(f"w{10 * row + column % 3}" for column in range(24))} for row in range(4)]
    dataset = Dataset.from_list(rows)
    args = make_config(tmp_path, max_steps=60, learning_rate=3e-2, max_k=3, logging_steps=20)
    trainer = MaskTokTrainer(
        model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=8, target_modules="all-linear"),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    assert after["eval_loss"] < 0.7 * before["eval_loss"]
    assert after["eval_agreement/offset_1"] >= before["eval_agreement/offset_1"] + 0.2
    # With a gated adapter the real position is the base model itself, so offset 0 always agrees.
    assert before["eval_agreement/offset_0"] == 1.0


def test_logs_distillation_metrics(load_tiny, tmp_path):
    model, tokenizer = load_tiny("qwen3")
    trainer = MaskTokTrainer(
        model,
        args=make_config(tmp_path, max_steps=3),
        train_dataset=Dataset.from_list(text_rows()),
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4),
    )
    trainer.train()
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_logs) == 3
    for entry in step_logs:
        assert 2 <= entry["k"] <= 4
        assert "agreement/offset_0" in entry
        assert "agreement/offset_1" in entry
        assert 0.0 < entry["mean_confidence"] <= 1.0
        assert 1.0 <= entry["tokens_per_pass"] <= entry["k"]
        assert entry["num_supervised_positions"] > 0
    offsets = {key for entry in step_logs for key in entry if key.startswith("agreement/offset_")}
    assert offsets <= {f"agreement/offset_{offset}" for offset in range(4)}
    assert step_logs[-1]["num_supervised_positions"] > step_logs[0]["num_supervised_positions"]


def test_evaluate_reports_every_offset(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    dataset = Dataset.from_list(text_rows())
    trainer = MaskTokTrainer(
        model,
        args=make_config(tmp_path),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4),
    )
    first = trainer.evaluate()
    second = trainer.evaluate()
    for offset in range(4):
        assert f"eval_agreement/offset_{offset}" in first
    # Evaluation replays the same block draws, so an unchanged model gives the same figures.
    assert first["eval_loss"] == second["eval_loss"]


@pytest.mark.parametrize(
    "rows, overrides, prompt_supervised, chat_markers",
    [
        (text_rows(4), {}, True, False),
        (prompt_rows(), {}, False, False),
        (prompt_rows(), {"completion_only_loss": False}, True, False),
        (prompt_rows(), {"use_chat_template": True}, False, True),
        (conversational_rows(), {}, False, True),
        (conversational_rows(), {"use_chat_template": False}, False, False),
        (messages_rows(), {}, True, True),
        (messages_rows(), {"use_chat_template": False}, True, False),
    ],
    ids=[
        "text",
        "prompt-completion",
        "prompt-completion-full-loss",
        "prompt-completion-chat",
        "conversational",
        "conversational-plain",
        "messages",
        "messages-plain",
    ],
)
def test_dataset_formats(load_tiny, tmp_path, recorded_batches, rows, overrides, prompt_supervised, chat_markers):
    model, tokenizer = load_tiny("llama")
    args = make_config(tmp_path, max_steps=1, **overrides)
    trainer = MaskTokTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4),
    )
    trainer.train()

    batch = recorded_batches[0]
    input_ids, attention, supervised = batch["input_ids"], batch["attention_mask"].bool(), batch["supervised"]
    assert not (supervised & ~attention).any(), "padding must never be supervised"
    assert bool((input_ids == IM_START_ID).any()) == chat_markers
    if prompt_supervised:
        assert torch.equal(supervised, attention)
    else:
        assert not supervised[:, 0].any(), "the first prompt token must not be supervised"
        assert supervised.any(dim=1).all(), "every row must supervise its completion"
        # The supervised tokens form one run at the end of each row's text.
        lengths = attention.sum(dim=1)
        for row in range(input_ids.shape[0]):
            marked = supervised[row].nonzero().squeeze(1)
            assert marked[-1] == lengths[row] - 1
            assert torch.equal(marked, torch.arange(int(marked[0]), int(lengths[row])))


def test_completion_only_matches_prompt_length(load_tiny, tmp_path, recorded_batches):
    model, tokenizer = load_tiny("llama")
    rows = prompt_rows()
    trainer = MaskTokTrainer(
        model,
        args=make_config(tmp_path, max_steps=1, per_device_train_batch_size=1),
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows[:1]),
        peft_config=MaskTokConfig(r=4),
    )
    trainer.train()
    prompt_length = len(tokenizer(rows[0]["prompt"])["input_ids"])
    supervised = recorded_batches[0]["supervised"][0]
    assert not supervised[:prompt_length].any()
    assert supervised[prompt_length:].all()


def test_config_fields_have_help():
    missing = [field.name for field in dataclasses.fields(MaskTokTrainingConfig) if not field.metadata.get("help")]
    assert missing == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"objective": "kl"}, "objective must be one of"),
        ({"layout": "flex"}, "layout must be one of"),
        ({"min_k": 1}, "min_k must be an integer >= 2"),
        ({"max_k": 3, "min_k": 4}, r"max_k must be None or an integer >= min_k \(4\), got 3"),
        ({"max_k": 40, "region_size": 32}, r"region_size \(32\) must be larger than max_k - 1 \(39\)"),
        ({"blocks_per_sequence": 0}, "blocks_per_sequence must be None or an integer >= 1, got 0"),
        ({"threshold": 1.5}, r"threshold must be None or a number in \(0, 1\], got 1.5"),
        ({"use_chat_template": "yes"}, "use_chat_template must be None, True or False"),
        ({"use_chat_template": False, "assistant_only_loss": True}, "assistant_only_loss=True needs the chat template"),
        ({"packing": True}, r"packing \(True\) and padding_free"),
        ({"on_policy_max_new_tokens": 0}, "on_policy_max_new_tokens must be an integer >= 1, got 0"),
        ({"on_policy_temperature": 0.0}, "on_policy_temperature must be > 0"),
        ({"on_policy_top_p": 0.0}, r"on_policy_top_p must be in \(0, 1\]"),
        ({"on_policy_batch_size": 0}, "on_policy_batch_size must be an integer >= 1"),
    ],
)
def test_config_rejects_invalid_values(tmp_path, overrides, message):
    with pytest.raises(MaskTokError, match=message):
        MaskTokTrainingConfig(output_dir=str(tmp_path), report_to="none", **overrides)


def test_config_bf16_default_follows_hardware(tmp_path):
    config = MaskTokTrainingConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 == bf16_supported()
    assert MaskTokTrainingConfig(output_dir=str(tmp_path), report_to="none", bf16=False).bf16 is False


def test_trainer_leaves_caller_configs_alone(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    args = make_config(tmp_path, max_steps=1, gradient_checkpointing=True)
    adapter_config = MaskTokConfig(r=4)
    args_before = args.to_dict()
    adapter_before = adapter_config.to_dict()
    trainer = MaskTokTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(text_rows()),
        processing_class=tokenizer,
        peft_config=adapter_config,
    )
    trainer.train()
    assert args.to_dict() == args_before
    assert adapter_config.to_dict() == adapter_before
    assert trainer.adapter_config.mask_token_id is not None


def test_trainer_rejects_mismatched_adapter_settings(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    dataset = Dataset.from_list(text_rows())
    with pytest.raises(MaskTokError, match="layout='cached' needs an adapter with gated=True"):
        MaskTokTrainer(
            model,
            args=make_config(tmp_path, layout="cached"),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=MaskTokConfig(r=4, gated=False),
        )
    with pytest.raises(MaskTokError, match=r"max_k \(8\) must be at most the adapter config's max_k \(4\)"):
        MaskTokTrainer(
            model,
            args=make_config(tmp_path, max_k=8, region_size=16),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=MaskTokConfig(r=4, max_k=4),
        )
    with pytest.raises(MaskTokError, match="Pass a MaskTokConfig"):
        MaskTokTrainer(
            model,
            args=make_config(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft.LoraConfig(r=4),
        )
    with pytest.raises(TypeError, match="args must be a MaskTokTrainingConfig"):
        MaskTokTrainer(model, args=object(), train_dataset=dataset, processing_class=tokenizer)


def test_max_k_and_threshold_default_to_adapter(load_tiny, tmp_path, recorded_batches):
    model, tokenizer = load_tiny("qwen3")
    args = make_config(tmp_path, max_steps=4, max_k=None)
    trainer = MaskTokTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(text_rows()),
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4, max_k=3, threshold=0.5),
    )
    assert (trainer.max_k, trainer.threshold) == (3, 0.5)
    trainer.train()
    assert {call["k"] for call in recorded_batches} <= {2, 3}


def test_cached_layout_trains(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    trainer = MaskTokTrainer(
        model,
        args=make_config(tmp_path, layout="cached", blocks_per_sequence=4),
        train_dataset=Dataset.from_list(text_rows()),
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4),
    )
    before = trainable_state(trainer.model)
    trainer.train()
    after = trainable_state(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)


class GradientCapture(TrainerCallback):
    """Copy the trainable parameters' gradients just before the first optimizer step."""

    def __init__(self):
        self.gradients = None
        self.checkpointing = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.checkpointing = model.is_gradient_checkpointing
            self.gradients = {
                name: parameter.grad.detach().clone()
                for name, parameter in model.named_parameters()
                if parameter.requires_grad and parameter.grad is not None
            }


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_checkpointing_keeps_gradients(load_tiny, tmp_path, kind):
    captured = {}
    for checkpointing in (False, True):
        model, tokenizer = load_tiny(kind)
        capture = GradientCapture()
        trainer = MaskTokTrainer(
            model,
            args=make_config(tmp_path, max_steps=1, gradient_checkpointing=checkpointing),
            train_dataset=Dataset.from_list(text_rows()),
            processing_class=tokenizer,
            peft_config=MaskTokConfig(r=4),
            callbacks=[capture],
        )
        trainer.train()
        assert capture.checkpointing == checkpointing
        captured[checkpointing] = capture.gradients

    plain, checkpointed = captured[False], captured[True]
    assert plain.keys() == checkpointed.keys()
    mask_rows = [name for name in checkpointed if "masktok_row" in name]
    assert len(mask_rows) == 1
    assert checkpointed[mask_rows[0]].abs().sum() > 0, "the mask row must get a gradient under checkpointing"
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_mixed_precision_runs(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    trainer = MaskTokTrainer(
        model,
        args=make_config(tmp_path, bf16=True, use_cpu=True),
        train_dataset=Dataset.from_list(text_rows()),
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4),
    )
    before = trainable_state(trainer.model)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    after = trainable_state(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_resume_continues_the_same_run(load_tiny, tmp_path, recorded_batches):
    dataset = Dataset.from_list(text_rows(count=6))

    def run(output_dir, resume_from=None):
        recorded_batches.clear()
        model, tokenizer = load_tiny("llama")
        args = make_config(
            tmp_path,
            output_dir=str(output_dir),
            max_steps=6,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=3,
            max_k=6,
        )
        trainer = MaskTokTrainer(
            model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=MaskTokConfig(r=4),
        )
        trainer.train(resume_from_checkpoint=resume_from)
        batches = [(call["k"], call["input_ids"]) for call in recorded_batches]
        return trainable_state(trainer.model), batches

    full_weights, full_batches = run(tmp_path / "full")
    assert len(full_batches) == 6
    assert len({k for k, _ in full_batches}) > 1, "k should vary between steps"
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / "optimizer.pt").is_file()

    resumed_weights, resumed_batches = run(tmp_path / "resumed", resume_from=str(checkpoint))
    # The resumed run computes steps 4 to 6 only, with the k and the rows of the uninterrupted run.
    assert [k for k, _ in resumed_batches] == [k for k, _ in full_batches[3:]]
    for (_, resumed_ids), (_, full_ids) in zip(resumed_batches, full_batches[3:], strict=True):
        assert torch.equal(resumed_ids, full_ids)
    assert resumed_weights.keys() == full_weights.keys()
    for name in full_weights:
        torch.testing.assert_close(resumed_weights[name], full_weights[name], rtol=0, atol=1e-6, msg=name)


def test_saved_adapter_loads_onto_base_model(load_tiny, tiny_model_dirs, tmp_path):
    model, tokenizer = load_tiny("qwen3")
    trainer = MaskTokTrainer(
        model,
        args=make_config(tmp_path),
        train_dataset=Dataset.from_list(text_rows()),
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen3"], dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    trained = trainable_state(trainer.model)
    reloaded = {name: parameter.detach() for name, parameter in loaded.named_parameters() if name in trained}
    assert reloaded.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(reloaded[name], trained[name], msg=name)


def test_on_policy_text_replaces_completions(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    rows = prompt_rows()
    args = make_config(
        tmp_path,
        max_steps=1,
        on_policy=True,
        on_policy_max_new_tokens=5,
        on_policy_cache_dir=str(tmp_path / "cache"),
    )
    trainer = MaskTokTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=MaskTokConfig(r=4),
    )
    cached = list((tmp_path / "cache").glob("*.jsonl"))
    assert len(cached) == 1
    generated = [json.loads(line) for line in cached[0].read_text().splitlines()]
    assert [row["prompt"] for row in generated] == [row["prompt"] for row in rows]
    assert [row["completion"] for row in generated] != [row["completion"] for row in rows]

    first = generated[0]
    expected = tokenizer(first["prompt"] + first["completion"] + tokenizer.eos_token)["input_ids"]
    assert trainer.train_dataset[0]["input_ids"] == expected
    trainer.train()


def test_on_policy_from_model_path(tiny_model_dirs, tmp_path, monkeypatch):
    # A model path and no tokenizer: the trainer loads both itself, and caches under MASKTOK_CACHE.
    monkeypatch.setenv("MASKTOK_CACHE", str(tmp_path / "package-cache"))
    args = make_config(tmp_path, max_steps=1, on_policy=True, on_policy_max_new_tokens=3)
    trainer = MaskTokTrainer(
        str(tiny_model_dirs["llama"]),
        args=args,
        train_dataset=Dataset.from_list(prompt_rows()),
        peft_config=MaskTokConfig(r=4),
    )
    assert len(list((tmp_path / "package-cache" / CACHE_SUBFOLDER).glob("*.jsonl"))) == 1
    trainer.train()


def free_local_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_accelerate_run(tiny_model_dirs, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_local_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(TESTS_DIR / "two_process_train.py"),
        str(tiny_model_dirs["llama"]),
        str(output_dir),
    ]
    environment = dict(
        os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"
    )
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["num_processes"] == 2
        assert result["backend"] == "gloo"
        assert result["trained"] != result["initial"]
    # Each process saw different rows; only averaged gradients keep their weights identical.
    assert results[0]["trained"] == results[1]["trained"]
    logged = [entry for entry in results[0]["log_history"] if "loss" in entry]
    assert len(logged) == 3
    assert all("agreement/offset_1" in entry for entry in logged)
