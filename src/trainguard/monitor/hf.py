"""The guard in a Hugging Face `Trainer`: a callback that stops the Trainer through its own control
flow, on every rank at the same global step, when a check fails.

    from trainguard.monitor.hf import TrainguardCallback

    guard = TrainguardCallback()                    # takes watch()'s settings: skip=["step_time"], ...
    Trainer(model=model, args=args, train_dataset=data, callbacks=[guard]).train()
    if guard.failure is not None:                   # the trainer stopped early: say so to the scheduler
        raise guard.failure

How it meets the Trainer, on every rank:
- on_train_begin: the guard goes on the Trainer's model (DDP is set up by then) and on the torch
  optimizer inside accelerate's wrapper; the run config compared between ranks is the TrainingArguments.
  A failure found there (ranks with different run configs or environments) raises: the Trainer has no
  way to stop before its first step.
- on_step_end, after every optimizer step: the verdict on that step. A failure sets
  `control.should_training_stop`, is logged and kept in `callback.failure`
  (`state.log_history` holds numbers only).
- on_train_end: the guard is closed (hooks removed, last ledger entries written).

The loss is not given to the guard: no Trainer callback sees a step's loss before its optimizer step,
and a logged loss is an average over `logging_steps`. Gradients (norm, NaN/Inf) are checked without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from trainguard.errors import IntegrityError, MissingExtraError, UsageError
from trainguard.monitor._callback import CallbackSettings, close_guard, log_failure
from trainguard.monitor._guard import Guard

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError:
    raise MissingExtraError("transformers", "hf", "The Hugging Face Trainer callback") from None

__all__ = ["TrainguardCallback"]

# Set per process by the deprecated torch.distributed.launch; the rest of the arguments must match.
_PER_RANK_ARGUMENTS = ("local_rank",)


class TrainguardCallback(TrainerCallback):
    """Guards the Trainer's training; `failure` holds the IntegrityError that stopped it, if any."""

    def __init__(
        self,
        *,
        checks: Iterable[str] | None = None,
        skip: Iterable[str] = (),
        actions: Mapping[str, str] | None = None,
        **settings: object,
    ) -> None:
        self._settings = CallbackSettings(checks, skip, actions, settings)
        self.guard: Guard | None = None
        self.failure: IntegrityError | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: object = None,
        **kwargs: Any,
    ) -> None:
        self.close()
        self.failure = None
        if model is None or optimizer is None:
            raise UsageError("the trainguard callback needs the Trainer's model and optimizer")
        # to_dict() is unannotated in transformers; it returns the arguments with enums as their values.
        arguments: dict[str, object] = args.to_dict()  # type: ignore[no-untyped-call]
        run_config = {k: v for k, v in arguments.items() if k not in _PER_RANK_ARGUMENTS}
        self.guard = self._settings.watch(model, optimizer, run_config)
        if self.guard.failure is not None:
            failure = self.guard.failure
            self._record(state, failure)
            self.close()
            raise failure

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.failure is not None:
            # Training went on after the stop (another callback cleared it): the guard stopped checking
            # at the failure, so nothing may train unguarded. Every rank raises here.
            raise self.failure

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Called on every rank after each optimizer step (not after accumulation micro-batches).
        if self.guard is None or self.failure is not None:
            return
        failure = self.guard.check_now()
        if failure is not None:
            control.should_training_stop = True
            self._record(state, failure)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the guard's hooks and write its last ledger entries (the end of training does this)."""
        guard, self.guard = self.guard, None
        self.failure = close_guard(guard, self.failure)

    def _record(self, state: TrainerState, failure: IntegrityError) -> None:
        self.failure = failure
        if self.guard is not None:
            log_failure(self.guard, failure, state.global_step)
