"""Adaptive pass width: how many proposals (the last real token plus mask slots) a row gets per pass.

Mask slots cost compute whether or not their proposals are kept. On the 2-core CPU measured in
`docs/benchmarks.md`, a SmolLM2-135M pass of 2 tokens costs about 2x a one-token pass, and one of
8 tokens about 2.4x. So each row's k follows its recent acceptance, in
the spirit of the "heuristic" draft-length schedule of transformers' assisted generation
(`AssistedCandidateGenerator.update_candidate_strategy`, transformers 5.25), which adds 2 draft
tokens after a fully accepted draft and removes 1 otherwise. Here:

- all offered proposals kept: k grows to what was offered plus 2, up to `max_k`;
- some rejected: k drops to one more than was kept, and by at least 1, down to `min_k`;
- at k = 1 there are no proposals to judge, so a row probes with k = 2 after a wait of at least
  `probe_wait` passes, on the first pass whose number (counted from the row's first pass) is a
  multiple of `probe_wait`. The wait starts at `INITIAL_PROBE_WAIT`, doubles after each probe up
  to `MAX_PROBE_WAIT`, and resets after any fully accepted pass.

When proposals are rarely right, a row therefore spends almost all its passes at k = 1, which costs
what ordinary decoding costs. The probe waits are powers of two and all rows of a batch count
passes from the same first pass, so the probes of rows at k = 1 fall on the same passes: a batch
of 8 such rows pays for about as many wide passes as one row does. The schedule depends only on the
row's own passes and proposals, so a row's k, and so its output, is the same in a batch as alone.
"""

from __future__ import annotations

INITIAL_PROBE_WAIT = 8
MAX_PROBE_WAIT = 128


class ProposalCount:
    """One row's k, the number of proposals per pass, between `min_k` and `max_k`.

    With `adaptive=False`, k is always `max_k`. `next_k` is called once per pass the row takes
    part in, and `record` once per set of proposals that has been judged.
    """

    def __init__(self, max_k: int, min_k: int = 1, adaptive: bool = True) -> None:
        self.max_k = max_k
        self.min_k = min(min_k, max_k)
        self.adaptive = adaptive
        self.k = max_k
        self.probe_wait = INITIAL_PROBE_WAIT
        self.passes = 0  # passes the row has taken part in, counting the one being planned
        self.next_probe = 0  # number of the pass on which a row at k = 1 probes next

    def next_k(self) -> int:
        """Return k for the row's next pass: 2 when a row at k = 1 probes on this pass, else its k."""
        self.passes += 1
        if not self.adaptive or self.k > 1 or self.max_k == 1:
            return self.k
        if self.passes < self.next_probe:
            return 1
        self.probe_wait = min(2 * self.probe_wait, MAX_PROBE_WAIT)
        self.next_probe = _next_multiple(self.passes + 1, self.probe_wait)
        return 2

    def record(self, offered: int, kept: int) -> None:
        """Update k after `kept` of `offered` proposals were kept; one proposal alone carries no evidence."""
        if not self.adaptive or offered <= 1:
            return
        if kept >= offered:
            self.k = min(self.max_k, offered + 2)
            self.probe_wait = INITIAL_PROBE_WAIT
            return
        was_probing = self.k == 1
        self.k = max(self.min_k, min(offered - 1, kept + 1))
        if self.k == 1 and not was_probing:
            # A full wait at k = 1 before the first probe, which then falls on a multiple of the wait.
            self.next_probe = _next_multiple(self.passes + self.probe_wait, self.probe_wait)


def _next_multiple(number: int, step: int) -> int:
    """Return the smallest multiple of `step` that is >= `number`."""
    return -(-number // step) * step
