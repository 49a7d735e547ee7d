"""Trainer callbacks of masktok training: a wall-clock budget that ends training cleanly."""

from __future__ import annotations

import logging
import time

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class TimeBudgetCallback(TrainerCallback):
    """Stop training after the first optimizer step that ends once `max_seconds` have passed.

    The clock starts at `started_at` (a `time.monotonic()` reading), or at the start of training
    when that is None. Stopping goes through `control.should_training_stop`, so the Trainer ends
    the loop as after its last step and the caller can save the adapter as usual. At least one
    step always runs. In a multi-process run the main process decides and broadcasts its decision,
    so that every process stops after the same step.
    """

    def __init__(self, max_seconds: float, started_at: float | None = None) -> None:
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}.")
        self.max_seconds = max_seconds
        self.started_at = started_at
        self.stopped_at_step: int | None = None

    def elapsed_seconds(self) -> float:
        """Seconds since the clock started; 0 before it has."""
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def on_train_begin(self, args, state, control, **kwargs):
        if self.started_at is None:
            self.started_at = time.monotonic()
        remaining = self.max_seconds - self.elapsed_seconds()
        if remaining <= 0:
            logger.warning(
                "The time budget of %.1f minutes was spent before training began (%.1f minutes elapsed); training "
                "stops after its first step.",
                self.max_seconds / 60,
                self.elapsed_seconds() / 60,
            )
        else:
            logger.info("Time budget: %.1f of %.1f minutes left for training.", remaining / 60, self.max_seconds / 60)

    def on_step_end(self, args, state, control, **kwargs):
        spent = self.elapsed_seconds() >= self.max_seconds
        process_state = PartialState()
        if process_state.num_processes > 1:
            decision = [spent]
            broadcast_object_list(decision, from_process=0)
            spent = decision[0]
        if spent and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
            logger.warning(
                "Stopping training at step %d of %d: the time budget of %.1f minutes is spent (%.1f minutes elapsed).",
                state.global_step,
                state.max_steps,
                self.max_seconds / 60,
                self.elapsed_seconds() / 60,
            )
        return control
