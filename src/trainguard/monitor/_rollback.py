"""Roll back to the newest checkpoint that verifies: the `rollback` action's usual function.

    restore = rollback_to_verified("ckpt/*.pt", model, optimizer, trust_policy="trust.toml")
    guard = trainguard.watch(model, optimizer, actions={"update": "rollback"}, rollback=restore)

Checkpoints are tried newest first (by modification time); each goes through the load gate
(`trainguard.load`: signature, digests, scan, `weights_only=True`), so a checkpoint the attacker
altered or planted is refused and the next older one is tried. Every rank must see the same files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trainguard.errors import IntegrityError, VerificationFailed
from trainguard.gate import load
from trainguard.provenance import PublicKey

__all__ = ["rollback_to_verified"]

_LOG = logging.getLogger("trainguard.monitor")


def rollback_to_verified(
    checkpoints: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    trusted: Sequence[PublicKey] | None = None,
    trust_policy: str | os.PathLike[str] | None = None,
) -> Callable[[IntegrityError], None]:
    """A rollback function for `watch(..., rollback=...)`. `checkpoints` is a glob pattern or a folder;
    a checkpoint is a state dict, or a dict with "model" (and "optimizer") state dicts."""
    pattern = Path(checkpoints)
    if pattern.is_dir():
        pattern = pattern / "*"
    # An absolute pattern is split at its first component that holds a wildcard.
    parts = pattern.parts
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts) - 1)
    base, relative = Path(*parts[:fixed]) if fixed else Path(), str(Path(*parts[fixed:]))

    def rollback(error: IntegrityError) -> None:
        candidates = [
            p for p in base.glob(relative) if p.is_file() and not p.name.endswith(".trainguard.sig")
        ]
        for path in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
            try:
                state = load(path, trusted=trusted, trust_policy=trust_policy, map_location="cpu")
            except VerificationFailed as refused:
                _LOG.warning("trainguard: rollback skips %s: %s", path, refused.diagnostics())
                continue
            _restore(state, model, optimizer)
            _LOG.warning("trainguard: rolled back to %s after: %s", path, error.message)
            return
        raise IntegrityError(
            f"{error.message}; no checkpoint matching {pattern} verified: there is nothing to roll back to",
            check=error.check,
            ranks=error.ranks,
            step=error.step,
            hint="sign checkpoints with trainguard.save so that a verified one exists",
        )

    return rollback


def _restore(state: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    target = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if isinstance(state, Mapping) and "model" in state:
        target.load_state_dict(state["model"])
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    else:
        target.load_state_dict(state)
