"""Watching a running job: heartbeats per rank, the cause of each lost rank, and signals nobody takes.

One thread does it all, woken by a heartbeat datagram, by a rank's pidfd (readable the moment the rank
exits, while it is still a zombie whose exit status /proc shows), or every `_TICK_S`:

- a rank that exits without saying "bye", or stays silent longer than the timeout, is recorded as
  `run.rank_lost` with its cause: killed by a signal, exited with a status, hung (alive but silent), or
  gone (its parent reaped it before its status could be read);
- a "signal" datagram (a rank's guard reporting who signalled it) is recorded as `run.signal`;
- a "report" datagram (what a rank's guard found at a step) is judged here too (`_verdicts`): a failed
  check the job does not stop for, a guard that drops checks or falls silent behind its peers, is
  recorded as `run.guard_alarm` and stops the job;
- a catchable signal left pending in a job process that does not watch signals (its block was inherited
  from the supervisor) is carried out: a process that would have died of it is killed, so that an
  unwatched process still dies on SIGTERM; one that ignores it keeps ignoring it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from trainguard.monitor._heartbeat import MAX_DATAGRAM, Datagram, parse_datagram
from trainguard.monitor._signals import CATCHABLE, read_cmdline
from trainguard.supervisor._journal import Journal
from trainguard.supervisor._procs import (
    JobProcesses,
    SignalMasks,
    describe_wait_status,
    read_masks,
    read_stat,
    signal_name,
)
from trainguard.supervisor._say import say
from trainguard.supervisor._verdicts import Alarm, GuardVerdicts, parse_report

__all__ = ["Watcher"]

_TICK_S = 0.1
# Signals that ask a process to stop: pending in a job process, they stop the job.
_STOPPING = frozenset({int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGHUP), int(signal.SIGQUIT)})
_SWEEP_S = 0.25
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_SIGNAL_FIELDS = {"signal": int, "name": str, "sender_pid": int, "sender_uid": int, "sender_cmdline": str}


@dataclasses.dataclass
class _Rank:
    rank: int
    pid: int
    step: int
    last: float  # time.monotonic() of the last datagram
    state: str = "beating"  # beating, bye, lost (dead), hung (alive and silent)
    pidfd: int | None = None


def _signal_payload(payload: Mapping[str, object]) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for name, kind in _SIGNAL_FIELDS.items():
        value = payload.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return None
        out[name] = value
    return out


class Watcher:
    """Receives the job's heartbeats on `sock` and watches the processes of `job`."""

    def __init__(
        self,
        sock: socket.socket,
        journal: Journal,
        *,
        timeout: float,
        job: JobProcesses,
        forwarded: Callable[[], bool],
        stop_job: Callable[[], None] = lambda: None,
    ) -> None:
        self._sock = sock
        self._journal = journal
        self._timeout = timeout
        self._job = job
        self._forwarded = forwarded  # the supervisor is stopping the job: pending SIGTERMs are its own
        self._stop_job = stop_job
        self._verdicts = GuardVerdicts()
        self.alarms: list[Alarm] = []
        self._stopped = False
        self._ranks: dict[int, _Rank] = {}
        self._by_fd: dict[int, _Rank] = {}
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._stop = threading.Event()
        self._pending: dict[tuple[int, int, int], int] = {}  # (pid, start time, signal) -> sweeps seen
        self._acted: set[tuple[int, int, int]] = set()
        self.on_behalf: dict[int, int] = {}  # pid -> the pending signal it was killed for
        self.received = 0
        self.rejected = 0
        self.lost: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._loop, name="trainguard-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take in what is left (final datagrams, exits), then stop."""
        self._stop.set()
        self._thread.join()
        for rank in self._ranks.values():
            if rank.pidfd is not None:
                os.close(rank.pidfd)
                rank.pidfd = None

    def ranks_seen(self) -> int:
        return len(self._ranks)

    # The loop

    def _loop(self) -> None:
        next_sweep = 0.0
        while True:
            stopping = self._stop.is_set()
            ready = self._poll.poll(0 if stopping else int(_TICK_S * 1000))
            self._drain()  # first: a "bye" or "signal" sent just before an exit explains that exit
            for fd, _ in ready:
                if (rank := self._by_fd.get(fd)) is not None:
                    self._exited(rank)
            now = time.monotonic()
            self._check_silence(now)
            running = [r.rank for r in self._ranks.values() if r.state in ("beating", "bye")]
            self._raise(self._verdicts.tick(now, running))
            if now >= next_sweep and not stopping:
                self._sweep()
                next_sweep = now + _SWEEP_S
            if stopping:
                return

    def _drain(self) -> None:
        while True:
            try:
                data, ancillary, flags, _ = self._sock.recvmsg(
                    MAX_DATAGRAM + 1, socket.CMSG_SPACE(_UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.received += 1
            sender = None
            for level, kind, value in ancillary:
                if (
                    level == socket.SOL_SOCKET
                    and kind == socket.SCM_CREDENTIALS
                    and len(value) >= _UCRED.size
                ):
                    sender = _UCRED.unpack(value[: _UCRED.size])[0]
            try:
                if flags & socket.MSG_TRUNC:
                    raise ValueError("datagram too long")
                datagram = parse_datagram(data)
                if sender is not None and sender != datagram.pid:
                    raise ValueError(f"claims pid {datagram.pid} but was sent by pid {sender}")
                self._handle(datagram)
            except ValueError as exc:
                self.rejected += 1
                if self.rejected == 1:
                    say(f"ignoring a malformed heartbeat datagram: {exc}")

    def _handle(self, datagram: Datagram) -> None:
        rank = self._ranks.get(datagram.rank)
        now = time.monotonic()
        if rank is None or rank.pid != datagram.pid:
            rank = self._new_rank(datagram, rank, now)
        rank.last = now
        rank.step = datagram.step
        if datagram.kind == "signal":
            payload = _signal_payload(datagram.payload)
            if payload is None:
                raise ValueError("a signal datagram without signal, name and sender fields")
            self._journal.write("run.signal", {"to": "rank", "pid": rank.pid, **payload}, rank=rank.rank)
        elif datagram.kind == "report":
            self._raise(self._verdicts.observe(rank.rank, parse_report(datagram.payload), now))
        elif datagram.kind == "bye":
            rank.state = "bye"
            self._raise(self._verdicts.closed(rank.rank))
        elif rank.state == "hung":
            rank.state = "beating"
            self._journal.write(
                "run.rank_resumed", {"rank": rank.rank, "pid": rank.pid, "step": rank.step}, rank=rank.rank
            )
            say(f"rank {rank.rank} (pid {rank.pid}) beats again")

    def _raise(self, alarms: list[Alarm]) -> None:
        for alarm in alarms:
            self.alarms.append(alarm)
            self._journal.write("run.guard_alarm", alarm.payload(), rank=alarm.rank)
            say(alarm.message)
            if alarm.stop and not self._stopped:
                self._stopped = True  # asked twice, stop_job would SIGKILL at once
                self._stop_job()

    def _new_rank(self, datagram: Datagram, old: _Rank | None, now: float) -> _Rank:
        if old is not None:
            if old.pidfd is not None:
                self._poll.unregister(old.pidfd)
                self._by_fd.pop(old.pidfd, None)
                os.close(old.pidfd)
            self._journal.write(
                "run.rank_restarted",
                {"rank": datagram.rank, "pid": datagram.pid, "previous_pid": old.pid, "previous": old.state},
                rank=datagram.rank,
            )
        rank = _Rank(datagram.rank, datagram.pid, datagram.step, now)
        try:
            rank.pidfd = os.pidfd_open(datagram.pid)
        except OSError:
            rank.pidfd = None  # already gone, or no pidfds here: the silence check still finds it
        if rank.pidfd is not None:
            self._poll.register(rank.pidfd, select.POLLIN)
            self._by_fd[rank.pidfd] = rank
        self._ranks[datagram.rank] = rank
        return rank

    # Lost ranks

    def _exited(self, rank: _Rank) -> None:
        if rank.pidfd is not None:
            self._poll.unregister(rank.pidfd)
            self._by_fd.pop(rank.pidfd, None)
            os.close(rank.pidfd)
            rank.pidfd = None
        if rank.state == "bye":
            return
        cause = self._cause(rank.pid)
        if rank.state == "hung":
            rank.state = "lost"
            self._journal.write(
                "run.rank_exit", {"rank": rank.rank, "pid": rank.pid, "cause": cause}, rank=rank.rank
            )
            return
        self._lose(rank, cause, "lost")

    def _check_silence(self, now: float) -> None:
        for rank in self._ranks.values():
            if rank.state != "beating" or now - rank.last <= self._timeout:
                continue
            cause = self._cause(rank.pid)
            self._lose(rank, cause, "hung" if cause.startswith("hung") else "lost")

    def _cause(self, pid: int) -> str:
        """Why a process that no longer beats is gone: from its zombie's exit status while it has one."""
        stat = read_stat(pid)
        if stat is None:
            return "gone; its parent reaped it"
        if not stat.zombie:
            return f"hung: still running but silent ({stat.describe_state()})"
        if stat.exit_code is None:
            return "exited (its status is not readable)"
        cause = describe_wait_status(stat.exit_code)
        if pid in self.on_behalf:
            cause += f" on behalf of a pending {signal_name(self.on_behalf[pid])}"
        return cause

    def _lose(self, rank: _Rank, cause: str, state: str) -> None:
        rank.state = state
        silent = time.monotonic() - rank.last
        payload = {
            "rank": rank.rank,
            "pid": rank.pid,
            "step": rank.step,
            "silent_s": round(silent, 3),
            "cause": cause,
        }
        self.lost.append(payload)
        self._journal.write("run.rank_lost", payload, rank=rank.rank)
        say(f"RANK {rank.rank} LOST (pid {rank.pid}, step {rank.step}, silent {silent:.2f} s): {cause}")

    # Signals that nobody takes

    def rank_of(self, pid: int) -> int | None:
        for rank in self._ranks.values():
            if rank.pid == pid:
                return rank.rank
        return None

    def _sweep(self) -> None:
        seen: dict[tuple[int, int, int], int] = {}
        for stat in self._job.scan():
            masks = read_masks(stat.pid)
            if masks is None:
                continue
            for sig in CATCHABLE:
                if SignalMasks.has(masks.pending, sig) and SignalMasks.has(masks.blocked, sig):
                    key = (stat.pid, stat.starttime, int(sig))
                    seen[key] = self._pending.get(key, 0) + 1
                    # Seen twice a sweep apart: no thread of the process is waiting for it.
                    if seen[key] >= 2 and key not in self._acted:
                        self._acted.add(key)
                        self._unwatched(stat.pid, int(sig), masks)
        self._pending = seen

    def _unwatched(self, pid: int, sig: int, masks: SignalMasks) -> None:
        name = signal_name(sig)
        cmdline = read_cmdline(pid)
        own = self._forwarded() and sig == signal.SIGTERM  # the supervisor's own SIGTERM
        if SignalMasks.has(masks.ignored, sig):
            action = "ignored by the process"
        elif SignalMasks.has(masks.caught, sig) and sig in _STOPPING and not self._forwarded():
            # A launcher (torchrun's agent) that handles SIGTERM but inherited the supervisor's block: the
            # request to stop must still stop the job, so the supervisor stops all of it.
            action = "a stop request: the process has a handler for it, so the supervisor stops the whole job"
            self._stop_job()
        elif SignalMasks.has(masks.caught, sig):
            action = "left pending: the process has a handler for it but does not watch signals"
        else:
            action = "carried out: the process did not watch signals, and would have died of it (SIGKILL)"
            self.on_behalf[pid] = sig
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if own:
            return  # recorded when it was sent
        rank = self.rank_of(pid)
        payload = {
            "to": "process",
            "pid": pid,
            "cmdline": cmdline,
            "signal": sig,
            "name": name,
            "sender_pid": None,
            "sender_uid": None,
            "sender_cmdline": None,
            "action": action,
        }
        self._journal.write("run.signal", payload, rank=rank)
        say(f"{name} pending in pid {pid}, which does not watch signals: {action}")
