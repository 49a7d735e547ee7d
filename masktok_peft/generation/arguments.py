"""The masktok arguments of `generate`: where they come from, their checks, and the options decoding rejects."""

from __future__ import annotations

from typing import Any

from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation import logits_process

from ..errors import MaskTokError
from .loop import DecodingSettings
from .policies import DEFAULT_POLICY, build_policy, validate_threshold

POLICY_ARGUMENT = "masktok_policy"
THRESHOLD_ARGUMENT = "masktok_threshold"
MAX_K_ARGUMENT = "masktok_max_k"
MIN_K_ARGUMENT = "masktok_min_k"
ADAPTIVE_ARGUMENT = "masktok_adaptive"
MASKTOK_ARGUMENTS = (ADAPTIVE_ARGUMENT, MAX_K_ARGUMENT, MIN_K_ARGUMENT, POLICY_ARGUMENT, THRESHOLD_ARGUMENT)

# Model inputs that the decoding loop builds itself or that stock `generate` adds. Any other model
# input (token_type_ids, pixel_values, ...) would need a per-pass layout, which the loop does not build.
HANDLED_MODEL_INPUTS = frozenset(
    {
        "attention_mask",
        "position_ids",
        "cache",
        "past_key_values",
        "use_cache",
        "logits_to_keep",
        # Stock `generate` forwards these to the model but returns their outputs only with return_dict_in_generate,
        # which check_generation_config rejects.
        "output_attentions",
        "output_hidden_states",
    }
)
# Stock outputs that masktok decoding does not produce.
UNSUPPORTED_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")

_BATCH_COUPLED_PROCESSORS = tuple(
    getattr(logits_process, name)
    for name in (
        "PrefixConstrainedLogitsProcessor",
        "ClassifierFreeGuidanceLogitsProcessor",
        "SynthIDTextWatermarkLogitsProcessor",
    )
    if hasattr(logits_process, name)
)
_MODEL_CALLING_PROCESSORS = tuple(
    getattr(logits_process, name)
    for name in ("UnbatchedClassifierFreeGuidanceLogitsProcessor",)
    if hasattr(logits_process, name)
)


