"""MaskTokModel: the PEFT tuner that adds the mask row and the (gated) LoRA layers to a model."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraModel
from torch import nn

from .config import MaskTokConfig
from .errors import MaskTokError
from .generation import generate_with_masktok
from .layers import GatedLinear, MaskPositions, MaskRowEmbedding
from .mask_token import (
    MaskTokenChoice,
    initial_mask_row,
    select_mask_token,
    special_token_ids,
    tokenizer_size,
    validate_mask_token_id,
)
from .registration import MASKTOK_PREFIX

logger = logging.getLogger(__name__)

MODEL_TAG = "masktok"


def _load_tokenizer(name_or_path: Optional[str]):
    """Load the tokenizer at `name_or_path`, or return None when there is none to load."""
    if not name_or_path:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        logger.warning("Could not load a tokenizer from %r (%s); mask id checks will be limited.", name_or_path, error)
        return None


class MaskTokModel(LoraModel):
    """PEFT tuner for masktok adapters.

    It is LoRA with two changes: the input embedding is wrapped so that the mask id reads a
    trainable row, and with `gated=True` the LoRA update is applied only at mask positions.
    Build it through `peft.get_peft_model(model, MaskTokConfig(...))` or load a saved adapter with
    `peft.PeftModel.from_pretrained`.
    """

    prefix: str = MASKTOK_PREFIX

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self.mask_positions = MaskPositions()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags([MODEL_TAG])

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        config: MaskTokConfig = self.peft_config[adapter_name]
        if not isinstance(config, MaskTokConfig):
            raise MaskTokError(f"MaskTokModel needs a MaskTokConfig, got {type(config).__name__}.")
        embedding = self._base_input_embedding(model)
        choice, initial_row = self._resolve_mask_row(model, embedding, config)

        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )

        wrapper = model.get_input_embeddings()
        if not isinstance(wrapper, MaskRowEmbedding):
            wrapper = MaskRowEmbedding(embedding, self.mask_positions)
            model.set_input_embeddings(wrapper)
        wrapper.update_layer(adapter_name, choice.token_id, initial_row)
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        wrapper.masktok_row[adapter_name].requires_grad_(trainable)

        for module in model.modules():
            if isinstance(module, GatedLinear):
                module.positions = self.mask_positions
        logger.info("masktok adapter %r uses mask id %d (%s row).", adapter_name, choice.token_id, choice.source)

    @staticmethod
    def _base_input_embedding(model: nn.Module) -> nn.Module:
        embedding = model.get_input_embeddings()
        if isinstance(embedding, MaskRowEmbedding):
            return embedding.get_base_layer()
        if not isinstance(embedding, nn.Embedding):
            raise MaskTokError(
                f"masktok needs an nn.Embedding input layer, but the model's input embedding is "
                f"{type(embedding).__name__}."
            )
        return embedding

    def _resolve_mask_row(
        self, model: nn.Module, embedding: nn.Embedding, config: MaskTokConfig
    ) -> tuple[MaskTokenChoice, torch.Tensor]:
        """Choose or check the mask id, check the base model's shape, and compute the row's first value."""
        shape = [embedding.num_embeddings, embedding.embedding_dim]
        if config.embedding_shape is not None:
            # A saved adapter: its row and weights are about to be loaded, so only the shape is checked.
            if list(config.embedding_shape) != shape:
                raise MaskTokError(
                    f"This masktok adapter was created for a base model whose input embedding has shape "
                    f"{list(config.embedding_shape)} [rows, hidden size], but the given base model's has shape "
                    f"{shape}. Load it onto the base model named in its config ({config.base_model_name_or_path!r})."
                )
            choice = MaskTokenChoice(config.mask_token_id, "saved")
            return choice, torch.zeros(embedding.embedding_dim, dtype=embedding.weight.dtype)

        tokenizer = _load_tokenizer(config.tokenizer_name_or_path or config.base_model_name_or_path)
        special_ids = special_token_ids(
            tokenizer, getattr(model, "config", None), getattr(model, "generation_config", None)
        )
        rows = embedding.num_embeddings
        if config.mask_token_id is None:
            choice = select_mask_token(rows, tokenizer, special_ids)
        else:
            choice = validate_mask_token_id(config.mask_token_id, rows, tokenizer, special_ids)

        reference_rows = min(tokenizer_size(tokenizer), rows) if tokenizer is not None else None
        initial_row = initial_mask_row(embedding.weight, config.mask_init, choice.token_id, reference_rows)
        config.mask_token_id = choice.token_id
        config.embedding_shape = shape
        return choice, initial_row

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new_module = LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)
        if not lora_config.gated:
            return new_module
        if type(new_module) is not LoraLinear:
            raise MaskTokError(
                f"gated=True supports nn.Linear and transformers Conv1D targets, got {type(new_module).__name__} "
                f"for {kwargs.get('target_name')!r}. Remove it from target_modules or pass gated=False."
            )
        # GatedLinear only replaces forward() and merge(), so the module built by PEFT is reused as it is.
        new_module.__class__ = GatedLinear
        return new_module

    def generate(self, *args, **kwargs):
        """Generate several tokens per forward pass with the active adapter; see `masktok_peft.generation`.

        Takes stock `generate` arguments plus `masktok_policy`, `masktok_threshold` and `masktok_max_k`.
        """
        return generate_with_masktok(self, *args, **kwargs)

    def _unload_and_optionally_merge(
        self, merge=True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ):
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        embedding = model.get_input_embeddings()
        if isinstance(embedding, MaskRowEmbedding):
            model.set_input_embeddings(embedding.get_base_layer())
        return model
