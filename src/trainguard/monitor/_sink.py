"""Rank 0's writer to the ledger: events are appended by a background thread, in batches.

A training step never waits for the ledger, except when the job is about to stop: `flush()` makes
sure the alert that stops it is recorded before the exception leaves. A ledger that cannot be opened
or written is a loud warning, not a crash of the training job.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from trainguard.errors import TrainguardError

if TYPE_CHECKING:
    from trainguard.relay._sink import RelaySink

__all__ = ["LedgerSink", "open_sink"]

_LOG = logging.getLogger("trainguard.monitor")
_STOP = object()


def open_sink(run_id: str) -> LedgerSink | RelaySink:
    """Where rank 0's events go: to the supervisor under `trainguard run --server` (the job holds no
    token), to the server with $TRAINGUARD_SERVER and its token file, else to the ledger. Settings that
    name half a server are a warning, and the events go nowhere rather than to the wrong place."""
    from trainguard.relay._destination import server_settings
    from trainguard.relay._jobsocket import ENV_EVENTS
    from trainguard.relay._sink import RelaySink

    if path := os.environ.get(ENV_EVENTS):
        return RelaySink.to_supervisor(run_id, path)
    try:
        settings = server_settings()
    except TrainguardError as exc:
        return RelaySink(run_id, _raiser(exc))
    return LedgerSink(run_id) if settings is None else RelaySink.to_server(run_id, settings)


def _raiser(exc: TrainguardError) -> Callable[[], NoReturn]:
    def fail() -> NoReturn:
        raise exc

    return fail


class LedgerSink:
    """Appends events to the default ledger ($TRAINGUARD_LEDGER, else $TRAINGUARD_HOME) from a thread."""

    def __init__(self, run_id: str, *, location: str | None = None) -> None:
        self.run_id = run_id
        self.location = location or os.environ.get("TRAINGUARD_LEDGER") or None
        self.failed = False
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="trainguard-ledger", daemon=True)
        self._thread.start()

    def put(self, event_type: str, payload: Mapping[str, Any]) -> None:
        self._queue.put((event_type, dict(payload)))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything put so far is written (or has failed)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        from trainguard.ledger._events import new_event
        from trainguard.ledger._keys import ALG_ED25519, SigningKey
        from trainguard.ledger._ledger import Ledger

        try:
            key_file = os.environ.get("TRAINGUARD_LEDGER_KEY") or None
            key = SigningKey.load(Path(key_file), alg=ALG_ED25519) if key_file else None
            ledger = Ledger.open(self.location, key=key)
        # The job must go on without a ledger; the warning says why, bugs included.
        except Exception as exc:
            self._give_up(exc)
            return
        with ledger:
            while True:
                batch = [self._queue.get()]
                while not self._queue.empty():
                    batch.append(self._queue.get())
                events = [
                    new_event(item[0], item[1], run_id=self.run_id, rank=0)
                    for item in batch
                    if isinstance(item, tuple)
                ]
                if events and not self.failed:
                    try:
                        ledger.append_many(events)
                    except Exception as exc:
                        self._give_up(exc)
                for item in batch:
                    if isinstance(item, threading.Event):
                        item.set()
                if any(item is _STOP for item in batch):
                    return

    def _give_up(self, exc: Exception) -> None:
        self.failed = True
        message = exc.diagnostics() if isinstance(exc, TrainguardError) else f"{type(exc).__name__}: {exc}"
        _LOG.warning(
            "trainguard: the monitor cannot write to the ledger, events are not recorded: %s", message
        )
        # Unblock anyone waiting on a flush.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, threading.Event):
                item.set()
