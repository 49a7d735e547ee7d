"""The masktok adapter type: mask id choice, gating, trainable parameters, saving and loading."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from masktok_peft import MaskTokConfig, MaskTokError
from masktok_peft.layers import MaskRowEmbedding

EXPECTED_MASK_ID = {"llama": 120, "qwen3": 100, "gpt2": 100}
EXPECTED_SOURCE_ROWS = {"llama": 128, "qwen3": 128, "gpt2": 100}


def make_adapter(model, **overrides):
    settings = dict(r=4, lora_alpha=8, init_lora_weights=False)
    settings.update(overrides)
    return peft.get_peft_model(model, MaskTokConfig(**settings))


def mask_id_of(peft_model):
    return peft_model.peft_config["default"].mask_token_id


def ids_with_masks(mask_id, batch=2):
    text = torch.tensor([[7, 8, 9, 10, 11, 12]] * batch)
    masks = torch.full((batch, 3), mask_id)
    return torch.cat([text, masks], dim=1)


def train_a_few_steps(peft_model, steps=3):
    """Take optimizer steps on a loss read at mask slots, so LoRA and the mask row move."""
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = ids_with_masks(mask_id_of(peft_model))
    for _ in range(steps):
        logits = peft_model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, -3:].reshape(-1, logits.shape[-1]), torch.tensor([5] * 6))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()


def test_config_fields_have_help():
    for field in dataclasses.fields(MaskTokConfig):
        assert field.metadata.get("help"), f"MaskTokConfig.{field.name} has no help text"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"max_k": 0}, "max_k"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"mask_init": "zeros"}, "mask_init"),
        ({"mask_token_id": -1}, "mask_token_id"),
        ({"trainable_token_indices": [5]}, "trainable_token_indices"),
        ({"use_dora": True}, "use_dora"),
        ({"gated": "false"}, "gated must be True or False"),
        ({"gated": 0}, "gated must be True or False"),
    ],
)
def test_config_rejects_bad_values(overrides, fragment):
    with pytest.raises(MaskTokError, match=fragment):
        MaskTokConfig(**overrides)


def test_config_sets_causal_lm_task():
    config = MaskTokConfig()
    assert config.task_type == "CAUSAL_LM"
    assert config.peft_type.name == "MASKTOK"


def test_mask_id_choice(load_tiny, tiny_kind):
    model, _ = load_tiny(tiny_kind)
    peft_model = make_adapter(model)
    config = peft_model.peft_config["default"]
    assert config.mask_token_id == EXPECTED_MASK_ID[tiny_kind]
    assert config.embedding_shape == [EXPECTED_SOURCE_ROWS[tiny_kind], 32]


def test_only_lora_and_mask_row_trainable(load_tiny, tiny_kind):
    model, _ = load_tiny(tiny_kind)
    peft_model = make_adapter(model)
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable
    for name in trainable:
        assert "lora_A" in name or "lora_B" in name or "masktok_row" in name, name
    assert sum("masktok_row" in name for name in trainable) == 1


def test_gated_equals_base_without_masks(load_tiny, tiny_kind):
    model, _ = load_tiny(tiny_kind)
    peft_model = make_adapter(model)
    ids = torch.tensor([[3, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, output_hidden_states=True)
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(adapted.logits, base.logits)
    for adapted_hidden, base_hidden in zip(adapted.hidden_states, base.hidden_states):
        assert torch.equal(adapted_hidden, base_hidden)


def test_gated_equals_base_before_masks(load_tiny, tiny_kind):
    model, _ = load_tiny(tiny_kind)
    peft_model = make_adapter(model)
    ids = ids_with_masks(mask_id_of(peft_model))
    mask_free_ids = ids.clone()
    mask_free_ids[:, 6:] = 5
    with torch.no_grad():
        adapted = peft_model(input_ids=ids, output_hidden_states=True)
        with peft_model.disable_adapter():
            base = peft_model(input_ids=mask_free_ids, output_hidden_states=True)
    assert torch.equal(adapted.logits[:, :6], base.logits[:, :6])
    for adapted_hidden, base_hidden in zip(adapted.hidden_states, base.hidden_states):
        assert torch.equal(adapted_hidden[:, :6], base_hidden[:, :6])
    # The adapter does act at the mask slots.
    assert not torch.allclose(adapted.logits[:, 6:], base.logits[:, 6:])


def test_ungated_is_plain_lora(load_tiny):
    model, _ = load_tiny("llama")
    peft_model = make_adapter(model, gated=False, target_modules=["q_proj", "v_proj"])
    reference, _ = load_tiny("llama")
    lora_model = peft.get_peft_model(
        reference, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora_weights = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    missing, unexpected = lora_model.load_state_dict(lora_weights, strict=False)
    assert not unexpected
    ids = torch.tensor([[3, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, lora_model(input_ids=ids).logits)
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert not torch.equal(peft_model(input_ids=ids).logits, base)


def test_training_changes_only_the_mask_row(load_tiny, tiny_kind):
    model, _ = load_tiny(tiny_kind)
    peft_model = make_adapter(model)
    embedding = peft_model.get_input_embeddings()
    assert isinstance(embedding, MaskRowEmbedding)
    mask_id = mask_id_of(peft_model)
    all_ids = torch.arange(embedding.num_embeddings).unsqueeze(0)
    with torch.no_grad():
        rows_before = embedding(all_ids).clone()
        mask_row_before = embedding(torch.tensor([[mask_id]])).clone()
    train_a_few_steps(peft_model)
    with torch.no_grad():
        rows_after = embedding(all_ids)
        mask_row_after = embedding(torch.tensor([[mask_id]]))
    if mask_id < embedding.num_embeddings:
        keep = torch.ones(embedding.num_embeddings, dtype=torch.bool)
        keep[mask_id] = False
        assert torch.equal(rows_before[0, keep], rows_after[0, keep])
    else:
        assert torch.equal(rows_before, rows_after)
    assert not torch.equal(mask_row_before, mask_row_after)


@pytest.fixture
def saved_adapter(load_tiny, tiny_kind, tmp_path):
    model, _ = load_tiny(tiny_kind)
    peft_model = make_adapter(model)
    train_a_few_steps(peft_model)
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    ids = ids_with_masks(mask_id_of(peft_model))
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    return folder, ids, logits


def test_saved_files_hold_only_adapter_weights(saved_adapter, tiny_kind):
    folder, _, _ = saved_adapter
    weights = load_file(folder / "adapter_model.safetensors")
    for key in weights:
        assert "lora_A" in key or "lora_B" in key or key.endswith("masktok_row"), key
    rows = [key for key in weights if key.endswith("masktok_row")]
    assert len(rows) == 1
    assert weights[rows[0]].shape == (32,)


def test_round_trip_with_peft_model(saved_adapter, load_tiny, tiny_kind):
    folder, ids, logits = saved_adapter
    stock, _ = load_tiny(tiny_kind)
    loaded = PeftModel.from_pretrained(stock, folder)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)


def test_round_trip_with_auto_peft_model(saved_adapter):
    folder, ids, logits = saved_adapter
    loaded = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)


def test_adapter_config_records_type(saved_adapter, tiny_kind):
    folder, _, _ = saved_adapter
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert "masktok-peft" in saved["peft_type"]
    assert saved["mask_token_id"] == EXPECTED_MASK_ID[tiny_kind]
    assert saved["gated"] is True


def test_model_card(saved_adapter, tiny_model_dirs, tiny_kind):
    folder, _, _ = saved_adapter
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card
    assert f"base_model: {tiny_model_dirs[tiny_kind]}" in card
    assert "- masktok" in card
    assert f"| mask token id | {EXPECTED_MASK_ID[tiny_kind]} |" in card
    assert "import masktok_peft" in card


def test_model_card_keeps_user_text(load_tiny, tmp_path):
    model, _ = load_tiny("llama")
    peft_model = make_adapter(model)
    peft_model.save_pretrained(tmp_path)
    card_path = tmp_path / "README.md"
    card_path.write_text(card_path.read_text() + "\nNotes written by the user.\n")
    peft_model.save_pretrained(tmp_path)
    card = card_path.read_text()
    assert "Notes written by the user." in card
    assert card.count("## masktok adapter") == 1


def test_wrong_base_shape_rejected(saved_adapter, tiny_kind):
    folder, _, _ = saved_adapter
    if tiny_kind != "llama":
        pytest.skip("one architecture is enough for the shape check")
    wrong = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(MaskTokError, match=r"\[128, 32\].*\[128, 48\]"):
        PeftModel.from_pretrained(wrong, folder)


LOAD_WITHOUT_IMPORT = textwrap.dedent(
    """
    import sys
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    folder, base_folder = sys.argv[1], sys.argv[2]
    for load in (
        lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), folder),
        lambda: AutoPeftModelForCausalLM.from_pretrained(folder),
    ):
        try:
            load()
        except Exception as error:
            print("ERROR:", type(error).__name__, error)
        else:
            print("LOADED")
    print("masktok_peft imported:", "masktok_peft" in sys.modules)
    """
)


def test_load_without_import_names_the_package(saved_adapter, tiny_model_dirs, tiny_kind):
    if tiny_kind != "qwen3":
        pytest.skip("one architecture is enough for the subprocess check")
    folder, _, _ = saved_adapter
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(folder), str(tiny_model_dirs[tiny_kind])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(("ERROR", "LOADED", "masktok"))]
    assert lines[-1] == "masktok_peft imported: False"
    errors = lines[:-1]
    assert len(errors) == 2, completed.stdout + completed.stderr
    for line in errors:
        assert line.startswith("ERROR:"), line
        assert "pip install masktok-peft" in line, line
        assert "import masktok_peft" in line, line


def test_invalid_mask_ids_rejected(tiny_model_dirs):
    folder = tiny_model_dirs["llama"]
    cases = {
        2: "EOS",
        0: "PAD",
        1: "BOS",
        11: "ordinary token 'w5'",
        4: "chat template",
        129: "out of range",
    }
    for mask_id, fragment in cases.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        with pytest.raises(
            MaskTokError, match=f"mask_token_id {mask_id} .*{fragment}|mask_token_id {mask_id} is the {fragment}"
        ):
            make_adapter(model, mask_token_id=mask_id)


@pytest.mark.parametrize("mask_id, row_count", [(121, 128), (125, 128), (128, 128)])
def test_valid_explicit_mask_ids_accepted(tiny_model_dirs, mask_id, row_count):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    peft_model = make_adapter(model, mask_token_id=mask_id)
    assert mask_id_of(peft_model) == mask_id
    ids = ids_with_masks(mask_id)
    with torch.no_grad():
        assert peft_model(input_ids=ids).logits.shape == (2, 9, row_count)


def test_existing_init_needs_a_row_inside_the_matrix(tiny_model_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])
    with pytest.raises(MaskTokError, match="mask_init='existing'"):
        make_adapter(model, mask_init="existing")


def test_merge_is_rejected_and_unload_restores_base(load_tiny):
    model, _ = load_tiny("qwen3")
    peft_model = make_adapter(model)
    with pytest.raises(MaskTokError, match="cannot be merged"):
        peft_model.merge_and_unload()
    ids = torch.tensor([[3, 7, 8, 9]])
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids=ids).logits
    unloaded = peft_model.unload()
    assert isinstance(unloaded.get_input_embeddings(), torch.nn.Embedding)
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=ids).logits, base_logits)
