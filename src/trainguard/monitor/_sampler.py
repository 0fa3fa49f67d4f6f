"""The data samplers' seeds, epochs and settings, compared across ranks at every step.

`DistributedSampler` gives every rank a strided slice of one permutation drawn from `seed + epoch`. A
seed changed on one rank makes that rank read another permutation: some examples twice, others never,
and nothing in the loss says so. Each rank reads its samplers at every step: a seed, shuffle or replica
setting that differs from what it was at watch() fails on that rank, a sampler that does not say this
rank's place in the job fails too, and a digest of (seed, epoch, settings) goes into the report, so that
replicas whose samplers disagree (a different epoch, say) are found by comparison.

Samplers are those given to `watch(samplers=...)` and every DistributedSampler alive in the process at
watch(); the digest does not depend on the order they are found in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trainguard.monitor._identity import digest
from trainguard.monitor._live import live_instances

__all__ = ["SamplerWatch"]

_FIXED = ("seed", "shuffle", "drop_last", "num_replicas", "rank", "num_samples", "total_size")


class SamplerWatch:
    def __init__(self, samplers: Sequence[object] = (), *, rank: int, world: int) -> None:
        self._samplers: list[Any] = list(samplers) or _distributed_samplers()
        self._rank, self._world = rank, world
        self._start = [_fixed(s) for s in self._samplers]

    @property
    def count(self) -> int:
        return len(self._samplers)

    def observe(self) -> tuple[int, str | None]:
        """(the digest replicas must share, why this rank's samplers are wrong or None)."""
        problem = None
        for sampler, start in zip(self._samplers, self._start, strict=True):
            now = _fixed(sampler)
            name = type(sampler).__name__
            for key, before, after in zip(_FIXED, start, now, strict=True):
                if before != after:
                    problem = f"the {key} of a {name} changed from {before!r} to {after!r} since watch()"
                    break
            if problem is None and self._world > 1 and (now[4], now[3]) != (self._rank, self._world):
                problem = (
                    f"a {name} reads as rank {now[4]} of {now[3]}, but this process is rank "
                    f"{self._rank} of {self._world}"
                )
            if problem is not None:
                break
        return digest(sorted(_shared(s) for s in self._samplers)), problem


def _fixed(sampler: Any) -> tuple[object, ...]:
    return tuple(getattr(sampler, key, None) for key in _FIXED)


def _shared(sampler: Any) -> str:
    """What every rank's copy of a sampler must agree on: all but the rank, and the epoch."""
    values = [value for key, value in zip(_FIXED, _fixed(sampler), strict=True) if key != "rank"]
    return repr((type(sampler).__name__, *values, getattr(sampler, "epoch", None)))


def _distributed_samplers() -> list[Any]:
    return live_instances(torch.utils.data.DistributedSampler)
