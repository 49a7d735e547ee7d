"""masktok-peft: multi-token decoding for Hugging Face causal language models, as a PEFT adapter.

Importing the package registers the masktok adapter type with PEFT, so `peft.get_peft_model`,
`peft.PeftModel.from_pretrained` and `peft.AutoPeftModelForCausalLM` handle masktok adapters.
The training classes import TRL, so they load on first use.
"""

from importlib import import_module
from typing import Any

from .adapter import MaskTokModel
from .config import MaskTokConfig
from .errors import MaskTokError, MaskTokWarning
from .generation import MaskTokGenerateOutput
from .mask_token import MaskTokenChoice, select_mask_token, validate_mask_token_id
from .models import load_default_adapter, load_masktok_model
from .registration import register_masktok

register_masktok(MaskTokConfig, MaskTokModel)

_LAZY_ATTRIBUTES = {
    "MaskTokTrainer": ".training",
    "MaskTokTrainingConfig": ".training",
    "distillation_step": ".training",
}

__all__ = [
    "MaskTokConfig",
    "MaskTokError",
    "MaskTokGenerateOutput",
    "MaskTokModel",
    "MaskTokTrainer",
    "MaskTokTrainingConfig",
    "MaskTokWarning",
    "MaskTokenChoice",
    "distillation_step",
    "load_default_adapter",
    "load_masktok_model",
    "select_mask_token",
    "validate_mask_token_id",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(import_module(_LAZY_ATTRIBUTES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
