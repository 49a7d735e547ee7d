"""The cached gated path: one no-gradient pass over the text, then student and teacher passes over mask slots only.

With a gated adapter every real token computes exactly what the base model computes, so the
text's keys and values are the same for the student and the teacher. The text runs once,
without gradients and with the adapter disabled. Its per-layer keys and values then serve as a
read-only prefix for two short passes: the student's mask slots (adapter on, with gradients)
and the teacher's slots holding the student's tokens (adapter off). Many blocks of one text
share that prefix, each restricted by the attention mask to the text up to its own last token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from ..errors import MaskTokError
from .layout import BlockSlots


class ReadOnlyCacheLayer(DynamicLayer):
    """Cache layer with fixed keys and values: `update` returns them with the new states appended and stores nothing.

    Since nothing is stored, several passes can share one prefix, and a gradient-checkpointing
    replay of a layer reads the same keys and values as the first run.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys = keys
        self.values = values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def read_only_cache(cache: Cache) -> Cache:
    """Wrap the keys and values of a full-attention `DynamicCache` as a read-only prefix for later passes."""
    layers = []
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise MaskTokError(
                f"The cached layout needs a plain full-attention key/value cache, but layer {index} uses "
                f"{type(layer).__name__}. Use layout='packed' for this model."
            )
        layers.append(ReadOnlyCacheLayer(layer.keys, layer.values))
    return Cache(layers=layers)


@contextmanager
def cache_kept_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let gradient-checkpointed decoder layers keep a read-only cache during the forward passes inside the block.

    transformers 5.25 drops the `cache` argument of a checkpointed layer, because a writing cache
    would be updated twice when the backward pass replays the layer. `ReadOnlyCacheLayer` writes
    nothing, so the replay is exact, and the layers may keep it.
    """
    changed = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            changed.append((module, module.__dict__.get("_can_checkpoint_with_cache")))
            module._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for module, previous in changed:
            if previous is None:
                del module._can_checkpoint_with_cache
            else:
                module._can_checkpoint_with_cache = previous


def run_text_pass(
    peft_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, block_end: torch.Tensor
) -> tuple[torch.Tensor, Cache]:
    """Run the base model over the text once and return (logits at each block's end, read-only cache).

    The logits are those at each block's last real token, [batch, n, vocab].

    The caller runs this without gradients, with the adapter disabled and the model in eval mode.
    """
    outputs = peft_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=True,
        logits_to_keep=block_end,
    )
    return outputs.logits, read_only_cache(outputs.cache)


def run_slot_pass(
    model: nn.Module,
    slot_ids: torch.Tensor,
    slots: BlockSlots,
    attention_mask: torch.Tensor,
    prefix: Cache,
) -> torch.Tensor:
    """Run the block slots against the text prefix and return their logits, [batch, n, k-1, vocab].

    `slot_ids` [batch, S] contains the mask id (student) or the student's tokens (teacher), and
    `attention_mask` is `slots.attention_mask` in the form the attention implementation takes.
    """
    with cache_kept_under_checkpointing(model):
        outputs = model(
            input_ids=slot_ids,
            attention_mask=attention_mask,
            position_ids=slots.position_ids,
            cache=prefix,
            use_cache=False,
        )
    batch, num_blocks, k = slots.target_index.shape
    return outputs.logits.view(batch, num_blocks, k - 1, -1)
