"""The optimizer's hyper-parameters, read at every step: a change must come from a scheduler's step().

The update re-computation reads `lr`, `betas` or `weight_decay` from the parameter groups as they are at
the step, so on its own it vouches for whatever a saboteur wrote there (`lr` halved on every rank, weight
decay 0.01 -> 50). Here every group's values are kept from one step to the next:

- a change is accepted only when a learning-rate scheduler of this optimizer stepped in between, only
  for the values schedulers set (`lr`, `momentum`, `betas`, `initial_lr`), and only to the learning
  rate that scheduler computed itself (its `get_last_lr()`);
- a group added or removed, a negative or non-finite learning rate, is never accepted;
- every accepted change goes to the ledger's step summaries.

Schedulers are those given to `watch(schedulers=...)` and any LRScheduler of this optimizer alive in the
process (found once at the start, and again when a change has no known scheduler). A digest of every
value goes into the rank's report so that replicas are compared too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from trainguard.monitor._identity import digest
from trainguard.monitor._live import live_instances

__all__ = ["Change", "HyperParameters"]

# What torch's schedulers write into a parameter group.
_SCHEDULED = frozenset({"lr", "initial_lr", "momentum", "betas", "max_lr", "min_lr", "base_momentum"})
Change = tuple[int, str, Any, Any]  # group, key, old value, new value


class HyperParameters:
    """`observe()` at each step's start says what changed since the last step and whether it may."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: Sequence[object] = ()) -> None:
        self._optimizer = optimizer
        self._schedulers: list[Any] = list(schedulers) or _schedulers_of(optimizer)
        self._values = self._read()
        self._epochs = self._scheduler_epochs()
        self.digest = digest(self._values)

    def rebase(self) -> None:
        """Take the values as they are now (after a rollback loaded other ones)."""
        self._values = self._read()
        self._epochs = self._scheduler_epochs()
        self.digest = digest(self._values)

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(type(s).__name__ for s in self._schedulers)

    def observe(self) -> tuple[list[Change], str | None]:
        """(changes since the last call, why they are not allowed or None)."""
        values = self._read()
        if values == self._values:
            self._epochs = self._scheduler_epochs()
            return [], None
        old, self._values = self._values, values
        self.digest = digest(values)
        if len(values) != len(old):
            return [], f"the optimizer had {len(old)} parameter groups and now has {len(values)}"
        changes: list[Change] = [
            (index, key, before.get(key), after.get(key))
            for index, (before, after) in enumerate(zip(old, values, strict=True))
            for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)
        ]
        stepped = self._stepped()
        if not stepped:
            # A scheduler made after watch() sets the learning rate when it is built: look once more.
            known = {id(s) for s in self._schedulers}
            late = [s for s in _schedulers_of(self._optimizer) if id(s) not in known]
            self._schedulers.extend(late)
            stepped = [s for s in late if getattr(s, "last_epoch", None) == 0]
        self._epochs = self._scheduler_epochs()
        return changes, _refusal(changes, values, stepped)

    def _stepped(self) -> list[Any]:
        now = self._scheduler_epochs()
        return [
            s
            for s, before, after in zip(self._schedulers, self._epochs, now, strict=False)
            if after != before
        ]

    def _scheduler_epochs(self) -> list[object]:
        return [getattr(s, "last_epoch", None) for s in self._schedulers]

    def _read(self) -> list[dict[str, Any]]:
        return [
            {key: _plain(value) for key, value in group.items() if key != "params"}
            | {"params": len(group["params"])}
            for group in self._optimizer.param_groups
        ]


def _refusal(
    changes: Sequence[Change], values: Sequence[dict[str, Any]], stepped: Sequence[Any]
) -> str | None:
    for group, key, before, after in changes:
        where = f"{key} of parameter group {group} changed from {before!r} to {after!r}"
        if key not in _SCHEDULED:
            return f"{where}: no scheduler sets {key}"
        if not stepped:
            return f"{where} without a learning-rate scheduler's step()"
    for group, params in enumerate(values):
        lr = params.get("lr")
        if isinstance(lr, float) and (not math.isfinite(lr) or lr < 0):
            return f"the learning rate of parameter group {group} is {lr!r}"
        if any(key == "lr" and index == group for index, key, _, _ in changes) and not any(
            _scheduled_lr(s, group) == lr for s in stepped
        ):
            wanted = [_scheduled_lr(s, group) for s in stepped]
            return f"lr of parameter group {group} is {lr!r}, but its scheduler computed {wanted[0]!r}"
    return None


def _scheduled_lr(scheduler: Any, group: int) -> object:
    last = getattr(scheduler, "_last_lr", None)
    if isinstance(last, (list, tuple)) and group < len(last):
        return _plain(last[group])
    return None


def _plain(value: Any) -> Any:
    """A group value as plain data (a 0-d tensor learning rate as a float), for comparing and digests."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else tuple(value.reshape(-1).tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_plain(item) for item in value)
    return value


def _schedulers_of(optimizer: torch.optim.Optimizer) -> list[Any]:
    """Every learning-rate scheduler in the process that drives this optimizer."""
    found = live_instances(torch.optim.lr_scheduler.LRScheduler)
    return [obj for obj in found if _drives(getattr(obj, "optimizer", None), optimizer)]


def _drives(held: object, optimizer: torch.optim.Optimizer) -> bool:
    """True when `held` is the optimizer or a wrapper of it (accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer): schedulers made after the wrapping hold the wrapper."""
    for _ in range(4):
        if held is optimizer:
            return True
        held = getattr(held, "optimizer", None)
        if held is None:
            return False
    return False
