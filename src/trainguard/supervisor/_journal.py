"""The run's events into the ledger, from one writer thread so that watching never waits on a disk.

The ledger is the default one ($TRAINGUARD_LEDGER, else $TRAINGUARD_HOME/ledger.db), signed with
$TRAINGUARD_LEDGER_KEY or the ledger's default key, as for every other command.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainguard.errors import StoreError, TrainguardError
from trainguard.ledger._events import new_event
from trainguard.ledger._keys import ALG_ED25519, SigningKey
from trainguard.ledger._ledger import Ledger, default_key_path

__all__ = ["Journal"]


def _describe(exc: BaseException) -> str:
    return exc.diagnostics() if isinstance(exc, TrainguardError) else f"{type(exc).__name__}: {exc}"


class _Item:
    __slots__ = ("done", "error", "event_type", "index", "payload", "rank")

    def __init__(self, event_type: str, payload: Mapping[str, Any], rank: int | None, wait: bool) -> None:
        self.event_type = event_type
        self.payload = payload
        self.rank = rank
        self.done = threading.Event() if wait else None
        self.error: BaseException | None = None
        self.index: int | None = None


class Journal:
    """Appends the events of one run (all carrying its run id) to the default ledger."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._ledger: Ledger | None = None
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="trainguard-journal", daemon=True)
        self._thread.start()

    def signing_key(self) -> SigningKey:
        """The ledger's signing key, which also signs the run attestation; StoreError if there is none."""
        key_file = os.environ.get("TRAINGUARD_LEDGER_KEY") or None
        path = Path(key_file) if key_file else default_key_path()
        try:
            return SigningKey.load(path, alg=ALG_ED25519)
        except TrainguardError as exc:
            raise StoreError(
                f"no key to sign the run attestation: {exc.message}",
                hint="set TRAINGUARD_LEDGER_KEY to the ledger's signing key",
            ) from None

    def open(self) -> None:
        """Open (creating if needed) the ledger now; StoreError if it cannot be written."""
        self.write_now("run.open", {}, check_only=True)

    def write(self, event_type: str, payload: Mapping[str, Any], *, rank: int | None = None) -> None:
        """Queue an event; a failure to write it is a warning."""
        self._queue.put(_Item(event_type, payload, rank, wait=False))

    def write_now(
        self,
        event_type: str,
        payload: Mapping[str, Any],
        *,
        rank: int | None = None,
        check_only: bool = False,
    ) -> int | None:
        """Write an event and wait for it; StoreError if it could not be written."""
        item = _Item(event_type, payload, rank, wait=True)
        if check_only:
            item.event_type = ""
        self._queue.put(item)
        if item.done is not None:
            item.done.wait()
        if item.error is not None:
            raise StoreError(
                f"could not record {event_type} in the ledger: {_describe(item.error)}",
                hint="check TRAINGUARD_HOME, TRAINGUARD_LEDGER and TRAINGUARD_LEDGER_KEY",
            ) from item.error
        return item.index

    def close(self) -> None:
        """Write what is queued, then close the ledger."""
        self._queue.put(None)
        self._thread.join()

    def _open(self) -> Ledger:
        if self._ledger is None:
            location = os.environ.get("TRAINGUARD_LEDGER") or None
            key_file = os.environ.get("TRAINGUARD_LEDGER_KEY") or None
            key = SigningKey.load(Path(key_file), alg=ALG_ED25519) if key_file else None
            self._ledger = Ledger.open(location, key=key)
            if not self._ledger.can_append:
                ledger, self._ledger = self._ledger, None
                ledger.close()
                raise StoreError(f"ledger {ledger.location} was opened without its signing key")
        return self._ledger

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                ledger = self._open()
                if item.event_type:
                    event = new_event(item.event_type, item.payload, run_id=self.run_id, rank=item.rank)
                    item.index = ledger.append(event)
            # Any failure of any store: the supervisor keeps watching the job and says what was lost.
            except Exception as exc:
                item.error = exc
                if self._ledger is not None:
                    self._ledger.close()
                    self._ledger = None
                if item.done is None and item.event_type not in self._warned:
                    self._warned.add(item.event_type)
                    what = f"{item.event_type} not recorded in the ledger"
                    print(f"trainguard: warning: {what}: {_describe(exc)}", file=sys.stderr)
            if item.done is not None:
                item.done.set()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
