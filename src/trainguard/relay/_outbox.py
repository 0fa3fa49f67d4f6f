"""A run's events on their way to the server: spooled durably first, then delivered from a thread.

outbox = Outbox.open("r42", settings.url, token)   # the run's spool file, and a delivery thread
outbox.put(event)                                  # durable when it returns; never waits on the network
report = outbox.close(timeout=30)                  # what is left stays in outbox.spool_path
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainguard.ledger._events import Event
from trainguard.relay._delivery import Delivery, DeliveryLimits, DeliveryReport
from trainguard.relay._fit import fit
from trainguard.relay._spool import Spool, SpoolLimits

__all__ = ["Outbox", "leftover_message"]


class Outbox:
    """One run's Spool and the Delivery that empties it."""

    def __init__(self, spool: Spool, delivery: Delivery) -> None:
        self.spool = spool
        self.delivery = delivery
        self.spool_path: Path = spool.path
        self._identity = _file_identity(spool.path)

    def file_problem(self) -> str | None:
        """Whether the spool file is still the one opened: a job (same user) can delete or replace it,
        and the events not yet delivered would then go with the open connection when it closes."""
        if self._identity is None or _file_identity(self.spool_path) != self._identity:
            return f"the spool file {self.spool_path} was removed or replaced while the run went on"
        return None

    @classmethod
    def open(
        cls,
        run_id: str,
        url: str,
        token: str,
        *,
        spool_path: Path | None = None,
        spool_limits: SpoolLimits | None = None,
        delivery_limits: DeliveryLimits | None = None,
    ) -> Outbox:
        """StoreError when the spool cannot be opened; UsageError for a bad URL or token."""
        spool = Spool.open(run_id, path=spool_path, limits=spool_limits)
        try:
            delivery = Delivery(spool, url, token, limits=delivery_limits)
        except BaseException:
            spool.close()
            raise
        return cls(spool, delivery)

    def put(self, event: Event) -> list[str]:
        """Spool `event` (SpoolFull, StoreError, UsageError as Spool.put) and wake the delivery; an event
        larger than the server takes is split or replaced first (`fit`), hence the list of keys."""
        return self.put_many([event])

    def put_many(self, events: Sequence[Event]) -> list[str]:
        keys = self.spool.put_many([part for event in events for part in fit(event)])
        self.delivery.wake()
        return keys

    def close(self, timeout: float) -> DeliveryReport:
        """Deliver for at most `timeout` seconds; the report says what is still spooled."""
        try:
            return self.delivery.close(timeout)
        finally:
            self.spool.close()


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def leftover_message(report: DeliveryReport, spool_path: Path, run_id: str) -> str | None:
    """What a person must know when events were not delivered: how many, where, and how to send them."""
    if report.remaining == 0 and not report.gap_pending:
        return None
    if report.remaining is None:
        held = "an unknown number of events (the spool could not be read)"
    else:
        held = f"{report.remaining} event(s)"
    why = f" ({report.stopped or report.last_error})" if (report.stopped or report.last_error) else ""
    return (
        f"{held} of run {run_id} not yet delivered to the server{why}; they stay in {spool_path}: "
        f"`trainguard spool push --run {run_id}` delivers them"
    )
