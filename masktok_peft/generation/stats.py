"""Statistics of one masktok generation: forward passes, tokens per pass and accepted lengths."""

from __future__ import annotations

from collections import Counter
from typing import Any


class DecodingStats:
    """Counts of one generation, overall and per row.

    A row takes part in a forward pass while it is still decoding. Each such pass accepts between 1
    and k tokens for it, and the accepted-length histogram counts those passes by length. Tokens
    accepted after a stop that only the stopping criteria of the whole batch detect are counted
    as accepted but are not part of the row's new tokens.
    """

    def __init__(self, batch_size: int, settings: dict[str, Any], verifies: bool = False) -> None:
        self.settings = dict(settings)
        self.verifies = verifies  # add the draft acceptance counts of the verify policy
        self.forward_passes = 0
        self.mask_slots = 0
        self.row_passes = [0] * batch_size
        self.row_histograms: list[Counter[int]] = [Counter() for _ in range(batch_size)]
        self.row_proposed = [0] * batch_size
        self.row_verified = [0] * batch_size

    def record_pass(self, accepted: dict[int, int], num_masks: int) -> None:
        """Record one forward pass with `num_masks` mask slots per row.

        `accepted` maps each row that decoded in the pass to its accepted length.
        """
        self.forward_passes += 1
        self.mask_slots += num_masks
        for row, count in accepted.items():
            self.row_passes[row] += 1
            self.row_histograms[row][count] += 1

    def record_verification(self, row: int, proposed: int, accepted: int) -> None:
        """Record that `accepted` of a row's `proposed` draft tokens passed verification."""
        self.row_proposed[row] += proposed
        self.row_verified[row] += accepted

    def as_dict(self, new_tokens: list[int]) -> dict[str, Any]:
        """Return the statistics as plain Python values, given each row's number of new tokens.

        `tokens_per_pass` is new tokens per row-pass: for one row it is the usual tokens per forward
        pass, and for a batch it is the mean over rows weighted by their passes. `forward_passes` is
        the number of model calls, shared by all rows of the batch.
        """
        rows = []
        for row, (passes, histogram, tokens) in enumerate(
            zip(self.row_passes, self.row_histograms, new_tokens, strict=True)
        ):
            row_stats = {
                "forward_passes": passes,
                "new_tokens": tokens,
                "tokens_per_pass": tokens / passes if passes else 0.0,
                "accepted_histogram": dict(sorted(histogram.items())),
            }
            if self.verifies:
                row_stats.update(_verification_stats(self.row_proposed[row], self.row_verified[row]))
            rows.append(row_stats)
        total_histogram: Counter[int] = Counter()
        for histogram in self.row_histograms:
            total_histogram.update(histogram)
        row_passes = sum(self.row_passes)
        total_tokens = sum(new_tokens)
        stats = {
            **self.settings,
            "forward_passes": self.forward_passes,
            "row_passes": row_passes,
            "new_tokens": total_tokens,
            "tokens_per_pass": total_tokens / row_passes if row_passes else 0.0,
            "mask_slots_per_pass": self.mask_slots / self.forward_passes if self.forward_passes else 0.0,
            "accepted_histogram": dict(sorted(total_histogram.items())),
        }
        if self.verifies:
            stats.update(_verification_stats(sum(self.row_proposed), sum(self.row_verified)))
        stats["per_row"] = rows
        return stats


def _verification_stats(proposed: int, accepted: int) -> dict[str, Any]:
    """Return the verify policy's counts: draft tokens checked, accepted, and their ratio (0.0 without drafts)."""
    return {
        "proposals_verified": proposed,
        "proposals_accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
    }
