"""Events from a supervised job to its `trainguard run` supervisor, which holds the server's token.

A process of the job (rank 0's guard, a `trainguard sign` it runs) sends each event as one datagram, the
event's RFC 8785 bytes and nothing else, to the AF_UNIX socket named in $TRAINGUARD_EVENTS. The supervisor
reads them with SO_PASSCRED, so the kernel, not the datagram, says which process sent each one, and
answers each on the sender's own (autobound) address: ``ok <tag>`` or ``no <tag> <why>``, the tag being the
first 32 hex digits of the datagram's SHA-256. The sender waits for that answer, so it is still alive, and
still a process of the job, when the supervisor looks at it.

sender = EventSender(os.environ[ENV_EVENTS])
sender.send(new_event("monitor.alert", {...}, run_id=run, rank=0))   # blocks at most `timeout` seconds

`check_job_event` is the supervisor's judgement of a datagram: an event of this run, of a type a job may
write (allowlisted), whose actor is the process the kernel names.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import Mapping

from trainguard.errors import TrainguardError
from trainguard.ledger._events import EntryError, Event
from trainguard.relay._fit import MAX_EVENT_BYTES, fit

__all__ = [
    "ENV_EVENTS",
    "JOB_EVENT_TYPES",
    "MAX_EVENT_DATAGRAM",
    "EventRefused",
    "EventSender",
    "EventUnconfirmed",
    "answer",
    "check_job_event",
]

ENV_EVENTS = "TRAINGUARD_EVENTS"
MAX_EVENT_DATAGRAM = MAX_EVENT_BYTES
_SEND_BUFFER = 1 << 20
_MAX_ANSWER = 4096


class EventRefused(TrainguardError):
    """The supervisor refused the event (its reason is in the message): sending it again changes nothing."""


class EventUnconfirmed(TrainguardError):
    """No answer came: the event may or may not be recorded, and is not sent again (it could be twice)."""


JOB_EVENT_TYPES: Mapping[str, str] = {
    "monitor.": "the guard's evidence: start, per-step summaries, alerts, signals, rollbacks, end",
    "provenance.": "checkpoint signings and verifications by `trainguard sign|verify` in the job",
    "env.": "environment snapshots and checks by `trainguard env` in the job",
}
"""Event type prefixes a job may send, with why. Everything else, `run.*` above all (the supervisor's own
account of the job), is refused: code in the job must not write the supervisor's evidence."""


class EventSender:
    """A socket to the supervisor; `send` waits while the supervisor's queue is full, up to `timeout`."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("")  # an abstract address of the kernel's choosing, where the answers come
        # Best effort: the kernel caps it at net.core.wmem_max, which still holds one large event.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        self._sock.settimeout(timeout)

    def send(self, event: Event) -> None:
        """Send `event` (split or replaced first when the server would not take it whole: `fit`) and wait
        for the supervisor's answer. TimeoutError while its queue is full (nothing was sent: try again);
        EventRefused; EventUnconfirmed; OSError when the supervisor is gone."""
        for part in fit(event, MAX_EVENT_DATAGRAM):
            data = part.canonical()
            self._sock.sendto(data, self.path)
            self._answer(_tag(data), part.type)

    def _answer(self, tag: bytes, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            self._sock.settimeout(left)
            try:
                reply = self._sock.recv(_MAX_ANSWER)
            except TimeoutError:
                break
            verdict, _, rest = reply.partition(b" ")
            got, _, why = rest.partition(b" ")
            if got != tag:
                continue  # the late answer to an earlier event
            if verdict == b"ok":
                return
            raise EventRefused(f"the supervisor refused the {what} event: {why.decode('utf-8', 'replace')}")
        self._sock.settimeout(self.timeout)
        raise EventUnconfirmed(
            f"the supervisor did not answer for the {what} event within {self.timeout:g} s"
        )

    def close(self) -> None:
        self._sock.close()


def _tag(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest()[:32].encode("ascii")


def answer(sock: socket.socket, address: object, data: bytes, refusal: str | None) -> None:
    """Tell a sender what became of its datagram, if it has an address to answer to; never waits."""
    if not address or not isinstance(address, (str, bytes)):
        return
    reply = b"ok " + _tag(data) if refusal is None else b"no " + _tag(data) + b" " + refusal.encode()[:3000]
    # A sender that is gone, or whose queue is full, learns by its own timeout.
    with contextlib.suppress(OSError):
        sock.sendto(reply, address)


def check_job_event(data: bytes, *, run_id: str, sender_pid: int | None, sender_uid: int | None) -> Event:
    """The event in a job's datagram; ValueError naming why it is refused."""
    if len(data) > MAX_EVENT_DATAGRAM:
        raise ValueError(f"an event datagram of more than {MAX_EVENT_DATAGRAM} bytes")
    try:
        event = Event.from_canonical(data)
    except EntryError as exc:
        raise ValueError(exc.message.removeprefix("entry ")) from None
    if sender_pid is None or sender_uid is None:
        raise ValueError("the kernel did not name the sender")
    if event.run_id != run_id:
        raise ValueError(f"a {event.type} event of run {event.run_id!r}, not this run")
    if not event.type.startswith(tuple(JOB_EVENT_TYPES)):
        raise ValueError(f"a job may not write {event.type!r} events")
    if event.actor.pid != sender_pid or event.actor.uid != sender_uid:
        raise ValueError(
            f"a {event.type} event claims pid {event.actor.pid} (uid {event.actor.uid}) but was sent by "
            f"pid {sender_pid} (uid {sender_uid})"
        )
    return event
