"""The monitor's own channel between ranks: a separate gloo process group, so its small integer
vectors never queue behind the training's collectives (and work the same under NCCL).

A rank that stops on its own (it found its optimizer bypassed, say) leaves a note in the job's
key-value store before it goes; the ranks left waiting in a gather read the notes to say who left.
"""

from __future__ import annotations

import contextlib
import datetime
import secrets
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Channel"]

_NOTE = "trainguard/left/{rank}"


class Channel:
    """All-gathers of int64 vectors among the job's ranks; a single process is a world of one."""

    def __init__(self, timeout: datetime.timedelta) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self._group = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None

    def gather(self, words: Sequence[int]) -> list[list[int]]:
        """Every rank's vector, in rank order; all vectors must have the same length."""
        mine = torch.tensor(list(words), dtype=torch.int64)
        if self._group is None:
            return [mine.tolist()]
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self._group)
        return [tensor.tolist() for tensor in out]

    def shared_secret(self) -> tuple[int, int]:
        """Two 62-bit secrets drawn by rank 0 and known to every rank: a seed and a run id."""
        drawn = torch.tensor([secrets.randbits(62), secrets.randbits(62)], dtype=torch.int64)
        if self._group is not None:
            dist.broadcast(drawn, src=dist.get_global_rank(self._group, 0), group=self._group)
        seed, run = drawn.tolist()
        return int(seed), int(run)

    def leave_note(self, message: str) -> None:
        """Say, in the job's store, why this rank stops on its own."""
        store = self._store()
        if store is not None:
            store.set(_NOTE.format(rank=self.rank), message.encode("utf-8", "replace")[:1024])

    def notes(self) -> dict[int, str]:
        """The notes other ranks left, by rank."""
        store = self._store()
        found: dict[int, str] = {}
        if store is None:
            return found
        for rank in range(self.world):
            key = _NOTE.format(rank=rank)
            try:
                if store.check([key]):
                    found[rank] = bytes(store.get(key)).decode("utf-8", "replace")
            # A store that is gone too (its host rank died) has nothing more to say.
            except RuntimeError:
                break
        return found

    def close(self) -> None:
        if self._group is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                dist.destroy_process_group(self._group)
            self._group = None

    def _store(self) -> Any:
        if not self.distributed:
            return None
        # The default group's store is not public API; without it, notes are simply not left.
        getter = getattr(dist.distributed_c10d, "_get_default_store", None)
        try:
            return getter() if getter is not None else None
        except (RuntimeError, ValueError):
            return None
