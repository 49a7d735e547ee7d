"""masktok-peft: multi-token decoding for Hugging Face causal language models, as a PEFT adapter."""

from .adapter import MaskTokModel
from .config import MaskTokConfig
from .errors import MaskTokError, MaskTokWarning
from .mask_token import MaskTokenChoice, select_mask_token, validate_mask_token_id
from .registration import register_masktok

register_masktok(MaskTokConfig, MaskTokModel)

__all__ = [
    "MaskTokConfig",
    "MaskTokError",
    "MaskTokModel",
    "MaskTokWarning",
    "MaskTokenChoice",
    "select_mask_token",
    "validate_mask_token_id",
]

__version__ = "0.1.0"
