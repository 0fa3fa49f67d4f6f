"""The run's events into the ledger, from one writer thread so that watching never waits on a disk.

The ledger is the default one ($TRAINGUARD_LEDGER, else $TRAINGUARD_HOME/ledger.db), signed with
$TRAINGUARD_LEDGER_KEY or the ledger's default key, as for every other command. Under
`trainguard run --server` the events go to the run's spool instead, from which an Outbox delivers them.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard.errors import StoreError, TrainguardError
from trainguard.ledger._events import Event, new_event
from trainguard.ledger._keys import ALG_ED25519, SigningKey
from trainguard.ledger._ledger import Ledger, default_key_path

if TYPE_CHECKING:
    from trainguard.relay._delivery import DeliveryReport
    from trainguard.relay._outbox import Outbox

__all__ = ["Journal"]


def _describe(exc: BaseException) -> str:
    return exc.diagnostics() if isinstance(exc, TrainguardError) else f"{type(exc).__name__}: {exc}"


class _Item:
    __slots__ = ("done", "error", "event", "event_type", "index", "payload", "rank")

    def __init__(
        self,
        event_type: str,
        payload: Mapping[str, Any],
        rank: int | None,
        wait: bool,
        event: Event | None = None,
    ) -> None:
        self.event_type = event_type
        self.payload = payload
        self.rank = rank
        self.event = event  # made elsewhere (by a process of the job), recorded as it is
        self.done = threading.Event() if wait else None
        self.error: BaseException | None = None
        self.index: int | None = None


class Journal:
    """Appends the events of one run (all carrying its run id) to the default ledger, or to `outbox`.

    The job may send as many events as it likes, so with an outbox its events may fill only `JOB_SHARE`
    of the spool's bounds: a job that floods its socket while the server is away cannot crowd out the
    supervisor's own account of it (`run.rank_lost`, `run.exit`, `run.end`). The rest is refused and
    counted in `job_events_refused`.
    """

    JOB_SHARE = 0.5

    def __init__(self, run_id: str, *, outbox: Outbox | None = None) -> None:
        self.run_id = run_id
        self.outbox = outbox
        self.delivery: DeliveryReport | None = None
        """What the outbox had not delivered when the journal closed."""
        self.job_events_refused = 0
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._ledger: Ledger | None = None
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="trainguard-journal", daemon=True)
        self._thread.start()

    def signing_key(self) -> SigningKey | None:
        """The ledger's signing key, which also signs the run attestation; StoreError if there is none.

        Reporting to a server, this host need not hold one: None when neither $TRAINGUARD_LEDGER_KEY nor
        the default key exists (the server's ledger then vouches for the attestation as it stores it)."""
        key_file = os.environ.get("TRAINGUARD_LEDGER_KEY") or None
        path = Path(key_file) if key_file else default_key_path()
        if self.outbox is not None and key_file is None and not path.exists():
            return None
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

    def write_event(self, event: Event) -> None:
        """Queue an event made by a process of the job (already checked), recorded byte for byte."""
        self._queue.put(_Item(event.type, event.payload, event.rank, wait=False, event=event))

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

    def drain(self) -> None:
        """Wait until every event queued so far is written (or has failed)."""
        self.write_now("run.drain", {}, check_only=True)

    def close(self, flush_timeout: float = 30.0) -> None:
        """Write what is queued, then close the ledger; or deliver for at most `flush_timeout` seconds and
        keep in `delivery` what the outbox still holds."""
        self._queue.put(None)
        self._thread.join()
        if self.outbox is None:
            return
        if (problem := self.outbox.file_problem()) is not None:
            # Said to the server too, while the open connection still holds the events.
            print(f"trainguard: warning: {problem}", file=sys.stderr)
            try:
                self.outbox.put(new_event("run.spool_replaced", {"problem": problem}, run_id=self.run_id))
            except TrainguardError as exc:
                lost = f"run.spool_replaced not spooled: {_describe(exc)}"
                print(f"trainguard: warning: {lost}", file=sys.stderr)
        self.delivery = self.outbox.close(flush_timeout)

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

    def _room_for_the_job(self, outbox: Outbox) -> bool:
        limits, stats = outbox.spool.limits, outbox.spool.stats()
        share = self.JOB_SHARE
        if stats.events < limits.max_events * share and stats.bytes < limits.max_bytes * share:
            return True
        self.job_events_refused += 1
        if self.job_events_refused == 1:
            print(
                f"trainguard: warning: the spool holds {stats.events} events ({stats.bytes} bytes), the "
                "job's share of it: its further events are refused while the server does not take them",
                file=sys.stderr,
            )
        return False

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                event = item.event
                if item.event_type and event is None:
                    event = new_event(item.event_type, item.payload, run_id=self.run_id, rank=item.rank)
                if self.outbox is not None:
                    if event is not None and (item.event is None or self._room_for_the_job(self.outbox)):
                        self.outbox.put(event)  # durable in the spool; the index is the server's to give
                else:
                    ledger = self._open()
                    if event is not None:
                        item.index = ledger.append(event)
            # Any failure of any store: the supervisor keeps watching the job and says what was lost.
            except Exception as exc:
                item.error = exc
                if self._ledger is not None:
                    self._ledger.close()
                    self._ledger = None
                if item.done is None and item.event_type not in self._warned:
                    self._warned.add(item.event_type)
                    where = "the spool" if self.outbox is not None else "the ledger"
                    what = f"{item.event_type} not recorded in {where}"
                    print(f"trainguard: warning: {what}: {_describe(exc)}", file=sys.stderr)
            if item.done is not None:
                item.done.set()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
