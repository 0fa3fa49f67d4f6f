"""The monitor's own channel between ranks: a separate gloo process group, so its small integer
vectors never queue behind the training's collectives (and work the same under NCCL).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from trainguard.errors import UsageError

__all__ = ["Channel", "Gathering"]


class Gathering:
    """An all-gather under way."""

    def __init__(self, out: list[torch.Tensor], work: Any) -> None:
        self._out = out
        self._work = work

    def wait(self) -> list[list[int]]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return [tensor.tolist() for tensor in self._out]


class Channel:
    """All-gathers of int64 vectors among the job's ranks; a single process is a world of one.

    A process that a launcher started as one of several (WORLD_SIZE above 1) but that has no process
    group is refused, unless `single_process` says it runs alone on purpose: each rank would otherwise
    be a world of one, with every check across replicas silently off.
    """

    def __init__(self, timeout: datetime.timedelta, *, single_process: bool = False) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        if single_process and self.distributed and dist.get_world_size() > 1:
            raise UsageError(
                "watch(): single_process=True, but torch.distributed's process group has "
                f"{dist.get_world_size()} ranks, which the guard compares; drop single_process",
                hint="single_process=True is for a process that runs alone, without a process group",
            )
        if not self.distributed and not single_process:
            _refuse_launched_alone()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self._group = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None

    def gather(self, words: Sequence[int]) -> list[list[int]]:
        """Every rank's vector, in rank order; all vectors must have the same length."""
        return self.start_gather(words).wait()

    def start_gather(self, words: Sequence[int]) -> Gathering:
        """Start an all-gather in the background; `wait()` gives what `gather` gives."""
        mine = torch.tensor(list(words), dtype=torch.int64)
        if self._group is None:
            return Gathering([mine], None)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        work = dist.all_gather(out, mine, group=self._group, async_op=True)
        return Gathering(out, work)

    def shared_secret(self) -> tuple[int, int]:
        """Two 62-bit secrets drawn by rank 0 and known to every rank: a seed and a run id."""
        drawn = torch.tensor([secrets.randbits(62), secrets.randbits(62)], dtype=torch.int64)
        if self._group is not None:
            dist.broadcast(drawn, src=dist.get_global_rank(self._group, 0), group=self._group)
        seed, run = drawn.tolist()
        return int(seed), int(run)

    def close(self) -> None:
        if self._group is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                dist.destroy_process_group(self._group)
            self._group = None


def _refuse_launched_alone() -> None:
    """Raise if a launcher (torchrun, torch.distributed.launch, a SLURM script) said this process is one
    of several: torch.distributed was then not initialised yet, or at all."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise UsageError(
            f"watch(): the environment's WORLD_SIZE is {raw[:40]!r}, not a number of processes (1 or more)",
            hint="unset WORLD_SIZE for a single process, or let the launcher (torchrun) set it",
        )
    if world > 1:
        raise UsageError(
            f"watch(): WORLD_SIZE={world} says this process is one of {world}, but torch.distributed is "
            "not initialised, so every rank would be watched alone with the checks across replicas off; "
            "call torch.distributed.init_process_group() before trainguard.watch(...)",
            hint="pass single_process=True if each process trains on its own, without the others",
        )
