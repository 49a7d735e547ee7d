"""The propose step: turn one pass's k logit vectors per row into k proposed tokens and their confidence.

Each position's logits go through the generation's logits processors as if the proposals before
it had already been generated, so the distribution at position j is the one ordinary decoding
would compute after accepting proposals 0..j-1. Each token is then the argmax (greedy) or a sample
(`do_sample=True`) of that processed distribution, and its confidence is its probability under it.
"""

from __future__ import annotations

import copy

import torch
from transformers import LogitsProcessorList
from transformers.generation import logits_process

from .policies import Proposals

# Processors whose output does not depend on the tokens generated so far, so all positions of all
# rows can be processed in one call. Names missing from an installed transformers are skipped.
_CONTEXT_FREE_PROCESSOR_NAMES = (
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "TopHLogitsWarper",
    "MinPLogitsWarper",
    "TypicalLogitsWarper",
    "EpsilonLogitsWarper",
    "EtaLogitsWarper",
    "SuppressTokensLogitsProcessor",
    "InfNanRemoveLogitsProcessor",
    "LogitNormalization",
)
CONTEXT_FREE_PROCESSORS = tuple(
    getattr(logits_process, name) for name in _CONTEXT_FREE_PROCESSOR_NAMES if hasattr(logits_process, name)
)


def is_context_free(logits_processor: LogitsProcessorList) -> bool:
    """Return True when no processor in the list reads the tokens generated so far."""
    return all(type(processor) in CONTEXT_FREE_PROCESSORS for processor in logits_processor)


def processors_for_row(logits_processor: LogitsProcessorList, row: int) -> LogitsProcessorList:
    """Return the processors to call with a one-row input of batch row `row`.

    The repetition penalty of stock `generate` keeps one padding length per batch row, so a copy
    with that row's length is used. Other processors are used as they are. A processor with other
    per-row state would therefore read row 0's state, which is why the known ones are rejected for
    batches before decoding starts.
    """
    row_processors = LogitsProcessorList()
    for processor in logits_processor:
        ignore_length = getattr(processor, "prompt_ignore_length", None)
        if isinstance(processor, logits_process.RepetitionPenaltyLogitsProcessor) and torch.is_tensor(ignore_length):
            processor = copy.copy(processor)
            processor.prompt_ignore_length = int(ignore_length[row])
        row_processors.append(processor)
    return row_processors


def suppress_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """Set the logit of `token_id` to -inf in place, when the vocabulary has one for it, and return `logits`."""
    if token_id < logits.shape[-1]:
        logits[..., token_id] = float("-inf")
    return logits


def choose_tokens(scores: torch.Tensor, do_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row of `scores` [n, vocab] and return (tokens [n], confidence [n])."""
    probabilities = torch.softmax(scores.float(), dim=-1)  # [n, vocab]
    if do_sample:
        tokens = torch.multinomial(probabilities, num_samples=1).squeeze(1)
    else:
        tokens = torch.argmax(scores, dim=-1)
    confidence = probabilities.gather(1, tokens[:, None]).squeeze(1)
    return tokens, confidence


def process_scores(
    logits: torch.Tensor, context: torch.Tensor, row_processors: LogitsProcessorList, tokens: list[int]
) -> torch.Tensor:
    """Process one row's `logits` [n, vocab] as if `tokens` followed `context`, and return the scores [n, vocab].

    Position i is processed with `context` plus `tokens[:i]` as its input ids, which is what ordinary
    decoding would see after generating those tokens. `row_processors` comes from `processors_for_row`.
    """
    if not row_processors:
        return logits
    if is_context_free(row_processors):
        placeholder_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long, device=logits.device)
        return row_processors(placeholder_ids, logits)
    token_tensor = torch.tensor(tokens, dtype=context.dtype, device=context.device)
    rows = []
    for position in range(logits.shape[0]):
        row_ids = torch.cat([context, token_tensor[:position]])[None, :]  # [1, context + position]
        rows.append(row_processors(row_ids, logits[position][None, :].clone()))
    return torch.cat(rows, dim=0)


def propose(
    logits: torch.Tensor,
    contexts: list[torch.Tensor],
    logits_processor: LogitsProcessorList,
    do_sample: bool,
    batch_rows: list[int] | None = None,
) -> Proposals:
    """Process `logits` [rows, k, vocab] and choose the k proposals of each row.

    `contexts[i]` is row i's sequence so far (the padded prompt, then its accepted tokens), a 1D
    tensor, and `batch_rows[i]` its index in the generation's batch (default: i). A processor that
    reads the context, such as the one behind `min_new_tokens`, is called once per row and position
    with that row's sequence plus the proposals before the position.
    """
    batch, k, vocab = logits.shape
    if is_context_free(logits_processor):
        flat_logits = logits.reshape(batch * k, vocab)
        # The processors in this branch ignore their input ids, so one placeholder column per row is enough.
        placeholder_ids = torch.zeros((batch * k, 1), dtype=torch.long, device=logits.device)
        scores = logits_processor(placeholder_ids, flat_logits) if logits_processor else flat_logits
        tokens, confidence = choose_tokens(scores, do_sample)
        return Proposals(tokens=tokens.view(batch, k), confidence=confidence.view(batch, k))

    tokens = torch.empty((batch, k), dtype=torch.long, device=logits.device)
    confidence = torch.empty((batch, k), dtype=torch.float32, device=logits.device)
    batch_rows = batch_rows if batch_rows is not None else list(range(batch))
    for row in range(batch):
        row_processors = processors_for_row(logits_processor, batch_rows[row])
        for position in range(k):
            row_ids = torch.cat([contexts[row], tokens[row, :position]])[None, :]  # [1, context + position]
            scores = row_processors(row_ids, logits[row, position][None, :])  # [1, vocab]
            token, token_confidence = choose_tokens(scores, do_sample)
            tokens[row, position] = token[0]
            confidence[row, position] = token_confidence[0]
    return Proposals(tokens=tokens, confidence=confidence)
