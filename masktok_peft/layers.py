"""The two layer types of a masktok adapter: the mask-row embedding and the gated LoRA linear layer.

Both read and write one `MaskPositions` object per model. The embedding layer sees the input ids,
so it records which positions hold the mask token; the gated linear layers then add their LoRA
update at those positions only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .errors import MaskTokError


class MaskPositions:
    """Boolean [batch, seq_len] tensor of the positions that hold the mask token in the latest forward pass.

    The embedding layer overwrites it on every forward pass made with the adapter enabled, and
    leaves it alone while the adapter is disabled. So a teacher pass under `disable_adapter()`
    does not disturb the student's record, which gradient checkpointing reads again during the
    backward pass.
    """

    def __init__(self) -> None:
        self._is_mask: Optional[torch.Tensor] = None
        self._row_index: Optional[torch.Tensor] = None

    @property
    def is_mask(self) -> Optional[torch.Tensor]:
        return self._is_mask

    @is_mask.setter
    def is_mask(self, value: Optional[torch.Tensor]) -> None:
        self._is_mask = value
        self._row_index = None

    @property
    def row_index(self) -> torch.Tensor:
        """Flat indices [num_mask_positions] of the mask positions, computed once per forward pass."""
        if self._row_index is None:
            self._row_index = self._is_mask.reshape(-1).nonzero().squeeze(1)
        return self._row_index


class MaskRowEmbedding(nn.Module, BaseTunerLayer):
    """Input embedding that returns a trainable row wherever the input id is the mask id.

    Every other position gets exactly the base layer's output. The row may lie past the end of
    the base matrix; such an id is looked up as id 0 and then replaced, so the base matrix is
    never resized. Only the rows that hold the mask id cost anything extra.
    """

    adapter_layer_names = ("masktok_row",)
    other_param_names = ("mask_token_id",)

    def __init__(self, base_layer: nn.Module, positions: MaskPositions) -> None:
        super().__init__()
        BaseTunerLayer.__init__(self)
        self.base_layer = base_layer
        self.masktok_row = nn.ParameterDict()
        self.mask_token_id: dict[str, int] = {}
        self.positions = positions
        self._disable_adapters = False
        self.merged_adapters = []

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def update_layer(self, adapter_name: str, mask_token_id: int, initial_row: torch.Tensor) -> None:
        weight = self.base_layer.weight
        self.masktok_row[adapter_name] = nn.Parameter(initial_row.detach().clone().to(weight.device, weight.dtype))
        self.mask_token_id[adapter_name] = mask_token_id
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise MaskTokError(
            "A masktok adapter cannot be merged into the base model: the mask row may lie outside the "
            "embedding matrix, and a gated LoRA update applies only at mask positions. Keep the adapter "
            "unmerged, or call unload() to get the base model back."
        )

    def unmerge(self) -> None:
        return None

    def _active_row_adapter(self) -> Optional[str]:
        active = [name for name in self.active_adapters if name in self.masktok_row]
        if len(active) > 1:
            raise MaskTokError(
                f"Only one masktok adapter can be active at a time, got {active}. Call set_adapter() with one name."
            )
        return active[0] if active else None

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = None if self.disable_adapters else self._active_row_adapter()
        if adapter is None:
            return self.base_layer(input_ids, *args, **kwargs)

        mask_token_id = self.mask_token_id[adapter]
        is_mask = input_ids == mask_token_id  # [batch, seq_len]
        self.positions.is_mask = is_mask

        lookup_ids = input_ids
        if mask_token_id >= self.base_layer.num_embeddings:
            lookup_ids = input_ids.masked_fill(is_mask, 0)
        embeddings = self.base_layer(lookup_ids, *args, **kwargs)  # [batch, seq_len, hidden]

        row = self.masktok_row[adapter].to(embeddings.dtype)
        embed_scale = self._get_embed_scale()
        if embed_scale is not None:
            # The base layer scales its own output (Gemma), so the replacement row is scaled the same way.
            row = row * embed_scale.to(row.dtype)
        return torch.where(is_mask.unsqueeze(-1), row, embeddings)

    def __repr__(self) -> str:
        return "masktok." + super().__repr__()


class GatedLinear(LoraLinear):
    """LoRA linear layer whose update is added only at the positions that hold the mask token.

    At every other position the output is the base layer's output, bit for bit. The update is
    computed for the mask positions alone, so a pass with no mask token costs what the base
    layer costs.
    """

    positions: MaskPositions

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise MaskTokError(
            "A gated masktok adapter cannot be merged into the base weights, because its update applies only at "
            "mask positions. Keep it unmerged, or train with gated=False to get a mergeable LoRA."
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise MaskTokError("Mixed-adapter batches (adapter_names=...) are not supported by masktok adapters.")
        kwargs.pop("adapter_names", None)

        result = self.base_layer(x, *args, **kwargs)
        is_mask = self.positions.is_mask
        if self.disable_adapters or is_mask is None:
            return result
        if is_mask.shape != x.shape[:-1]:
            raise MaskTokError(
                f"The mask positions recorded by the embedding layer have shape {tuple(is_mask.shape)}, but this "
                f"layer got input of shape {tuple(x.shape)}. Pass input_ids (not inputs_embeds) to a masktok model."
            )

        row_index = self.positions.row_index  # [num_mask_positions]
        if row_index.numel() == 0:
            return result

        flat_x = x.reshape(-1, x.shape[-1]).index_select(0, row_index)  # [num_mask_positions, in_features]
        flat_result = result.reshape(-1, result.shape[-1])  # [batch * seq_len, out_features]
        update = None
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_A = self.lora_A[adapter]
            lora_B = self.lora_B[adapter]
            adapter_x = self._cast_input_dtype(flat_x, lora_A.weight.dtype)
            term = lora_B(lora_A(self.lora_dropout[adapter](adapter_x))) * self.scaling[adapter]
            update = term if update is None else update + term
        if update is None:
            return result

        flat_result = flat_result.index_add(0, row_index, update.to(result.dtype))
        return flat_result.view_as(result)

    def __repr__(self) -> str:
        return "masktok." + super().__repr__().removeprefix("lora.")
