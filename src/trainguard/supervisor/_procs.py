"""What /proc says about the job's processes: state, exit code of a zombie, session, signal masks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from pathlib import Path

__all__ = [
    "JobProcesses",
    "ProcStat",
    "SignalMasks",
    "describe_wait_status",
    "job_processes",
    "read_masks",
    "read_stat",
]

_PROC = Path("/proc")
# Field numbers of proc_pid_stat(5), counted from 1; the list after "(comm)" starts at field 3.
_STATE, _PPID, _PGRP, _SESSION, _STARTTIME, _EXIT_CODE = 3, 4, 5, 6, 22, 52
_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "in uninterruptible sleep (I/O or a driver)",
    "T": "stopped by a signal",
    "t": "stopped by a debugger",
    "Z": "a zombie",
    "X": "dead",
    "I": "idle",
}


@dataclasses.dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    starttime: int
    exit_code: int | None  # the wait status of a zombie (Linux 3.5+), else None

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")

    def describe_state(self) -> str:
        return _STATES.get(self.state, f"in state {self.state}")


def read_stat(pid: int) -> ProcStat | None:
    """/proc/<pid>/stat parsed, or None when the process is gone (reaped)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    close = text.rfind(")")  # the command name may hold spaces and parentheses
    fields = text[close + 2 :].split()
    if len(fields) < _SESSION - 2:
        return None

    def field(number: int) -> int | None:
        index = number - 3
        return int(fields[index]) if index < len(fields) and fields[index].lstrip("-").isdigit() else None

    state = fields[0]
    exit_code = field(_EXIT_CODE) if state in ("Z", "X") else None
    return ProcStat(
        pid=pid,
        state=state,
        ppid=field(_PPID) or 0,
        pgrp=field(_PGRP) or 0,
        session=field(_SESSION) or 0,
        starttime=field(_STARTTIME) or 0,
        exit_code=exit_code,
    )


def job_processes(root: int) -> list[ProcStat]:
    """The live (not zombie) processes of the job started as `root`: its descendants, and the members of
    its session and process group (launchers such as torchrun put each worker in a session of its own)."""
    try:
        pids = [int(entry.name) for entry in os.scandir(_PROC) if entry.name.isdigit()]
    except OSError:
        return []
    stats = [stat for pid in pids if (stat := read_stat(pid)) is not None]
    children: dict[int, list[ProcStat]] = {}
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
    found = {stat.pid: stat for stat in stats if root in (stat.session, stat.pgrp) or stat.pid == root}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child.pid not in found:
                found[child.pid] = child
                todo.append(child.pid)
    return [stat for stat in found.values() if not stat.zombie]


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_wait_status(status: int) -> str:
    """A wait status (as in a zombie's exit_code field) in words."""
    if os.WIFSIGNALED(status):
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"killed by {signal_name(os.WTERMSIG(status))}{core}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


@dataclasses.dataclass(frozen=True)
class SignalMasks:
    pending: int  # SigPnd | ShdPnd: pending for the thread or for the whole process
    blocked: int
    ignored: int
    caught: int

    @staticmethod
    def has(mask: int, sig: int) -> bool:
        return bool(mask >> (sig - 1) & 1)


def read_masks(pid: int) -> SignalMasks | None:
    """The signal masks of `pid` (its main thread) from /proc/<pid>/status, or None when unreadable."""
    try:
        text = (_PROC / str(pid) / "status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
            try:
                values[name] = int(value.strip(), 16)
            except ValueError:
                return None
    if len(values) != 5:
        return None
    return SignalMasks(
        pending=values["SigPnd"] | values["ShdPnd"],
        blocked=values["SigBlk"],
        ignored=values["SigIgn"],
        caught=values["SigCgt"],
    )


class JobProcesses:
    """The processes of a job started as `root`, as far as they have been seen (pid -> start time): a
    process that left the job's tree and session (its parent died) is still known by its pid."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._known: dict[int, int] = {}
        self._lock = threading.Lock()

    def scan(self) -> list[ProcStat]:
        """The live processes of the job now."""
        found = {stat.pid: stat for stat in job_processes(self.root)}
        with self._lock:
            self._known.update((pid, stat.starttime) for pid, stat in found.items())
            known = dict(self._known)
        for pid, start in known.items():
            stat = read_stat(pid) if pid not in found else None
            if stat is not None and not stat.zombie and stat.starttime == start:
                found[pid] = stat
        return list(found.values())

    def alive(self) -> list[int]:
        return sorted(stat.pid for stat in self.scan())

    def signal(self, sig: int) -> list[int]:
        """Send `sig` to every live process of the job; their pids."""
        pids = self.alive()
        with contextlib.suppress(OSError):
            os.killpg(self.root, sig)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        return pids
