"""Per-thread off-CPU time from the scheduler, and the change-point rule that flags a slow step.

Wall-clock step times on a shared machine are too noisy to catch a 200 ms sleep without false alarms:
a busy neighbour makes every rank slower together. The kernel's per-thread accounting in
`/proc/thread-self/schedstat` says how long the thread ran and how long it waited for a CPU; the rest
of the wall time it was asleep by its own doing (a sleep, a lock, I/O, a collective). Measured over
stretches of the step that contain no collective, that time belongs to this rank alone.
Standard library only.
"""

from __future__ import annotations

import collections
import os
import statistics
import threading
import time
from pathlib import Path

__all__ = ["ChangePoint", "OffCpuClock", "own_elapsed_us", "own_time_ns"]

_SCHEDSTAT = "/proc/thread-self/schedstat"
# One open descriptor per thread (the path names the thread that opened it), re-read in place: a
# mark is then one system call, not an open, a read and a close through Python's file layers.
_descriptors: dict[int, int] = {}
_DESCRIPTORS_KEPT = 64


def _schedstat() -> tuple[int, int]:
    """(ran, waited for a CPU) nanoseconds of the calling thread; OSError off Linux."""
    thread = threading.get_native_id()
    fd = _descriptors.get(thread)
    if fd is not None:
        try:
            ran, waited = _parse(os.pread(fd, 128, 0))
        except (OSError, ValueError):
            ran, waited = 0, 0
        if ran:
            return ran, waited
        # An ended thread reads as zeros: its id was given to this one. Opened anew below.
        _descriptors.pop(thread, None)
        os.close(fd)
    if len(_descriptors) >= _DESCRIPTORS_KEPT:  # threads come and go: start again
        for old in list(_descriptors.values()):
            os.close(old)
        _descriptors.clear()
    fd = os.open(_SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)
    _descriptors[thread] = fd
    return _parse(os.pread(fd, 128, 0))


def _parse(data: bytes) -> tuple[int, int]:
    run, wait, _ = data.split()
    return int(run), int(wait)


class OffCpuClock:
    """Off-CPU nanoseconds of the calling thread between marks; `available` is False off Linux."""

    def __init__(self) -> None:
        self.available = Path(_SCHEDSTAT).exists()
        self._last = self._now()

    def _now(self) -> int:
        wall = time.monotonic_ns()
        if not self.available:
            return 0
        run, wait = _schedstat()
        return wall - run - wait

    def mark(self) -> int:
        """Off-CPU nanoseconds since the previous mark (the thread's own sleeping and blocking)."""
        now = self._now()
        elapsed, self._last = now - self._last, now
        return max(0, elapsed)

    def reset(self) -> None:
        self._last = self._now()


def own_time_ns() -> tuple[int, int, int]:
    """(the calling thread's id, wall time, its own time), in nanoseconds: own time is wall time
    less the time the thread waited for a CPU. Running (a busy-wait) and sleeping (a sleep, a lock)
    both count; a neighbour taking the cores does not. Off Linux, own time is wall time."""
    wall = time.monotonic_ns()
    try:
        _, wait = _schedstat()
    except OSError:
        return threading.get_ident(), wall, wall
    return threading.get_ident(), wall, wall - wait


def own_elapsed_us(start: tuple[int, int, int], end: tuple[int, int, int]) -> int:
    """Own microseconds between two readings; wall time where they come from different threads
    (a GPU's backward pass runs on the autograd engine's threads)."""
    same_thread = start[0] == end[0]
    return max(0, (end[2] - start[2] if same_thread else end[1] - start[1]) // 1000)


class ChangePoint:
    """Flags a value far above its recent median: more than `floor` and `spread` MADs over it.

    The first `warmup` values only teach the baseline (compilation, allocator and cache warm-up).
    A flagged value does not enter the history, so a run of attacks cannot raise the baseline.
    """

    def __init__(self, *, floor: float, spread: float = 8.0, warmup: int = 5, history: int = 32) -> None:
        self.floor = floor
        self.spread = spread
        self.warmup = warmup
        self._values: collections.deque[float] = collections.deque(maxlen=history)

    def observe(self, value: float) -> bool:
        if len(self._values) < self.warmup:
            self._values.append(value)
            return False
        median = statistics.median(self._values)
        deviation = statistics.median(abs(v - median) for v in self._values)
        flagged = value > median + max(self.floor, self.spread * deviation)
        if not flagged:
            self._values.append(value)
        return flagged

    def baseline(self) -> float | None:
        return statistics.median(self._values) if self._values else None
