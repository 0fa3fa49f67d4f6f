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
    (and DDP) are set up and before the first step. Under a launcher that set WORLD_SIZE above 1, a
    process without a process group is a UsageError (`single_process=True` if it runs alone on purpose).

        guard = trainguard.watch(model, optimizer)
        for batch in loader:
            loss = model(batch).loss  # across ranks: the last step's failure raises IntegrityError here
            loss.backward()
            optimizer.step()          # in a single process: this step's failure raises here
            optimizer.zero_grad()
        guard.close()                 # the last step's verdict

    `checks` / `skip` choose checks by name; `actions` maps a check to "stop", "alert" or "rollback";
    other settings are `GuardConfig`'s fields (replica_groups, run_config, rollback, ...).
    """
    config = GuardConfig.build(checks=checks, skip=skip, actions=actions, **settings)
    return Guard(model, optimizer, config)
