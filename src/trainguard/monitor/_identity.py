"""What every rank must agree on before the first step: torch's seed, the run config and the
environment; and the length of the reports they will exchange.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator

import torch

from trainguard.monitor._checks import Check
from trainguard.monitor._config import GuardConfig
from trainguard.monitor._distributed import Channel
from trainguard.monitor._verdict import Failure

__all__ = ["compare_identity", "digest"]


def compare_identity(channel: Channel, config: GuardConfig, length: int) -> tuple[int, list[Failure]]:
    """One all-gather: the longest report length (every report is padded to it, so that ranks guarding
    models of different shapes still share one gather) and the identity fields that differ."""
    fields = {
        "seed": (Check.SEED, digest(torch.initial_seed())),
        "run config": (Check.IDENTITY, digest(config.run_config or {})),
        "environment": (Check.IDENTITY, _environment_digest()),
    }
    rows = channel.gather([length, *(value for _, value in fields.values())])
    failures = []
    for position, (name, (check, _)) in enumerate(fields.items(), start=1):
        column = [row[position] for row in rows]
        if not config.enabled(check) or len(set(column)) == 1:
            continue
        majority = max(set(column), key=column.count)
        odd: tuple[int, ...] = ()
        if column.count(majority) * 2 > len(column):
            odd = tuple(rank for rank, value in enumerate(column) if value != majority)
        who = (
            "the ranks"
            if not odd
            else f"rank {odd[0]}"
            if len(odd) == 1
            else "ranks " + ", ".join(map(str, odd))
        )
        message = f"the {name} of {who} differs from the other ranks' at the start of the run"
        failures.append(Failure(check, odd, 0, message, config.actions[check]))
    return max(row[0] for row in rows), failures


def digest(value: object) -> int:
    text = json.dumps(value, sort_keys=True, default=repr).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)


def _environment_digest() -> int:
    """The environment digest `trainguard run` verified, else the versions this process runs."""
    given = os.environ.get("TRAINGUARD_ENV_DIGEST")
    if given:
        return digest(given)
    return digest([sys.version, torch.__version__, sorted(_loaded_versions())])


def _loaded_versions() -> Iterator[str]:
    for name in ("numpy", "transformers", "lightning", "pytorch_lightning", "accelerate", "trainguard"):
        module = sys.modules.get(name)
        if module is not None:
            yield f"{name}=={getattr(module, '__version__', '?')}"
