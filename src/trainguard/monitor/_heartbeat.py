"""Heartbeats from the ranks of a job to the `trainguard run` supervisor on the same host.

Each rank sends small JSON datagrams over the supervisor's AF_UNIX SOCK_DGRAM socket (its path is in
$TRAINGUARD_HEARTBEAT): a "beat" every `interval` seconds from a daemon thread, a "signal" when the rank
is sent a catchable signal, a "report" from the guard at every step (what its checks found), a "bye" on a
clean exit. A rank that stops beating without a "bye" is lost,
and the supervisor finds out why. Standard library only: rank processes import this module.

    {"v": 1, "kind": "beat", "rank": 3, "pid": 4242, "step": 57, "time": 1767225600.5, "payload": {}}

Datagrams are never pickled; the receiver parses them with `parse_datagram`, which refuses anything
that is not exactly this shape.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Mapping

__all__ = [
    "ENV_RUN_ID",
    "ENV_SOCKET",
    "KINDS",
    "MAX_DATAGRAM",
    "Datagram",
    "HeartbeatSender",
    "encode_datagram",
    "parse_datagram",
]

ENV_SOCKET = "TRAINGUARD_HEARTBEAT"
ENV_RUN_ID = "TRAINGUARD_RUN_ID"
VERSION = 1
MAX_DATAGRAM = 4096
KINDS = frozenset({"beat", "signal", "bye", "report"})
_KEYS = frozenset({"v", "kind", "rank", "pid", "step", "time", "payload"})
_MAX_INT = 2**53 - 1
_MAX_TEXT = 1024  # longer payload strings are cut so that a datagram fits in MAX_DATAGRAM
# Datagrams that must not be lost are retried this often when the supervisor's queue is full.
_URGENT_TRIES = 20
_URGENT_PAUSE_S = 0.005

log = logging.getLogger("trainguard")


@dataclasses.dataclass(frozen=True)
class Datagram:
    """One parsed heartbeat datagram."""

    kind: str
    rank: int
    pid: int
    step: int
    time: float
    payload: Mapping[str, object]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def parse_datagram(data: bytes) -> Datagram:
    """The datagram in `data`; ValueError unless it is exactly a version 1 heartbeat of a known kind."""
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(data)} bytes, above {MAX_DATAGRAM}")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.keys() != _KEYS:
        raise ValueError("not a heartbeat object")
    if doc["v"] != VERSION or isinstance(doc["v"], bool):
        raise ValueError(f"unknown version {doc['v']!r}")
    kind, stamp, payload = doc["kind"], doc["time"], doc["payload"]
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    for name in ("rank", "pid", "step"):
        if not _is_int(doc[name]):
            raise ValueError(f"{name} is not a non-negative integer")
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
        raise ValueError("time is not a number")
    if not isinstance(payload, dict):
        raise ValueError("payload is not an object")
    return Datagram(kind, doc["rank"], doc["pid"], doc["step"], float(stamp), payload)


def _shorten(value: object) -> object:
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return value[:_MAX_TEXT] + "..."
    return value


def encode_datagram(kind: str, rank: int, step: int, payload: Mapping[str, object]) -> bytes:
    """The JSON bytes of a datagram from this process; long strings are cut, and a payload that still
    does not fit (or is not JSON) is replaced by one that says so."""
    doc = {
        "v": VERSION,
        "kind": kind,
        "rank": rank,
        "pid": os.getpid(),
        "step": step,
        "time": time.time(),
        "payload": {str(k): _shorten(v) for k, v in payload.items()},
    }
    try:
        data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):
        data = b""
    if not data or len(data) > MAX_DATAGRAM:
        doc["payload"] = {"truncated": True}
        data = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return data


class HeartbeatSender:
    """Beats to the supervisor from a daemon thread; `send` sends one datagram now.

    Sending never raises into the training job: a full queue drops a beat, and a supervisor that is
    gone is reported once as a warning and then ignored.
    """

    def __init__(self, path: str, rank: int, *, interval: float = 0.25) -> None:
        if not _is_int(rank):
            raise ValueError(f"rank must be a non-negative integer, not {rank!r}")
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.path = path
        self.rank = rank
        self.interval = interval
        self._step = 0
        self._warned = False
        self._lock = threading.Lock()  # one socket, used by the beat thread and the caller's thread
        self._stop = threading.Event()
        self._closed = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._send("beat", {}, urgent=False)
        self._thread = threading.Thread(target=self._beat, name="trainguard-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(cls, rank: int) -> HeartbeatSender | None:
        """A sender to the socket named in $TRAINGUARD_HEARTBEAT, or None when the job has no supervisor."""
        path = os.environ.get(ENV_SOCKET)
        return cls(path, rank) if path else None

    def set_step(self, step: int) -> None:
        self._step = step

    def send(self, kind: str, payload: Mapping[str, object]) -> None:
        """Send one datagram now (e.g. kind "signal"), retried briefly while the receiver is full."""
        if not self._closed:
            self._send(kind, payload, urgent=True)

    def close(self) -> None:
        """Say "bye" (a clean exit, not a lost rank) and stop beating. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, 2 * self.interval))
        self._send("bye", {}, urgent=True)
        self._closed = True
        with self._lock:
            self._sock.close()

    def __enter__(self) -> HeartbeatSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self._send("beat", {}, urgent=False)

    def _send(self, kind: str, payload: Mapping[str, object], *, urgent: bool) -> None:
        try:
            data = encode_datagram(kind, self.rank, int(self._step), payload)
            for _ in range(_URGENT_TRIES if urgent else 1):
                if self._try(data):
                    return
                time.sleep(_URGENT_PAUSE_S)  # the supervisor's queue is full: drop a beat, retry others
        # A heartbeat must never break the job it reports on; the warning names what went wrong.
        except Exception as exc:
            self._gone(exc)

    def _try(self, data: bytes) -> bool:
        """Send `data`; False while the receiver's queue is full. A failure of another kind is final."""
        try:
            with self._lock:
                self._sock.sendto(data, self.path)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOBUFS, errno.EAGAIN):
                return False
            self._gone(exc)
        return True

    def _gone(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "trainguard: heartbeats to the supervisor at %s fail (%s); rank %d goes on without them",
                self.path,
                exc,
                self.rank,
            )
