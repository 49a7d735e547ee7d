"""Shared fixtures: tiny random models saved to disk, and the real default model for `slow` tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import KINDS, save_tiny  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# One thread: tiny models gain nothing from more, and on a shared 2-core machine more threads slow them down.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Folders holding a saved tiny model and tokenizer of each kind, keyed by kind."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in KINDS}


@pytest.fixture(params=KINDS)
def tiny_kind(request):
    return request.param


@pytest.fixture
def load_tiny(tiny_model_dirs):
    """Load a fresh copy of a tiny model and its tokenizer: load_tiny(kind) -> (model, tokenizer)."""

    def load(kind):
        folder = tiny_model_dirs[kind]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(folder)

    return load


@pytest.fixture(scope="session")
def smollm2_dir():
    """Folder of the converted SmolLM2-135M-Instruct (downloaded and converted on first use)."""
    from masktok_peft.models import default_model_path

    return default_model_path()
