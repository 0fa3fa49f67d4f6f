"""`trainguard.watch(model, optimizer)`: the one call a plain training loop needs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from trainguard.monitor._config import GuardConfig
from trainguard.monitor._guard import Guard

__all__ = ["watch"]


def watch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    checks: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    actions: Mapping[str, str] | None = None,
    **settings: object,
) -> Guard:
    """Guard `model` and `optimizer` from now on; call it on every rank, after the process group
    (and DDP) are set up and before the first step.

        guard = trainguard.watch(model, optimizer)
        for batch in loader:
            loss = model(batch).loss
            loss.backward()
            optimizer.step()          # raises trainguard.IntegrityError on every rank if a check fails
            optimizer.zero_grad()

    `checks` / `skip` choose checks by name; `actions` maps a check to "stop", "alert" or "rollback";
    other settings are `GuardConfig`'s fields (replica_groups, run_config, rollback, ...).
    """
    config = GuardConfig.build(checks=checks, skip=skip, actions=actions, **settings)
    return Guard(model, optimizer, config)
