"""`generate` for models carrying a masktok adapter.

Stock `generate` still prepares everything: it merges the generation config with the call's
arguments, builds the logits processors and stopping criteria, expands the inputs for
`num_return_sequences`, sets `max_length` and streams the prompt. Only its decoding loop is
replaced, through its `custom_generate` hook, by the masktok loop.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..errors import MaskTokError
from ..layers import MaskRowEmbedding
from .arguments import (
    check_call_arguments,
    check_generation_config,
    check_logits_processor,
    pop_masktok_arguments,
    resolve_settings,
)
from .loop import DecodingSettings, decode

logger = logging.getLogger(__name__)


@dataclass
class MaskTokGenerateOutput(GenerateDecoderOnlyOutput):
    """Output of `generate(..., return_dict_in_generate=True)` on a masktok model.

    `sequences` contains the prompt plus the new tokens. `masktok_stats` contains the forward passes,
    new tokens, tokens per pass and accepted-length histogram, overall and in `per_row`. `cache`
    is always None: the masktok cache has holes that only the decoding loop knows how to mask.
    """

    masktok_stats: dict[str, Any] | None = None


def generate_with_masktok(tuner: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Generate with the active masktok adapter of `tuner` (a MaskTokModel); takes stock `generate` arguments.

    The extra keyword arguments `masktok_policy`, `masktok_threshold`, `masktok_max_k`,
    `masktok_min_k` and `masktok_adaptive`, also read from a `GenerationConfig`, override the
    adapter config's decoding defaults. While the
    adapter is disabled this is stock `generate` of the base model.
    """
    masktok_arguments = pop_masktok_arguments(kwargs)
    model = tuner.model
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, MaskRowEmbedding) or embedding.disable_adapters:
        return model.generate(*args, **kwargs)

    check_call_arguments(args, kwargs)
    adapter_config = tuner.peft_config[tuner.active_adapters[0]]
    settings = resolve_settings(
        masktok_arguments, [kwargs.get("generation_config"), model.generation_config], adapter_config
    )
    _move_stop_strings_to_criteria(model, kwargs)
    # Stock `generate` streams the prompt itself but does not hand the streamer to a custom loop.
    streamer = kwargs.get("streamer")

    def masktok_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        return _run_decoding(
            model, input_ids, logits_processor, stopping_criteria, generation_config, settings, streamer, model_kwargs
        )

    with torch.no_grad():
        return model.generate(*args, custom_generate=masktok_decoding, **kwargs)


def _move_stop_strings_to_criteria(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Turn `stop_strings` into a StopStringCriteria in `kwargs["stopping_criteria"]`.

    NOTE: transformers 5.25 does not pass `tokenizer` on to `_get_stopping_criteria` when
    `custom_generate` is a callable, so stop strings left in the generation config would be
    rejected for want of a tokenizer. This moves them out; it can go once transformers passes it.
    """
    tokenizer = kwargs.pop("tokenizer", None)
    generation_config: GenerationConfig | None = kwargs.get("generation_config")
    stop_strings = kwargs.pop("stop_strings", None)
    if generation_config is not None and generation_config.stop_strings is not None:
        stop_strings = stop_strings if stop_strings is not None else generation_config.stop_strings
        generation_config = copy.deepcopy(generation_config)
        generation_config.stop_strings = None
        kwargs["generation_config"] = generation_config
    if model.generation_config.stop_strings is not None:
        stop_strings = stop_strings if stop_strings is not None else model.generation_config.stop_strings
        kwargs["stop_strings"] = None  # overrides the model's default, which stock generate would merge in
    if stop_strings is None:
        return
    if tokenizer is None:
        raise MaskTokError(
            f"stop_strings={stop_strings!r} needs the model's tokenizer: pass tokenizer=... to generate(), as stock "
            "generate requires."
        )
    criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria


def _run_decoding(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    settings: DecodingSettings,
    streamer,
    model_kwargs: dict[str, Any],
):
    """Check the prepared inputs, decode, and shape the output as stock `generate` does."""
    check_generation_config(generation_config, model_kwargs)
    batch = input_ids.shape[0]
    check_logits_processor(logits_processor, batch)
    if batch > 1 and generation_config._pad_token_tensor is None:
        raise MaskTokError(
            "pad_token_id is not set and there is no eos_token_id to use instead, but rows of a batch that finish "
            "early are filled with the pad token. Pass pad_token_id=... to generate()."
        )
    cache = _prepare_cache(model, model_kwargs)

    sequences, stats = decode(
        model,
        input_ids,
        model_kwargs.get("attention_mask"),
        model_kwargs.get("position_ids"),
        cache,
        logits_processor,
        stopping_criteria,
        generation_config,
        settings,
        streamer,
    )
    if streamer is not None:
        streamer.end()
    logger.debug("masktok generation finished: %s", {key: value for key, value in stats.items() if key != "per_row"})
    if generation_config.return_dict_in_generate:
        return MaskTokGenerateOutput(sequences=sequences, masktok_stats=stats)
    return sequences


def _prepare_cache(model: torch.nn.Module, model_kwargs: dict[str, Any]) -> DynamicCache:
    """Return the empty DynamicCache stock `generate` made, or a new one; reject caches the loop cannot crop."""
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is None:
        return DynamicCache(config=model.config.get_text_config(decoder=True))
    if getattr(cache, "_is_user_defined", False) and cache.get_seq_length() > 0:
        raise NotImplementedError(
            "masktok decoding cannot continue from a cache passed to generate(); pass the whole prompt instead."
        )
    if type(cache) is not DynamicCache:
        raise NotImplementedError(
            f"masktok decoding needs a DynamicCache, got {type(cache).__name__}. Remove cache_implementation."
        )
    if any(cache.is_sliding) or any(cache.is_linear):
        # Holes left by rows that accept fewer tokens would shrink a sliding window below its nominal size, and
        # recurrent (linear attention) states cannot drop the mask slots by cropping.
        raise NotImplementedError(
            "masktok decoding does not support models with sliding-window or linear attention layers yet."
        )
    return cache
