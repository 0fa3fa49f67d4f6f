"""Events from the job's processes (the guard's evidence, the commands it runs) into the run's journal.

Under `trainguard run --server` the job holds no token: its processes send their events over a second
AF_UNIX datagram socket ($TRAINGUARD_EVENTS), and this desk spools them with the supervisor's own. The
kernel names each datagram's sender (SO_PASSCRED); an event is taken only when it is an event of this run,
of a type a job may write (never `run.*`), whose actor is the sending process, and that process is a live
process of the job (a sender waits for the answer, so it is alive when it is looked at; one that is gone
cannot be checked, and is refused). Anything else is refused, counted, told to the sender, and the first
refusal of each kind is said on stderr.

The job may send as much as it likes, so the journal lets its events fill only part of the spool
(`Journal.JOB_SHARE`, checked where they are written).
"""

from __future__ import annotations

import select
import socket
import struct
import threading

from trainguard.relay._jobsocket import MAX_EVENT_DATAGRAM, answer, check_job_event
from trainguard.supervisor._journal import Journal
from trainguard.supervisor._procs import JobProcesses
from trainguard.supervisor._say import say

__all__ = ["JobEvents", "event_socket"]

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_TICK_MS = 100
_RECEIVE_BUFFER = 8 << 20


def event_socket(path: str) -> socket.socket:
    """The bound, non-blocking socket that the job's events arrive on; its folder keeps other users out."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
    sock.setblocking(False)
    return sock


class JobEvents:
    """A thread that takes the job's events from `sock` into `journal`."""

    def __init__(self, sock: socket.socket, journal: Journal, job: JobProcesses) -> None:
        self._sock = sock
        self._journal = journal
        self._job = job
        self._members: set[int] = set()
        self._stop = threading.Event()
        self.received = 0
        self.refused = 0
        self._said: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="trainguard-job-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take in what is queued, then stop."""
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while True:
            stopping = self._stop.is_set()
            poller.poll(0 if stopping else _TICK_MS)
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        while True:
            try:
                data, ancillary, flags, address = self._sock.recvmsg(
                    MAX_EVENT_DATAGRAM + 1, socket.CMSG_SPACE(_UCRED.size)
                )
            except OSError:  # BlockingIOError: nothing queued; anything else: the socket is gone
                return
            self.received += 1
            pid = uid = None
            for level, kind, value in ancillary:
                if (
                    level == socket.SOL_SOCKET
                    and kind == socket.SCM_CREDENTIALS
                    and len(value) >= _UCRED.size
                ):
                    pid, uid, _ = _UCRED.unpack(value[: _UCRED.size])
            try:
                if flags & socket.MSG_TRUNC:
                    raise ValueError(f"an event datagram of more than {MAX_EVENT_DATAGRAM} bytes")
                event = check_job_event(data, run_id=self._journal.run_id, sender_pid=pid, sender_uid=uid)
                if pid is not None and not self._in_job(pid):
                    raise ValueError(f"sent by pid {pid}, which is not a live process of the job")
            except ValueError as exc:
                self._refuse(str(exc))
                answer(self._sock, address, data, str(exc))
                continue
            self._journal.write_event(event)
            answer(self._sock, address, data, None)

    def _in_job(self, pid: int) -> bool:
        if pid in self._members:
            return True
        self._members = {stat.pid for stat in self._job.scan()}
        return pid in self._members

    def _refuse(self, why: str) -> None:
        self.refused += 1
        kind = why.split(" ", 3)[:3]
        key = " ".join(kind)
        if key not in self._said:
            self._said.add(key)
            say(f"refusing an event from the job: {why}")
