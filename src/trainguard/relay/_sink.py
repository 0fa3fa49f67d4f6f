"""A training job's events leave through a thread, to the supervisor or the server: a step never waits.

sink = RelaySink.to_supervisor(run_id, os.environ[ENV_EVENTS])     # under `trainguard run --server`
sink = RelaySink.to_server(run_id, settings)                        # plain torchrun with $TRAINGUARD_SERVER
sink.put("monitor.alert", {...})    # queued; the thread sends it (supervisor) or spools it (server)
sink.flush(timeout=5)               # wait until what was put has left the process or is durable
sink.close(timeout=30)              # the server's sink also delivers for up to `timeout` seconds

The same surface as the ledger's sink (`put`, `flush`, `close`, `failed`), so the guard does not care
where its events go. A failure is a warning in the job's log, never an exception in a training step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from trainguard.errors import StoreError, TrainguardError
from trainguard.ledger._events import Event, new_event
from trainguard.relay._destination import ServerSettings
from trainguard.relay._jobsocket import EventRefused, EventSender, EventUnconfirmed

__all__ = ["RelaySink"]

_LOG = logging.getLogger("trainguard.monitor")
_STOP = object()
_RETRY_PAUSE_S = 0.05


class _Out(Protocol):
    def send(self, events: list[Event], closing: bool) -> None: ...

    def close(self, timeout: float) -> None: ...


class RelaySink:
    """Events of one run, rank `rank`, sent from a background thread through `opener()`'s channel."""

    def __init__(self, run_id: str, opener: Callable[[], _Out], *, rank: int = 0) -> None:
        self.run_id = run_id
        self.rank = rank
        self.failed = False
        self._opener = opener
        self._closing = False
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="trainguard-relay", daemon=True)
        self._thread.start()

    @classmethod
    def to_supervisor(cls, run_id: str, path: str, *, rank: int = 0) -> RelaySink:
        return cls(run_id, lambda: _Supervisor(path), rank=rank)

    @classmethod
    def to_server(cls, run_id: str, settings: ServerSettings, *, rank: int = 0) -> RelaySink:
        return cls(run_id, lambda: _Server(run_id, settings), rank=rank)

    def put(self, event_type: str, payload: Mapping[str, Any]) -> None:
        self._queue.put((event_type, dict(payload)))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything put so far has left (or has failed)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self._closing = True
        self._queue.put((_STOP, timeout))
        self._thread.join(timeout + 15.0)

    def _run(self) -> None:
        try:
            out: _Out = self._opener()
        # The job goes on without its channel; the warning says why, bugs included.
        except Exception as exc:
            self._give_up(exc)
            return
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            events = [
                new_event(item[0], item[1], run_id=self.run_id, rank=self.rank)
                for item in batch
                if isinstance(item, tuple) and item[0] is not _STOP
            ]
            if events and not self.failed:
                try:
                    out.send(events, self._closing)
                except Exception as exc:
                    self._give_up(exc)
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            stops = [item[1] for item in batch if isinstance(item, tuple) and item[0] is _STOP]
            if stops:
                try:
                    out.close(float(stops[0]))
                except Exception as exc:
                    self._give_up(exc)
                return

    def _give_up(self, exc: Exception) -> None:
        self.failed = True
        message = exc.diagnostics() if isinstance(exc, TrainguardError) else f"{type(exc).__name__}: {exc}"
        _LOG.warning("trainguard: the monitor's events are not reported: %s", message)
        while True:  # unblock anyone waiting on a flush
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, threading.Event):
                item.set()


class _Supervisor:
    """Each event one datagram to the supervisor; a full queue there is waited out, never dropped, until
    the sink closes (then a bounded wait)."""

    def __init__(self, path: str) -> None:
        self._sender = EventSender(path, timeout=2.0)

    def send(self, events: list[Event], closing: bool) -> None:
        for event in events:
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    self._sender.send(event)
                    break
                except TimeoutError:  # the supervisor's queue is full: nothing went, so try again
                    if closing and time.monotonic() > deadline:
                        raise
                    time.sleep(_RETRY_PAUSE_S)
                except (EventRefused, EventUnconfirmed) as exc:
                    # One event lost (and said), not the sink: the next may well go.
                    _LOG.warning("trainguard: %s", exc.message)
                    break

    def close(self, timeout: float) -> None:
        self._sender.close()


class _Server:
    """The run's own spool and delivery (a job run without `trainguard run`, holding a token file)."""

    def __init__(self, run_id: str, settings: ServerSettings) -> None:
        from trainguard.relay._outbox import Outbox
        from trainguard.relay._whoami import ServerUnreachable, whoami

        token = settings.token()
        try:
            grant = whoami(settings.url, token)
        except ServerUnreachable as exc:
            _LOG.warning("trainguard: %s; the events wait in the spool", exc.message)
        else:
            if grant.run != run_id:
                raise StoreError(
                    f"the job token in {settings.token_file} is for run {grant.run!r}, but this job's run "
                    f"is {run_id!r}: the server would refuse every event",
                    hint=f"set TRAINGUARD_RUN_ID={grant.run} for the job, or give it the token of its run",
                )
        self._run_id = run_id
        self._outbox = Outbox.open(run_id, settings.url, token)

    def send(self, events: list[Event], closing: bool) -> None:
        self._outbox.put_many(events)

    def close(self, timeout: float) -> None:
        from trainguard.relay._outbox import leftover_message

        report = self._outbox.close(timeout)
        if (message := leftover_message(report, self._outbox.spool_path, self._run_id)) is not None:
            _LOG.warning("trainguard: %s", message)
