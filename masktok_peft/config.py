"""MaskTokConfig: LoRA settings plus the mask token and decoding defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft import LoraConfig

from .errors import MaskTokError
from .registration import MASKTOK_PEFT_TYPE

MASK_INIT_CHOICES = ("mean", "normal", "existing")


@dataclass
class MaskTokConfig(LoraConfig):
    """Configuration of a masktok adapter: LoRA weights plus one trainable mask-token embedding row.

    Every LoRA option of `peft.LoraConfig` applies. The extra fields choose the mask token, how its
    row starts, whether the LoRA update is gated to mask positions, and the decoding defaults.
    """

    mask_token_id: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Token id whose embedding row becomes the trainable mask row. None chooses one: a "
                "reserved special token, else the first spare embedding row beyond the tokenizer, "
                "else one row past the end of the embedding matrix."
            )
        },
    )
    max_k: int = field(
        default=16,
        metadata={
            "help": "Maximum number of tokens proposed per forward pass (one real position plus max_k - 1 masks)."
        },
    )
    threshold: float = field(
        default=0.9,
        metadata={
            "help": "ConfAdapt confidence threshold in (0, 1]: keep proposals while top-1 probability >= threshold."
        },
    )
    gated: bool = field(
        default=True,
        metadata={
            "help": (
                "Apply the LoRA update only at positions whose input id is the mask id. Every other "
                "position then computes exactly what the base model computes."
            )
        },
    )
    mask_init: str = field(
        default="mean",
        metadata={
            "help": (
                "Initial value of the mask row: 'mean' (mean of the tokenizer's rows), 'normal' (a "
                "sample from a normal distribution with the rows' mean and covariance), or "
                "'existing' (the row's current value; only for ids inside the embedding matrix)."
            )
        },
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Tokenizer (Hub id or local folder) used to choose and validate the mask id. None uses "
                "base_model_name_or_path."
            )
        },
    )
    embedding_shape: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": (
                "Shape [rows, hidden size] of the base model's input embedding matrix, recorded when "
                "the adapter is created and checked when it is loaded. Leave it unset."
            )
        },
    )

    def __post_init__(self):
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        super().__post_init__()
        self.peft_type = MASKTOK_PEFT_TYPE
        self._validate_masktok_fields()

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save `adapter_config.json` and add the masktok section to the folder's model card."""
        super().save_pretrained(save_directory, **kwargs)
        from .model_card import write_model_card_section

        write_model_card_section(save_directory, self)

    def _validate_masktok_fields(self) -> None:
        if isinstance(self.max_k, bool) or not isinstance(self.max_k, int) or self.max_k < 1:
            raise MaskTokError(f"max_k must be an integer >= 1, got {self.max_k!r}.")
        if not isinstance(self.gated, bool):
            # A string such as "false" is truthy, so it would silently give a gated adapter.
            raise MaskTokError(f"gated must be True or False, got {self.gated!r}.")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise MaskTokError(f"threshold must be a number in (0, 1], got {self.threshold!r}.")
        if not 0.0 < self.threshold <= 1.0:
            raise MaskTokError(f"threshold must be in (0, 1], got {self.threshold!r}.")
        if self.mask_init not in MASK_INIT_CHOICES:
            raise MaskTokError(f"mask_init must be one of {MASK_INIT_CHOICES}, got {self.mask_init!r}.")
        if self.mask_token_id is not None and (
            isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int) or self.mask_token_id < 0
        ):
            raise MaskTokError(f"mask_token_id must be a non-negative integer or None, got {self.mask_token_id!r}.")
        if self.trainable_token_indices is not None:
            raise MaskTokError(
                "trainable_token_indices is not supported by MaskTokConfig, which trains its own mask row; "
                f"got {self.trainable_token_indices!r}. Remove it."
            )
        if self.gated:
            unsupported = {
                "use_dora": self.use_dora,
                "target_parameters": bool(self.target_parameters),
                "lora_bias": self.lora_bias,
            }
            for name, value in unsupported.items():
                if value:
                    raise MaskTokError(
                        f"{name} is not supported with gated=True (got {value!r}): the gated update is plain "
                        "LoRA on nn.Linear layers. Unset it or pass gated=False."
                    )
