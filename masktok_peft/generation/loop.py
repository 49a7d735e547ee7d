"""The masktok decoding loop for a batch of left-padded prompts: prefill, propose, accept, crop, commit.

One pass feeds each decoding row the tokens it accepted in the previous pass (real tokens) followed
by k - 1 mask tokens at the next positions. Its k last logits are the k proposals: the last real
token predicts the next token and mask slot j the token j places after it. The policy keeps a
leading run of n' of them per row, the mask slots' KV entries are dropped, and the n' tokens are
fed as real tokens in the row's next pass. Prefill is the prompt plus k - 1 masks.

Each row's k follows its recent acceptance (see `adaptive.py`). A pass has as many mask slots as
the row that requests the most, and a row reads only its own first k proposals, which the later
mask slots cannot change under causal attention.

Verify policy. The kept proposals after the first are a draft: the row's next pass feeds its
pending token, then the draft as real tokens, then fresh mask slots. With a gated adapter the
real tokens' logits are the base model's, so they check the draft (`VerifyPolicy.verify`). The
verified prefix stays in the cache, the rejected draft tokens are rolled back, and the row's next
token is the base model's own. The fresh mask slots' proposals become the next draft only when
the whole draft was accepted, because they were conditioned on it.

Cache layout. All rows share one cache length. A pass appends the same number of columns to every
row: its pending real tokens and draft, right-aligned after filler columns, then the k - 1 mask
slots. The mask slots are the last k - 1 columns of every row, so one `DynamicCache.crop` (a
slice, no copy) drops them all, together with the rejected draft tokens that every row has in
its last columns. The filler columns, and rejected draft tokens of rows that rejected fewer than
others, stay in the cache as holes that the 2D attention mask hides from every later query. Each
row's position ids are passed explicitly, so holes shift no position. A row's queries therefore
attend to the same keys, at the same positions, as when the row is decoded alone.

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

from .adaptive import ProposalCount
from .policies import AcceptancePolicy, VerifyPolicy
from .proposals import process_scores, processors_for_row, propose, suppress_token
from .stats import DecodingStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodingSettings:
    """The masktok settings of one generation."""

    policy: AcceptancePolicy
    max_k: int
    mask_token_id: int
    adaptive: bool = False
    min_k: int = 1

    def describe(self) -> dict[str, object]:
        described = {**self.policy.describe(), "max_k": self.max_k, "adaptive": self.adaptive}
        if self.adaptive:
            described["min_k"] = self.min_k
        return described

    def proposal_count(self) -> ProposalCount:
        """Return a fresh per-row controller of k for these settings."""
        max_k = self.policy.proposals_per_pass(self.max_k)
        return ProposalCount(max_k=max_k, min_k=self.min_k, adaptive=self.adaptive)


@dataclass
class _Row:
    """Decoding state of one batch row."""

    context: torch.Tensor  # [prompt_length + accepted]: the padded prompt, then every accepted token
    next_position: int  # position id of the first pending token
    count: ProposalCount  # the row's k
    pending: list[int] = field(default_factory=list)  # accepted but not yet in the cache, fed in the row's next pass
    draft: list[int] = field(default_factory=list)  # verify only: unverified proposals, fed after `pending`
    pass_k: int = 1  # k of the current pass, at most the budget allows
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
        self.stats = DecodingStats(batch_size, settings.describe(), verifies=settings.policy.verifies)
        self.rows: list[_Row] = []
        self.cache_mask: torch.Tensor | None = None  # [batch, cache_length]: 1 for real tokens, 0 for holes
        self.cache_argument = _cache_argument_name(model)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def plan_pass(self, rows: list[int]) -> int:
        """Set each row's k for the next pass, cut to its remaining budget, and return the pass's mask slots."""
        for row in rows:
            state = self.rows[row]
            # A pass yields at most the draft plus one token, and its mask slots propose the tokens after those.
            remaining = self.budget - state.accepted - len(state.draft)
            state.pass_k = max(1, min(state.count.next_k(), remaining))
        return max(self.rows[row].pass_k for row in rows) - 1

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, num_logits: int
    ) -> torch.Tensor:
        """Run one pass and return its last `num_logits` logits [batch, num_logits, vocab], mask id suppressed."""
        # Stock `generate` passes no mask when there is no padding; doing the same keeps k = 1 decoding identical.
        mask = None if bool(attention_mask.all()) else attention_mask
        extra = {"logits_to_keep": num_logits} if self.keeps_logits else {}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{self.cache_argument: self.cache},
            **extra,
        )
        logits = outputs.logits[:, -num_logits:, :].to(dtype=torch.float32, copy=True)  # [batch, num_logits, vocab]
        return suppress_token(logits, self.settings.mask_token_id)

    def prefill(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Run the prompt plus k - 1 masks and accept the first proposals of every row."""
        batch, _ = input_ids.shape
        self.rows = [
            _Row(
                context=input_ids[row],
                next_position=int(position_ids[row, -1]) + 1,
                count=self.settings.proposal_count(),
            )
            for row in range(batch)
        ]
        rows = list(range(batch))
        num_masks = self.plan_pass(rows)

        next_positions = torch.tensor([row.next_position for row in self.rows], device=input_ids.device)
        mask_positions = next_positions[:, None] + torch.arange(num_masks, device=input_ids.device)  # [batch, masks]
        masks = torch.full(
            (batch, num_masks), self.settings.mask_token_id, dtype=input_ids.dtype, device=input_ids.device
        )
        logits = self.forward(
            torch.cat([input_ids, masks], dim=1),
            torch.cat([prompt_mask, torch.ones_like(masks)], dim=1),
            torch.cat([position_ids, mask_positions], dim=1),
            num_masks + 1,
        )
        if num_masks:
            self.cache.crop(-num_masks)
        self.cache_mask = prompt_mask
        self.accept(rows, logits, draft_width=0, num_masks=num_masks)

    def step(self, active: list[int]) -> None:
        """Feed each active row its pending tokens, its draft and k - 1 masks; accept, and roll back rejected drafts."""
        batch = len(self.rows)
        device = self.cache_mask.device
        num_masks = self.plan_pass(active)
        draft_width = max(len(self.rows[row].draft) for row in active)
        real_width = max(len(self.rows[row].pending) + len(self.rows[row].draft) for row in active)
        width = real_width + num_masks

        # Rows not in `active` get filler only. Active rows: filler, then pending tokens and draft, then masks.
        # NOTE: finished rows still go through the model as filler. Dropping them from the cache with
        # `batch_select_indices` would save that compute in batches whose rows end at different times.
        input_ids = torch.full((batch, width), self.filler_id, dtype=torch.long)
        step_mask = torch.zeros((batch, width), dtype=self.cache_mask.dtype)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        for row in active:
            state = self.rows[row]
            real_tokens = state.pending + state.draft
            start = real_width - len(real_tokens)
            input_ids[row, start:real_width] = torch.tensor(real_tokens, dtype=torch.long)
            input_ids[row, real_width:] = self.settings.mask_token_id
            step_mask[row, start:] = 1
            position_ids[row, start:] = state.next_position + torch.arange(width - start)
            state.next_position += len(state.pending)
        input_ids, step_mask, position_ids = input_ids.to(device), step_mask.to(device), position_ids.to(device)

        # Row i's last real token is column real_width - 1, so the kept logits start draft_width columns before it.
        logits = self.forward(
            input_ids, torch.cat([self.cache_mask, step_mask], dim=1), position_ids, num_masks + 1 + draft_width
        )
        rejected = self.accept(active, logits[active], draft_width=draft_width, num_masks=num_masks)
        self.roll_back(step_mask[:, :real_width], num_masks, rejected)

    def roll_back(self, real_mask: torch.Tensor, num_masks: int, rejected: dict[int, int]) -> None:
        """Drop the mask slots and rejected draft tokens from the cache, and extend the cache mask.

        `real_mask` [batch, real_width] is the attention mask of the pass's real columns, and
        `rejected[row]` the number of rejected draft tokens in the last real columns of that row.
        Columns that every row rejected are cropped, and the others become holes.
        """
        real_width = real_mask.shape[1]
        cropped = min(rejected.values())
        if num_masks + cropped:
            self.cache.crop(-(num_masks + cropped))
        kept_mask = real_mask[:, : real_width - cropped].clone()
        for row, count in rejected.items():
            if count > cropped:
                kept_mask[row, real_width - count : real_width - cropped] = 0
        self.cache_mask = torch.cat([self.cache_mask, kept_mask], dim=1)

    def accept(self, active: list[int], logits: torch.Tensor, draft_width: int, num_masks: int) -> dict[int, int]:
        """Accept tokens for the `active` rows from the pass's kept logits [len(active), positions, vocab].

        The positions are the last `draft_width` real tokens, the last real token and the mask slots.
        Returns the number of rejected draft tokens per row, which are the last real tokens of the row.
        """
        if self.settings.policy.verifies:
            accepted, rejected = self.accept_verified(active, logits, draft_width)
        else:
            accepted = self.accept_proposals(active, logits)
            rejected = dict.fromkeys(active, 0)
        self.stats.record_pass(accepted, num_masks)
        logger.debug(
            "masktok pass %d: %d mask slots, accepted per row %s", self.stats.forward_passes, num_masks, accepted
        )
        return rejected

    def accept_proposals(self, active: list[int], logits: torch.Tensor) -> dict[int, int]:
        """Choose proposals from `logits` [len(active), k, vocab] and keep each row's leading run of its own k."""
        contexts = [self.rows[row].context for row in active]
        proposals = propose(logits, contexts, self.logits_processor, self.do_sample, batch_rows=active)
        counts = self.settings.policy.accept(proposals).tolist()
        tokens = proposals.tokens.tolist()

        accepted: dict[int, int] = {}
        for index, row in enumerate(active):
            state = self.rows[row]
            # Proposals past the row's own k come from mask slots that only other rows asked for.
            count = min(counts[index], state.pass_k)
            state.count.record(offered=state.pass_k, kept=count)
            accepted[row] = self.keep(row, tokens[index][:count], in_cache=0)
        return accepted

    def accept_verified(
        self, active: list[int], logits: torch.Tensor, draft_width: int
    ) -> tuple[dict[int, int], dict[int, int]]:
        """Verify each row's draft, choose its next token and, after a fully accepted draft, its next draft.

        Returns (accepted tokens per row, rejected draft tokens per row).
        """
        accepted: dict[int, int] = {}
        rejected: dict[int, int] = {}
        for index, row in enumerate(active):
            state = self.rows[row]
            draft = state.draft
            processors = processors_for_row(self.logits_processor, row)
            # [len(draft) + 1, vocab]: the base model's logits for each draft position and the token after the draft.
            targets = logits[index, draft_width - len(draft) : draft_width + 1]
            scores = process_scores(targets, state.context, processors, draft)
            draft_tensor = torch.tensor(draft, dtype=torch.long, device=scores.device)
            num_verified, next_token = VerifyPolicy.verify(scores, draft_tensor, self.do_sample)
            state.count.record(offered=len(draft) + 1, kept=num_verified + 1)
            self.stats.record_verification(row, proposed=len(draft), accepted=num_verified)
            tokens = draft[:num_verified] + [next_token]

            next_draft: list[int] = []
            if num_verified == len(draft) and state.pass_k > 1:
                # The mask slots were conditioned on the whole draft, so their proposals are valid only now.
                mask_logits = logits[index, draft_width + 1 : draft_width + state.pass_k][None]
                context = torch.cat(
                    [state.context, torch.tensor(tokens, dtype=state.context.dtype, device=state.context.device)]
                )
                next_draft = (
                    propose(mask_logits, [context], self.logits_processor, do_sample=False, batch_rows=[row])
                    .tokens[0]
                    .tolist()
                )

            state.next_position += num_verified
            accepted[row] = self.keep(row, tokens, in_cache=num_verified)
            # The next pass yields at most its draft plus one token, so the draft leaves one token of the budget.
            remaining = self.budget - state.accepted
            state.draft = next_draft[: max(0, remaining - 1)] if state.decoding else []
            rejected[row] = len(draft) - num_verified
        return accepted, rejected

    def keep(self, row: int, tokens: list[int], in_cache: int) -> int:
        """Add `tokens` to a row's output up to its budget and end, and return how many were kept.

        The first `in_cache` of them already have their cache entries; the rest become pending.
        """
        state = self.rows[row]
        tokens = tokens[: self.budget - state.accepted]
        end = self.find_row_end(state.context, tokens)
        if end is not None:
            tokens = tokens[: end + 1]
            state.decoding = False
        state.context = torch.cat(
            [state.context, torch.tensor(tokens, dtype=state.context.dtype, device=state.context.device)]
        )
        state.pending = tokens[in_cache:]
        state.uncommitted.extend(tokens)
        state.accepted += len(tokens)
        if state.accepted >= self.budget:
            state.decoding = False
        return len(tokens)

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
