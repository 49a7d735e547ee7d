"""The masktok decoding loop for a batch of left-padded prompts: prefill, propose, accept, crop, commit.

One pass feeds each decoding row the tokens it accepted in the previous pass (real tokens) followed
by k - 1 mask tokens at the next positions. Its k last logits are the k proposals: the last real
token predicts the next token and mask slot j the token j places after it. The policy keeps a
leading run of n' of them per row, the mask slots' KV entries are dropped, and the n' tokens are
fed as real tokens in the row's next pass. Prefill is the prompt plus k - 1 masks.

Cache layout. All rows share one cache length. A pass appends the same number of columns to every
row: its pending real tokens, right-aligned after filler columns, then the k - 1 mask slots. The
mask slots are the last k - 1 columns of every row, so one `DynamicCache.crop` (a slice, no copy)
drops them all. The filler columns stay in the cache as holes that the 2D attention mask hides
from every later query, and each row's position ids are passed explicitly, so holes shift no
position. A row's queries therefore attend to the same keys, at the same positions, as when the
row is decoded alone.

Commit. The output is built one column at a time, as stock `generate` builds it: a column is added
once every unfinished row has an accepted token for it, and the stopping criteria then run on the
whole batch. So an EOS token or stop string inside an accepted block ends the row at that token,
and `max_length`, `min_new_tokens` and custom criteria see the lengths they see in stock decoding.
A row that runs ahead keeps its extra accepted tokens until the others catch up. EOS and stop
strings are also checked per row right after acceptance, so a row stops decoding as soon as it
ends and does not spend passes past its end.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import Cache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from .policies import AcceptancePolicy
from .proposals import propose, suppress_token
from .stats import DecodingStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodingSettings:
    """The masktok settings of one generation."""

    policy: AcceptancePolicy
    max_k: int
    mask_token_id: int

    def describe(self) -> dict[str, object]:
        return {**self.policy.describe(), "max_k": self.max_k}


@dataclass
class _Row:
    """Decoding state of one batch row."""

    context: torch.Tensor  # [prompt_length + accepted]: the padded prompt, then every accepted token
    next_position: int  # position id of the first pending token
    pending: list[int] = field(default_factory=list)  # accepted in the latest pass, fed in the row's next pass
    uncommitted: deque = field(default_factory=deque)  # accepted tokens not yet written to the output
    accepted: int = 0  # accepted tokens, committed or not
    committed: int = 0  # output columns written while the row was unfinished
    decoding: bool = True  # False once the row has ended or used its token budget


class _Decoder:
    """One generation's state: the model, cache, per-row state, output so far and statistics."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: Cache,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        settings: DecodingSettings,
        streamer: BaseStreamer | None,
        batch_size: int,
        budget: int,
    ) -> None:
        self.model = model
        self.cache = cache
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        # EOS and stop strings read one row at a time, so they can be checked for a row right after acceptance.
        self.row_criteria = StoppingCriteriaList(
            criterion
            for criterion in stopping_criteria
            if isinstance(criterion, (EosTokenCriteria, StopStringCriteria))
        )
        self.do_sample = bool(generation_config.do_sample)
        pad = generation_config._pad_token_tensor
        self.pad_token_id = int(pad) if pad is not None else None
        self.filler_id = self.pad_token_id if self.pad_token_id is not None else 0
        self.settings = settings
        self.streamer = streamer
        self.budget = budget
        self.stats = DecodingStats(batch_size, settings.describe())
        self.rows: list[_Row] = []
        self.cache_mask: torch.Tensor | None = None  # [batch, cache_length]: 1 for real tokens, 0 for holes
        self.cache_argument = _cache_argument_name(model)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def proposals_per_pass(self, rows: list[int]) -> int:
        """Return k for the next pass: the policy's width, cut to the largest remaining budget of `rows`."""
        remaining = max(self.budget - self.rows[row].accepted for row in rows)
        return min(self.settings.policy.proposals_per_pass(self.settings.max_k), remaining)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, num_masks: int
    ) -> torch.Tensor:
        """Run one pass, drop the mask slots from the cache and return the last k logits [batch, k, vocab]."""
        k = num_masks + 1
        # Stock `generate` passes no mask when there is no padding; doing the same keeps k = 1 decoding identical.
        mask = None if bool(attention_mask.all()) else attention_mask
        extra = {"logits_to_keep": k} if self.keeps_logits else {}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{self.cache_argument: self.cache},
            **extra,
        )
        if num_masks:
            self.cache.crop(-num_masks)
        logits = outputs.logits[:, -k:, :].to(dtype=torch.float32, copy=True)  # [batch, k, vocab]
        return suppress_token(logits, self.settings.mask_token_id)

    def prefill(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Run the prompt plus k - 1 masks and accept the first proposals of every row."""
        batch, _ = input_ids.shape
        self.rows = [_Row(context=input_ids[row], next_position=int(position_ids[row, -1]) + 1) for row in range(batch)]
        num_masks = self.proposals_per_pass(list(range(batch))) - 1

        next_positions = torch.tensor([row.next_position for row in self.rows], device=input_ids.device)
        mask_positions = next_positions[:, None] + torch.arange(num_masks, device=input_ids.device)  # [batch, masks]
        masks = torch.full(
            (batch, num_masks), self.settings.mask_token_id, dtype=input_ids.dtype, device=input_ids.device
        )
        logits = self.forward(
            torch.cat([input_ids, masks], dim=1),
            torch.cat([prompt_mask, torch.ones_like(masks)], dim=1),
            torch.cat([position_ids, mask_positions], dim=1),
            num_masks,
        )
        self.cache_mask = prompt_mask
        self.accept(list(range(batch)), logits)

    def step(self, active: list[int]) -> None:
        """Feed each active row its pending tokens plus k - 1 masks, and accept the new proposals."""
        batch = len(self.rows)
        device = self.cache_mask.device
        num_masks = self.proposals_per_pass(active) - 1
        real_width = max(len(self.rows[row].pending) for row in active)
        width = real_width + num_masks

        # Rows not in `active` get filler only. Active rows: filler, then pending tokens, then masks.
        # NOTE: finished rows still go through the model as filler. Dropping them from the cache with
        # `batch_select_indices` would save that compute in batches whose rows end at different times.
        input_ids = torch.full((batch, width), self.filler_id, dtype=torch.long)
        step_mask = torch.zeros((batch, width), dtype=self.cache_mask.dtype)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        for row in active:
            state = self.rows[row]
            start = real_width - len(state.pending)
            input_ids[row, start:real_width] = torch.tensor(state.pending, dtype=torch.long)
            input_ids[row, real_width:] = self.settings.mask_token_id
            step_mask[row, start:] = 1
            position_ids[row, start:] = state.next_position + torch.arange(width - start)
            state.next_position += len(state.pending)
        input_ids, step_mask, position_ids = input_ids.to(device), step_mask.to(device), position_ids.to(device)

        logits = self.forward(input_ids, torch.cat([self.cache_mask, step_mask], dim=1), position_ids, num_masks)
        self.cache_mask = torch.cat([self.cache_mask, step_mask[:, :real_width]], dim=1)
        self.accept(active, logits[active])

    def accept(self, active: list[int], logits: torch.Tensor) -> None:
        """Choose proposals for the `active` rows from their logits [len(active), k, vocab] and keep a leading run."""
        contexts = [self.rows[row].context for row in active]
        proposals = propose(logits, contexts, self.logits_processor, self.do_sample, batch_rows=active)
        counts = self.settings.policy.accept(proposals).tolist()
        tokens = proposals.tokens.tolist()

        accepted: dict[int, int] = {}
        for index, row in enumerate(active):
            state = self.rows[row]
            accepted_tokens = tokens[index][: min(counts[index], self.budget - state.accepted)]
            end = self.find_row_end(state.context, accepted_tokens)
            if end is not None:
                accepted_tokens = accepted_tokens[: end + 1]
                state.decoding = False
            state.context = torch.cat(
                [state.context, torch.tensor(accepted_tokens, dtype=state.context.dtype, device=state.context.device)]
            )
            state.pending = accepted_tokens
            state.uncommitted.extend(accepted_tokens)
            state.accepted += len(accepted_tokens)
            if state.accepted >= self.budget:
                state.decoding = False
            accepted[row] = len(accepted_tokens)
        self.stats.record_pass(accepted)
        logger.debug("masktok pass %d: k=%d, accepted per row %s", self.stats.forward_passes, logits.shape[1], accepted)

    def find_row_end(self, context: torch.Tensor, accepted_tokens: list[int]) -> int | None:
        """Return the index of the first of `accepted_tokens` at which EOS or a stop string ends the row, or None."""
        if not self.row_criteria:
            return None
        for index in range(len(accepted_tokens)):
            row_ids = torch.cat(
                [context, torch.tensor(accepted_tokens[: index + 1], dtype=context.dtype, device=context.device)]
            )
            if bool(self.row_criteria(row_ids[None, :], None).any()):
                return index
        return None

    def commit(self, sequences: torch.Tensor, unfinished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append output columns while every unfinished row has an uncommitted token; run the stopping criteria."""
        while bool(unfinished.any()):
            if any(unfinished[row] and not state.uncommitted for row, state in enumerate(self.rows)):
                break
            column = torch.tensor(
                [
                    state.uncommitted.popleft() if unfinished[row] else self.pad_token_id
                    for row, state in enumerate(self.rows)
                ],
                dtype=sequences.dtype,
            )
            for row, state in enumerate(self.rows):
                state.committed += int(unfinished[row])
            sequences = torch.cat([sequences, column.to(sequences.device)[:, None]], dim=1)
            if self.streamer is not None:
                self.streamer.put(column)

            stopped = self.stopping_criteria(sequences, None).to(unfinished.device)  # [batch], or [1] for all rows
            unfinished = unfinished & ~stopped
            for row, state in enumerate(self.rows):
                if not unfinished[row]:
                    state.decoding = False
                    state.uncommitted.clear()
        return sequences, unfinished

    def rows_to_decode(self, unfinished: torch.Tensor) -> list[int]:
        """Return the unfinished rows that decode in the next pass, resuming any row the output waits for."""
        for row, state in enumerate(self.rows):
            if unfinished[row] and not state.decoding and not state.uncommitted:
                # The per-row check ended this row but the batch criteria did not; decode on, as stock would.
                if state.accepted >= self.budget:
                    raise RuntimeError(f"masktok decoding stalled: row {row} used its token budget without finishing.")
                state.decoding = True
        return [row for row, state in enumerate(self.rows) if unfinished[row] and state.decoding]


def decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Cache,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    settings: DecodingSettings,
    streamer: BaseStreamer | None = None,
) -> tuple[torch.Tensor, dict]:
    """Decode `input_ids` [batch, prompt_length] and return (prompt plus new tokens, statistics).

    `generation_config.max_length` must be set, as stock `generate` sets it. Finished rows are
    filled with the pad token until every row has finished or reached `max_length`.
    """
    batch, prompt_length = input_ids.shape
    budget = generation_config.max_length - prompt_length  # new tokens any row may add
    decoder = _Decoder(
        model, cache, logits_processor, stopping_criteria, generation_config, settings, streamer, batch, max(budget, 0)
    )
    if budget <= 0:
        return input_ids, decoder.stats.as_dict([0] * batch)

    prompt_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    if position_ids is None:
        # The rule stock `generate` uses: count real tokens from 0 and give padding position 0.
        position_ids = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
    position_ids = position_ids.expand(batch, -1)

    decoder.prefill(input_ids, prompt_mask, position_ids)
    sequences = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool)
    while True:
        sequences, unfinished = decoder.commit(sequences, unfinished)
        if not bool(unfinished.any()):
            break
        decoder.step(decoder.rows_to_decode(unfinished))

    return sequences, decoder.stats.as_dict([state.committed for state in decoder.rows])


def _cache_argument_name(model: torch.nn.Module) -> str:
    """Return the name of the cache argument of `model.forward`: `cache` in transformers 5.25, else the older one."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters or "past_key_values" not in parameters else "past_key_values"
