"""MaskTokTrainingConfig: TRL's SFT settings plus the self-distillation settings of masktok training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from trl import SFTConfig

from ..errors import MaskTokError

if TYPE_CHECKING:
    from ..config import MaskTokConfig

OBJECTIVES = ("hard", "soft", "ground_truth")
LAYOUTS = ("packed", "cached")


def bf16_supported() -> bool:
    """Return whether an attached accelerator (CUDA or XPU) runs bf16 natively."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class MaskTokTrainingConfig(SFTConfig):
    """Configuration of `MaskTokTrainer`: every option of `trl.SFTConfig` plus the masktok training options.

    Defaults that differ from `SFTConfig`: `learning_rate` is 2e-4 (LoRA weights, not full
    fine-tuning), and `bf16` defaults to True only where an accelerator supports bf16, so CPU runs
    stay in float32. `packing` and `padding_free` are rejected, because the trainer builds its own
    block attention mask from right-padded rows.
    """

    learning_rate: float = field(
        default=2e-4,
        metadata={"help": "Initial learning rate of AdamW for the LoRA weights and the mask row."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": (
                "Use bf16 mixed precision. None enables it when a CUDA or XPU device supports bf16 and fp16 "
                "is off, and leaves it off on CPU."
            )
        },
    )
    objective: str = field(
        default="hard",
        metadata={
            "help": (
                "Training target of each block: 'hard' (cross-entropy against the argmax of the teacher, the base "
                "model with the adapter disabled), 'soft' (token-level KL divergence to the teacher's distribution), "
                "or 'ground_truth' (cross-entropy against the dataset's next tokens)."
            ),
            "choices": list(OBJECTIVES),
        },
    )
    layout: str = field(
        default="packed",
        metadata={
            "help": (
                "How blocks are laid out: 'packed' (regions of real tokens and mask slots in one sequence, with a "
                "block attention mask), or 'cached' (the text runs once without gradients and every block attends "
                "to its cached keys and values; needs an adapter with gated=True)."
            ),
            "choices": list(LAYOUTS),
        },
    )
    min_k: int = field(
        default=2,
        metadata={"help": "Smallest block size k drawn per step (one real position plus k - 1 mask slots); >= 2."},
    )
    max_k: int | None = field(
        default=None,
        metadata={
            "help": (
                "Largest block size k drawn per step; each step draws k uniformly from [min_k, max_k]. None uses "
                "the adapter config's max_k."
            )
        },
    )
    region_size: int = field(
        default=32,
        metadata={
            "help": (
                "Slots per region in the packed layout: real tokens followed by k - 1 mask slots. Must be larger "
                "than max_k - 1."
            )
        },
    )
    blocks_per_sequence: int | None = field(
        default=None,
        metadata={
            "help": (
                "Blocks placed per training sequence. None uses as many as fit: one per region in the packed "
                "layout, and the objective's own default in the cached layout."
            )
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": (
                "ConfAdapt confidence threshold in (0, 1] used for the logged tokens-per-pass estimate. None uses "
                "the adapter config's threshold."
            )
        },
    )
    use_chat_template: bool | None = field(
        default=None,
        metadata={
            "help": (
                "None: apply the tokenizer's chat template to conversational rows only (TRL's behavior). True: "
                "also turn string prompt/completion rows into a user and an assistant message. False: render "
                "conversational rows as plain text (message contents joined by line breaks), without the template."
            )
        },
    )
    on_policy: bool = field(
        default=False,
        metadata={
            "help": (
                "Replace the training dataset's completions by the base model's own continuations of its prompts "
                "(adapter disabled), generated once before training and cached on disk. Needs prompt/completion "
                "or messages rows. The eval dataset is used as given."
            )
        },
    )
    on_policy_max_new_tokens: int = field(
        default=256,
        metadata={"help": "Maximum number of tokens generated per prompt for on-policy training text."},
    )
    on_policy_do_sample: bool = field(
        default=False,
        metadata={"help": "Sample the on-policy continuations instead of decoding greedily."},
    )
    on_policy_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature for on-policy continuations (> 0); used only with on_policy_do_sample."
        },
    )
    on_policy_top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling mass in (0, 1] for on-policy continuations; used only with sampling."},
    )
    on_policy_batch_size: int = field(
        default=8,
        metadata={"help": "Number of prompts generated together when building on-policy training text."},
    )
    on_policy_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": (
                "Folder for cached on-policy datasets, one file per model, dataset and generation settings, "
                "reused by later runs. None uses the package cache folder ($MASKTOK_CACHE or "
                "~/.cache/masktok-peft) under 'on_policy'."
            )
        },
    )

    max_time_minutes: float | None = field(
        default=None,
        metadata={
            "help": (
                "Wall-clock budget in minutes. Training stops after the first optimizer step that ends past it, so "
                "the adapter can still be saved. The clock starts when the trainer is created, so it includes "
                "on-policy text generation (which is never cut short) and dataset tokenization, but not model "
                "loading. None: no budget, train for max_steps or num_train_epochs."
            )
        },
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16 and not self.use_cpu and bf16_supported()
        super().__post_init__()
        self._validate_masktok_fields()

    def _validate_masktok_fields(self) -> None:
        if self.objective not in OBJECTIVES:
            raise MaskTokError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.layout not in LAYOUTS:
            raise MaskTokError(f"layout must be one of {LAYOUTS}, got {self.layout!r}.")

        if not _is_int(self.min_k) or self.min_k < 2:
            raise MaskTokError(
                f"min_k must be an integer >= 2, got {self.min_k!r}: a block needs at least one mask slot."
            )
        if self.max_k is not None and (not _is_int(self.max_k) or self.max_k < self.min_k):
            raise MaskTokError(
                f"max_k must be None or an integer >= min_k ({self.min_k}), got {self.max_k!r}. Raise max_k or "
                "lower min_k."
            )
        if not _is_int(self.region_size) or self.region_size < 2:
            raise MaskTokError(f"region_size must be an integer >= 2, got {self.region_size!r}.")
        if self.max_k is not None and self.region_size <= self.max_k - 1:
            raise MaskTokError(
                f"region_size ({self.region_size}) must be larger than max_k - 1 ({self.max_k - 1}) so that each "
                "region keeps at least one real token. Raise region_size or lower max_k."
            )

        if self.blocks_per_sequence is not None and (
            not _is_int(self.blocks_per_sequence) or self.blocks_per_sequence < 1
        ):
            raise MaskTokError(
                f"blocks_per_sequence must be None or an integer >= 1, got {self.blocks_per_sequence!r}."
            )
        if self.threshold is not None and (not _is_number(self.threshold) or not 0.0 < self.threshold <= 1.0):
            raise MaskTokError(f"threshold must be None or a number in (0, 1], got {self.threshold!r}.")

        if self.use_chat_template is not None and not isinstance(self.use_chat_template, bool):
            raise MaskTokError(f"use_chat_template must be None, True or False, got {self.use_chat_template!r}.")
        if self.use_chat_template is False and self.assistant_only_loss:
            raise MaskTokError(
                "assistant_only_loss=True needs the chat template, but use_chat_template=False renders the rows "
                "as plain text. Use completion_only_loss with prompt/completion rows instead, or set "
                "use_chat_template=None."
            )

        if self.packing or self.padding_free:
            raise MaskTokError(
                f"packing ({self.packing!r}) and padding_free ({self.padding_free!r}) are not supported: masktok "
                "builds its own block attention mask from right-padded rows. Set both to False."
            )
        if self.max_time_minutes is not None and (
            not _is_number(self.max_time_minutes) or not self.max_time_minutes > 0
        ):
            raise MaskTokError(
                f"max_time_minutes must be None or a number of minutes > 0, got {self.max_time_minutes!r}."
            )
        self._validate_on_policy_fields()

    def _validate_on_policy_fields(self) -> None:
        if not _is_int(self.on_policy_max_new_tokens) or self.on_policy_max_new_tokens < 1:
            raise MaskTokError(
                f"on_policy_max_new_tokens must be an integer >= 1, got {self.on_policy_max_new_tokens!r}."
            )
        if not _is_int(self.on_policy_batch_size) or self.on_policy_batch_size < 1:
            raise MaskTokError(f"on_policy_batch_size must be an integer >= 1, got {self.on_policy_batch_size!r}.")
        if not _is_number(self.on_policy_temperature) or self.on_policy_temperature <= 0:
            raise MaskTokError(f"on_policy_temperature must be > 0, got {self.on_policy_temperature!r}.")
        if not _is_number(self.on_policy_top_p) or not 0.0 < self.on_policy_top_p <= 1.0:
            raise MaskTokError(f"on_policy_top_p must be in (0, 1], got {self.on_policy_top_p!r}.")

    def resolve_block_settings(self, adapter_config: MaskTokConfig) -> tuple[int, float]:
        """Return (max_k, threshold), taking each from `adapter_config` where unset here, and check them."""
        max_k = self.max_k if self.max_k is not None else adapter_config.max_k
        threshold = self.threshold if self.threshold is not None else adapter_config.threshold
        if max_k > adapter_config.max_k:
            raise MaskTokError(
                f"max_k ({max_k}) must be at most the adapter config's max_k ({adapter_config.max_k}), the "
                "largest block the adapter is meant to decode. Lower max_k, or raise MaskTokConfig.max_k."
            )
        if max_k < self.min_k:
            raise MaskTokError(
                f"max_k ({max_k}, from {'args' if self.max_k is not None else 'the adapter config'}) must be "
                f">= min_k ({self.min_k}). Set max_k in MaskTokTrainingConfig or MaskTokConfig, or lower min_k."
            )
        if self.layout == "packed" and self.region_size <= max_k - 1:
            raise MaskTokError(
                f"region_size ({self.region_size}) must be larger than max_k - 1 ({max_k - 1}) so that each "
                "region keeps at least one real token. Raise region_size or lower max_k."
            )
        if self.layout == "cached" and not adapter_config.gated:
            raise MaskTokError(
                "layout='cached' needs an adapter with gated=True: only then do the real tokens see exactly the base "
                "model, so one text pass serves student and teacher. Use layout='packed' or MaskTokConfig(gated=True)."
            )
        return max_k, threshold
