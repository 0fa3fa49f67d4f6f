"""What the framework callbacks share, framework-free: the settings check, the torch optimizer inside a
framework's wrapper, a run config every rank digests alike, and the Lightning callback's hooks (one
implementation for `lightning.pytorch` and `pytorch_lightning`; each of `lightning.py` and
`pytorch_lightning.py` only adds its own base class).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from trainguard.errors import IntegrityError, UsageError
from trainguard.monitor._config import GuardConfig
from trainguard.monitor._guard import Guard
from trainguard.monitor._watch import watch

__all__ = [
    "CallbackSettings",
    "LightningGuard",
    "close_guard",
    "jsonable",
    "log_failure",
    "torch_optimizer",
]

_LOG = logging.getLogger("trainguard.monitor")
# Wrappers around wrappers are followed this deep: a cycle of `.optimizer` must not hang the job.
_MAX_WRAPPERS = 8


class CallbackSettings:
    """`watch()`'s keyword settings, checked when the callback is made rather than at the first step."""

    def __init__(
        self,
        checks: Iterable[str] | None,
        skip: Iterable[str],
        actions: Mapping[str, str] | None,
        settings: Mapping[str, object],
    ) -> None:
        if "raise_errors" in settings:
            raise UsageError(
                "a trainguard callback does not take raise_errors: it stops the framework's loop itself",
                hint="read the failure from callback.failure once training has stopped",
            )
        self.checks = None if checks is None else tuple(checks)
        self.skip = tuple(skip)
        self.actions = None if actions is None else dict(actions)
        self.settings = dict(settings)
        GuardConfig.build(checks=self.checks, skip=self.skip, actions=self.actions, **self.settings)

    def watch(self, model: torch.nn.Module, optimizer: object, run_config: Mapping[str, object]) -> Guard:
        """The guard, with failures kept rather than raised; `run_config` unless one was given."""
        settings = {"run_config": jsonable(run_config), **self.settings, "raise_errors": False}
        return watch(
            model,
            torch_optimizer(optimizer),
            checks=self.checks,
            skip=self.skip,
            actions=self.actions,
            **settings,
        )


def torch_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The innermost torch optimizer along `.optimizer` (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer, wrappers of those): the guard's hooks must sit on the object whose `step` does
    the update, and AcceleratedOptimizer is itself an Optimizer subclass that only delegates."""
    found = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    current = optimizer
    for _ in range(_MAX_WRAPPERS):
        current = getattr(current, "optimizer", None)
        if current is None:
            break
        if isinstance(current, torch.optim.Optimizer):
            found = current
    if found is None:
        raise UsageError(
            f"trainguard cannot guard a {type(optimizer).__name__}: it is not a torch.optim.Optimizer "
            "and wraps none",
            hint="use trainguard.watch(model, optimizer) with the torch optimizer in your own loop",
        )
    return found


def jsonable(value: Mapping[str, object]) -> dict[str, object]:
    """`value` as plain JSON: anything else becomes its type's name. The guard compares a digest of the
    run config between ranks, and a default repr holds a per-process address."""

    def name(obj: object) -> str:
        return f"<{type(obj).__module__}.{type(obj).__qualname__}>"

    result: dict[str, object] = json.loads(json.dumps(dict(value), default=name, sort_keys=True))
    return result


def log_failure(guard: Guard, error: IntegrityError, global_step: int) -> None:
    # Rank 0 and the ranks at fault, as the guard's own alerts: not one line per rank of a large job.
    if guard.rank == 0 or guard.rank in error.ranks:
        _LOG.error("trainguard: training stopped at global step %d: %s", global_step, error.diagnostics())


def close_guard(guard: Guard | None, failure: IntegrityError | None) -> IntegrityError | None:
    """Close a callback's guard; the failure the callback keeps: its own, else the guard's last."""
    if guard is None:
        return failure
    guard.close()
    return failure if failure is not None else guard.failure


class LightningGuard:
    """The Lightning callback's hooks. Typed loosely on purpose: they read the same few attributes of
    `lightning.pytorch.Trainer` and `pytorch_lightning.Trainer` (optimizers, strategy.model,
    global_step, should_stop) and import neither."""

    def __init__(
        self,
        *,
        checks: Iterable[str] | None = None,
        skip: Iterable[str] = (),
        actions: Mapping[str, str] | None = None,
        **settings: object,
    ) -> None:
        super().__init__()
        self._settings = CallbackSettings(checks, skip, actions, settings)
        self.guard: Guard | None = None
        self.failure: IntegrityError | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._checked_step = 0
        self._loss: torch.Tensor | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.close()
        self.failure = None
        if not trainer.optimizers:
            raise UsageError(
                "the trainguard callback needs an optimizer: configure_optimizers() returned none"
            )
        optimizer = torch_optimizer(trainer.optimizers[0])
        # The strategy's model is the DDP wrapper around the module whose forward runs each step
        # (Lightning calls training_step through it); without DDP it is the LightningModule itself.
        model = trainer.strategy.model
        if not isinstance(model, torch.nn.Module):
            model = pl_module
        self._optimizer = optimizer
        hparams = getattr(pl_module, "hparams", None)
        run_config = dict(hparams) if isinstance(hparams, Mapping) else {}
        self.guard = self._settings.watch(model, optimizer, run_config)
        self._checked_step = trainer.global_step
        self._loss = None
        if self.guard.failure is not None:
            # Found at the start (run config or environment differ): Lightning stops before the first
            # batch on every rank.
            self._stop(trainer, self.guard.failure)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.failure is not None:
            # Lightning went on despite should_stop (min_epochs or min_steps not reached): the guard
            # stopped checking at the failure, so nothing may train unguarded. Every rank raises here.
            raise self.failure

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        # Lightning divides each micro-batch's loss by accumulate_grad_batches: their sum is the step's.
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Inside the step's closure, which the guard checks once it has run. With several optimizers
        # (manual optimization) only the first is guarded.
        if self.guard is None or torch_optimizer(optimizer) is not self._optimizer:
            return
        if self._loss is not None:
            self.guard.observe_loss(self._loss)
        self._loss = None

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only after a batch that stepped the optimizer (accumulate_grad_batches skips others). The
        # global step is the same on every rank, so every rank draws the verdict at the same batch.
        if self.guard is None or trainer.global_step == self._checked_step:
            return
        self._checked_step = trainer.global_step
        failure = self.guard.check_now()
        if failure is not None and self.failure is None:
            self._stop(trainer, failure)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Remove the guard's hooks and write its last ledger entries (the end of training does this)."""
        guard, self.guard = self.guard, None
        self.failure = close_guard(guard, self.failure)

    def _stop(self, trainer: Any, failure: IntegrityError) -> None:
        self.failure = failure
        trainer.should_stop = True
        if self.guard is not None:
            log_failure(self.guard, failure, trainer.global_step)
