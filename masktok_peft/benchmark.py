"""Side-by-side decoding benchmark: speed and fidelity of masktok decoding against stock `generate`.

One run answers the same GSM8K questions with every method, in one process, on one base model
carrying one or more masktok adapters. The methods alternate: every method answers a batch of
prompts before the next batch starts, and the order rotates from batch to batch. So all methods
see the same machine load, and every speed-up is a ratio of figures measured side by side.

Methods, written as specs:
- `stock`: the base model's greedy `generate` with the adapter disabled. It is the reference for
  speed-ups and fidelity, and always runs.
- `lookup:N`: stock prompt lookup decoding (`prompt_lookup_num_tokens=N`). transformers runs it
  at batch size 1 only, so it is skipped at larger batch sizes.
- `confadapt:T`, `static:K` and any other masktok policy by name (`off`, ...), once per adapter.

Each output is compared with stock greedy's output for the same prompt at the same batch size:
identical new token ids, the GSM8K final answer, and the base model's negative log-likelihood of
the produced tokens. `benchmark_report` turns the measurements into figures and writes them as
JSON, Markdown and a plot.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .benchmark_report import adapter_description, machine_description, summarize
from .errors import MaskTokError
from .evaluation import GeneratedBatch, build_prompts, generate_ids
from .generation.policies import POLICIES, validate_threshold

logger = logging.getLogger(__name__)

STOCK = "stock"
DEFAULT_PROMPT_LOOKUP_TOKENS = 10
DEFAULT_METHODS = (
    "stock",
    f"lookup:{DEFAULT_PROMPT_LOOKUP_TOKENS}",
    "confadapt:0.99",
    "confadapt:0.95",
    "confadapt:0.9",
    "confadapt:0.8",
    "static:2",
    "static:3",
)
DEFAULT_BATCH_SIZES = (1, 8)
LOOKUP_SKIP_REASON = "not run: transformers supports prompt lookup decoding at batch size 1 only"


@dataclass(frozen=True)
class Method:
    """One decoding method: how `evaluation.generate_ids` is called, and how the method is named in reports."""

    spec: str
    """Canonical spec, such as "confadapt:0.9", which `parse_method` reads back."""
    label: str
    """Name in tables and plots, such as "ConfAdapt 0.9"."""
    decoding: str
    """"stock" (the base model's own `generate`, adapter disabled) or "masktok"."""
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    max_batch_size: int | None = None
    """Largest batch size the method supports, or None when there is no limit."""
    limit_reason: str | None = None
    """Reason reported for the batch sizes above `max_batch_size`, which the method skips."""

    @property
    def per_adapter(self) -> bool:
        """Whether the method uses the adapter, and so runs once for every adapter."""
        return self.decoding == "masktok"


def _parse_number(spec: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise MaskTokError(f"Invalid method {spec!r}: {value!r} is not {expected}.") from None


def parse_method(spec: str, max_k: int | None = None) -> Method:
    """Parse a method spec such as "stock", "lookup:10", "confadapt:0.9", "static:2" or a policy name.

    `max_k` sets the mask slots of every masktok method except `static:K`, which sets its own.
    None keeps the adapter's `max_k`. Raises MaskTokError for an unknown name or an invalid value.
    """
    name, _, value = spec.strip().partition(":")
    if name == STOCK:
        if value:
            raise MaskTokError(f"Invalid method {spec!r}: stock takes no value. Use 'stock'.")
        return Method(STOCK, "stock greedy", "stock")
    if name == "lookup":
        tokens = _parse_number(spec, value, int) if value else DEFAULT_PROMPT_LOOKUP_TOKENS
        if tokens < 1:
            raise MaskTokError(f"Invalid method {spec!r}: prompt lookup needs at least 1 token, as in 'lookup:10'.")
        return Method(
            f"lookup:{tokens}",
            f"prompt lookup {tokens}",
            "stock",
            {"prompt_lookup_num_tokens": tokens},
            max_batch_size=1,
            limit_reason=LOOKUP_SKIP_REASON,
        )
    if name not in POLICIES:
        choices = sorted({STOCK, "lookup", *POLICIES})
        raise MaskTokError(f"Unknown method {spec!r}. Use one of {choices}, for example 'confadapt:0.9'.")

    kwargs: dict[str, Any] = {"masktok_policy": name}
    if max_k is not None:
        kwargs["masktok_max_k"] = max_k
    if name == "confadapt":
        if not value:
            return Method("confadapt", "ConfAdapt", "masktok", kwargs)
        threshold = validate_threshold(_parse_number(spec, value, float))
        kwargs["masktok_threshold"] = threshold
        return Method(f"confadapt:{threshold:g}", f"ConfAdapt {threshold:g}", "masktok", kwargs)
    if name == "static":
        if not value:
            return Method("static", "static", "masktok", kwargs)
        k = _parse_number(spec, value, int)
        if k < 1:
            raise MaskTokError(f"Invalid method {spec!r}: static k must be at least 1, as in 'static:2'.")
        kwargs["masktok_max_k"] = k
        return Method(f"static:{k}", f"static k={k}", "masktok", kwargs)
    if value:
        raise MaskTokError(f"Invalid method {spec!r}: the {name!r} policy takes no value. Use {name!r}.")
    return Method(name, name, "masktok", kwargs)


@dataclass
class BenchmarkSettings:
    """Settings of one benchmark run: the methods, batch sizes and generation length."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    max_new_tokens: int = 256
    max_k: int | None = None
    """Mask slots of the masktok methods other than static:K, or None to keep each adapter's max_k."""
    warmup_tokens: int = 4
    """New tokens of the untimed call that each method makes at each batch size before timing starts."""
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.batch_sizes or any(
            isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in self.batch_sizes
        ):
            raise MaskTokError(f"batch_sizes must be positive integers, got {self.batch_sizes!r}, for example (1, 8).")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise MaskTokError(f"batch_sizes contains duplicates: {self.batch_sizes!r}.")
        if self.max_new_tokens < 1:
            raise MaskTokError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.warmup_tokens < 1:
            raise MaskTokError(f"warmup_tokens must be at least 1, got {self.warmup_tokens}.")
        specs = [method.spec for method in self.parsed_methods()]
        if STOCK not in specs:
            raise MaskTokError(
                f"methods {self.methods!r} leave out 'stock', the reference for speed-ups and fidelity. Add 'stock'."
            )
        if len(set(specs)) != len(specs):
            raise MaskTokError(f"methods {self.methods!r} name the same method twice.")

    def parsed_methods(self) -> list[Method]:
        return [parse_method(spec, self.max_k) for spec in self.methods]


@dataclass
class Measurement:
    """Everything measured for one method, with one adapter (None for stock methods), at one batch size."""

    adapter: str | None
    method: Method
    batch_size: int
    skipped: str | None = None
    new_ids: dict[int, list[int]] = field(default_factory=dict)
    """Prompt index -> new token ids, up to and including the first EOS token."""
    row_passes: dict[int, int] = field(default_factory=dict)
    batch_seconds: list[float] = field(default_factory=list)
    batch_tokens: list[int] = field(default_factory=list)
    forward_passes: int = 0
    histogram: Counter = field(default_factory=Counter)

    def record(self, indices: list[int], batch: GeneratedBatch) -> None:
        for index, ids, passes in zip(indices, batch.new_ids, batch.row_passes, strict=True):
            self.new_ids[index] = ids
            self.row_passes[index] = passes
        self.batch_seconds.append(batch.seconds)
        self.batch_tokens.append(sum(len(ids) for ids in batch.new_ids))
        self.forward_passes += batch.forward_passes
        if batch.masktok_stats is not None:
            self.histogram.update(batch.masktok_stats["accepted_histogram"])


@dataclass
class BenchmarkResult:
    """A benchmark run: its settings and environment, one summary row per measurement, and every output."""

    metadata: dict[str, Any]
    rows: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def continuation_nll(model: torch.nn.Module, prompt_ids: list[int], continuation_ids: list[int]) -> float:
    """Return the summed negative log-likelihood, in nats, of `continuation_ids` following `prompt_ids`."""
    if not continuation_ids:
        return 0.0
    ids = torch.tensor([prompt_ids + continuation_ids], device=model.device)
    count = len(continuation_ids)
    # Only the logits that predict the continuation are needed: the last prompt position onwards.
    extra = {"logits_to_keep": count + 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0, -(count + 1) : -1].float()
    targets = torch.tensor(continuation_ids, device=logits.device)
    return F.cross_entropy(logits, targets, reduction="sum").item()


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _measure(
    models: dict[str, Any],
    tokenizer,
    prompts: list[str],
    settings: BenchmarkSettings,
    progress: bool,
) -> list[Measurement]:
    """Generate with every method on every batch, alternating the methods within each batch."""
    reference_model = next(iter(models.values()))
    runs: list[tuple[str | None, Method]] = []
    for method in settings.parsed_methods():
        labels = list(models) if method.per_adapter else [None]
        runs.extend((label, method) for label in labels)

    plan = []
    for batch_size in settings.batch_sizes:
        batches = [
            list(range(start, min(start + batch_size, len(prompts)))) for start in range(0, len(prompts), batch_size)
        ]
        measurements = [Measurement(label, method, batch_size) for label, method in runs]
        for measurement in measurements:
            limit = measurement.method.max_batch_size
            if limit is not None and batch_size > limit:
                measurement.skipped = measurement.method.limit_reason or f"not run: batch size above {limit}"
        plan.append((batches, measurements))
    total = sum(len(batches) * sum(not m.skipped for m in measurements) for batches, measurements in plan)

    def generate(measurement: Measurement, indices: list[int], max_new_tokens: int) -> GeneratedBatch:
        model = models[measurement.adapter] if measurement.adapter is not None else reference_model
        method = measurement.method
        batch_prompts = [prompts[index] for index in indices]
        return generate_ids(model, tokenizer, batch_prompts, method.decoding, max_new_tokens, method.generate_kwargs)

    with tqdm(total=total, desc="bench", unit="call", disable=not progress) as bar:
        for batches, measurements in plan:
            batch_size = measurements[0].batch_size
            bar.set_postfix(batch_size=batch_size)
            # The untimed first call of each method pays one-off costs (allocations, lazy initialisation).
            # It also checks the method's settings against each adapter: a combination that decoding
            # rejects (such as verify with an ungated adapter) is reported as not run.
            for measurement in measurements:
                if measurement.skipped:
                    continue
                try:
                    generate(measurement, batches[0], settings.warmup_tokens)
                except MaskTokError as error:
                    logger.warning(
                        "Skipping %s with adapter %s: %s", measurement.method.spec, measurement.adapter, error
                    )
                    measurement.skipped = f"not run: {error}"
                    bar.total -= len(batches)
                    bar.refresh()
            active = [measurement for measurement in measurements if not measurement.skipped]
            logger.info("Batch size %d: %d batches, %d methods each.", batch_size, len(batches), len(active))
            for number, indices in enumerate(batches):
                for measurement in _rotated(active, number):
                    measurement.record(indices, generate(measurement, indices, settings.max_new_tokens))
                    bar.update()
    return [measurement for _, measurements in plan for measurement in measurements]


def _score(model, tokenizer, prompts: list[str], measurements: list[Measurement], progress: bool) -> dict:
    """Score every distinct output with the base model, adapter disabled.

    Returns the summed NLL of each output, keyed by (prompt index, tuple of new token ids).
    """
    distinct = {(index, tuple(ids)) for measurement in measurements for index, ids in measurement.new_ids.items()}
    prompt_ids = {}
    scores = {}
    base = model.get_base_model()
    with model.disable_adapter():
        for index, ids in tqdm(sorted(distinct), desc="scoring", unit="output", disable=not progress):
            if index not in prompt_ids:
                prompt_ids[index] = tokenizer(prompts[index], add_special_tokens=False)["input_ids"]
            scores[(index, ids)] = continuation_nll(base, prompt_ids[index], list(ids))
    return scores


def run_benchmark(
    models: dict[str, Any],
    tokenizer,
    rows: list[dict[str, str]],
    settings: BenchmarkSettings | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """Answer GSM8K rows (`question`, `answer`) with every method and measure speed and fidelity.

    `models` maps an adapter label (such as "gated") to a PEFT model carrying that masktok adapter.
    All of them must share one base model and `tokenizer`, because the stock methods run once, on
    the first model with its adapter disabled, and are the reference for every adapter's methods.
    """
    settings = settings or BenchmarkSettings()
    if not models:
        raise MaskTokError("run_benchmark needs at least one model with a masktok adapter.")
    if not rows:
        raise MaskTokError("run_benchmark needs at least one GSM8K row, but the data contains none.")
    started = time.time()
    tokenizer.padding_side = "left"
    prompts = build_prompts(tokenizer, [row["question"] for row in rows], settings.use_chat_template)
    reference_model = next(iter(models.values()))

    measurements = _measure(models, tokenizer, prompts, settings, progress)
    scores = _score(reference_model, tokenizer, prompts, measurements, progress)
    summaries, outputs = summarize(measurements, rows, tokenizer, scores)

    base = reference_model.get_base_model()
    metadata = {
        "model": base.name_or_path,
        "adapters": {label: adapter_description(model) for label, model in models.items()},
        "questions": len(rows),
        "max_new_tokens": settings.max_new_tokens,
        "batch_sizes": list(settings.batch_sizes),
        "methods": [method.spec for method in settings.parsed_methods()],
        "max_k": settings.max_k,
        "dtype": str(base.dtype).removeprefix("torch."),
        "machine": machine_description(base.device),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started,
    }
    return BenchmarkResult(metadata, summaries, outputs)