def pop_masktok_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the masktok arguments from `kwargs`, which stock `generate` would reject, and return them."""
    return {name: kwargs.pop(name) for name in MASKTOK_ARGUMENTS if name in kwargs}


def resolve_settings(
    arguments: dict[str, Any],
    generation_configs: list[GenerationConfig | None],
    adapter_config: Any,
) -> DecodingSettings:
    """Build the settings from the call's arguments, then the generation configs in order, then the adapter config.

    `generation_configs` is the config passed to the call (or None) followed by the model's own.
    """

    def lookup(name: str, default: Any) -> Any:
        if name in arguments and arguments[name] is not None:
            return arguments[name]
        for config in generation_configs:
            value = getattr(config, name, None) if config is not None else None
            if value is not None:
                return value
        return default

    max_k = lookup(MAX_K_ARGUMENT, adapter_config.max_k)
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise MaskTokError(f"masktok_max_k must be an integer >= 1, got {max_k!r}. Use 1 for one token per pass.")
    threshold = validate_threshold(lookup(THRESHOLD_ARGUMENT, adapter_config.threshold))
    policy = build_policy(lookup(POLICY_ARGUMENT, DEFAULT_POLICY), threshold)
    if policy.verifies and not getattr(adapter_config, "gated", False):
        raise MaskTokError(
            f"masktok_policy={policy.name!r} needs a gated adapter (MaskTokConfig.gated=True), because only then are "
            "the real tokens' logits the base model's own; this adapter has gated=False. Use masktok_policy="
            "'confadapt', or train a gated adapter."
        )

    adaptive = lookup(ADAPTIVE_ARGUMENT, policy.adapts_by_default)
    if not isinstance(adaptive, bool):
        raise MaskTokError(f"masktok_adaptive must be True or False, got {adaptive!r}.")
    min_k = lookup(MIN_K_ARGUMENT, 1)
    if isinstance(min_k, bool) or not isinstance(min_k, int) or not 1 <= min_k <= max_k:
        raise MaskTokError(
            f"masktok_min_k must be an integer between 1 and masktok_max_k ({max_k}), got {min_k!r}. It is the "
            "smallest number of proposals per pass that the adaptive schedule may choose."
        )
    return DecodingSettings(
        policy=policy, max_k=max_k, mask_token_id=adapter_config.mask_token_id, adaptive=adaptive, min_k=min_k
    )


def check_call_arguments(args: tuple, kwargs: dict[str, Any]) -> None:
    """Reject the `generate` arguments that masktok decoding cannot honour, before any work is done."""
    if len(args) > 1:
        raise MaskTokError(
            f"generate() of a masktok model takes the inputs as its only positional argument, got {len(args)} "
            "positional arguments. Pass the others by keyword (generation_config=..., streamer=...)."
        )
    if kwargs.get("assistant_model") is not None:
        raise MaskTokError(
            "assistant_model cannot be combined with masktok decoding, which proposes its own tokens. Remove "
            "assistant_model, or pass masktok_policy='off' together with it disabled."
        )
    if kwargs.get("custom_generate") is not None:
        raise MaskTokError(
            "custom_generate cannot be combined with masktok decoding, which is itself the decoding loop. "
            "Remove custom_generate, or call generate() inside `with model.disable_adapter():`."
        )


def check_generation_config(generation_config: GenerationConfig, model_kwargs: dict[str, Any]) -> None:
    """Reject settings of the final generation config and model inputs that masktok decoding cannot honour."""
    if generation_config.num_beams is not None and generation_config.num_beams > 1:
        raise MaskTokError(
            f"masktok decoding keeps one sequence per row, so num_beams must be 1, got {generation_config.num_beams}. "
            "Pass num_beams=1, or call generate() inside `with model.disable_adapter():` for beam search."
        )
    prompt_lookup = getattr(generation_config, "prompt_lookup_num_tokens", None)
    if prompt_lookup is not None:
        raise MaskTokError(
            "prompt_lookup_num_tokens starts assisted decoding, which cannot be combined with masktok decoding; "
            f"got {prompt_lookup!r}. Remove it."
        )
    if generation_config.return_dict_in_generate:
        requested = [name for name in UNSUPPORTED_OUTPUTS if getattr(generation_config, name, False)]
        if requested:
            raise NotImplementedError(
                f"masktok decoding does not return {', '.join(requested)}. Remove these options, or call generate() "
                "inside `with model.disable_adapter():` to get them from ordinary decoding."
            )
    unknown = sorted(
        name for name, value in model_kwargs.items() if value is not None and name not in HANDLED_MODEL_INPUTS
    )
    if unknown:
        raise NotImplementedError(
            f"masktok decoding passes only input_ids, attention_mask and position_ids to the model, but got the model "
            f"inputs {unknown}. Remove them; inputs_embeds and multimodal inputs are not supported."
        )


def check_logits_processor(logits_processor: LogitsProcessorList, batch_size: int) -> None:
    """Reject processors that read the batch index of a row or call the model themselves."""
    for processor in logits_processor:
        if isinstance(processor, _MODEL_CALLING_PROCESSORS):
            raise NotImplementedError(
                f"{type(processor).__name__} runs the model one token at a time and cannot follow masktok decoding. "
                "Remove guidance_scale and negative_prompt_ids."
            )
        if batch_size > 1 and isinstance(processor, _BATCH_COUPLED_PROCESSORS):
            raise NotImplementedError(
                f"{type(processor).__name__} keeps state per batch row, but masktok decoding processes rows one at "
                f"a time; batch size {batch_size} is not supported with it. Generate one prompt at a time."
            )
