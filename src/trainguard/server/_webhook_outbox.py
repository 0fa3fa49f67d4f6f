"""The webhook outbox queue: claim due rows, then mark each delivered, retried later or failed.

A claim is one UPDATE ... RETURNING that sets a lease and bumps ``attempts``: on PostgreSQL its rows are
chosen with ``FOR UPDATE SKIP LOCKED``, on SQLite the statement runs under the database's single writer
lock; either way two workers never claim one row together, and a row under lease is not claimed again
until the lease ends (longer than a delivery may take). ``attempts`` doubles as a fencing token: a worker
records the outcome only if the row still carries the attempt it claimed, so a worker that stalled past
its lease cannot overwrite what the next one did.

Nothing is dropped silently: a row ends ``delivered`` or, after its last attempt, ``failed`` (with the
last error), both visible in `trainguard server webhook deliveries` and in /metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainguard.server._sidetables import OUTBOX, SideDb

__all__ = ["Claimed", "DeliveryRow", "Outbox"]

_STATES = ("pending", "delivered", "failed")
_MAX_ERROR = 300


@dataclass(frozen=True)
class Claimed:
    """One outbox row this worker holds a lease on."""

    delivery_id: str
    webhook_id: str
    run: str
    ledger_index: int
    event: bytes
    attempt: int


@dataclass(frozen=True)
class DeliveryRow:
    """One outbox row, for people: never the event's content, never a secret."""

    delivery_id: str
    webhook_id: str
    run: str
    ledger_index: int
    state: str
    attempts: int
    last_error: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "delivery_id": self.delivery_id,
            "webhook_id": self.webhook_id,
            "run": self.run,
            "ledger_index": self.ledger_index,
            "state": self.state,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


class Outbox:
    """The queue in ``server_webhook_outbox``, through one SideDb connection."""

    def __init__(self, db: SideDb) -> None:
        self._db = db

    def claim(self, limit: int, lease_s: float) -> list[Claimed]:
        now = self._db.now
        lock = " FOR UPDATE SKIP LOCKED" if self._db.dialect == "postgresql" else ""
        rows = self._db.rows(
            f"UPDATE {OUTBOX} SET lease_until = {now} + ?, attempts = attempts + 1"
            f" WHERE delivery_id IN (SELECT delivery_id FROM {OUTBOX} WHERE state = 'pending'"
            f" AND next_at <= {now} AND (lease_until IS NULL OR lease_until <= {now})"
            f" ORDER BY ledger_index LIMIT ?{lock})"
            " RETURNING delivery_id, webhook_id, run, ledger_index, event, attempts",
            (lease_s, limit),
        )
        claimed = [Claimed(str(r[0]), str(r[1]), str(r[2]), int(r[3]), bytes(r[4]), int(r[5])) for r in rows]
        return sorted(claimed, key=lambda c: c.ledger_index)

    def delivered(self, row: Claimed) -> bool:
        """Mark `row` delivered; False when its lease was lost to another worker meanwhile."""
        return self._finish(row, "delivered", None)

    def failed(self, row: Claimed, error: str) -> bool:
        """Mark `row` failed for good (its last attempt, or its webhook is gone)."""
        return self._finish(row, "failed", error)

    def retry(self, row: Claimed, error: str, delay_s: float) -> bool:
        """Give `row` back, due again in `delay_s` seconds."""
        changed = self._db.write(
            f"UPDATE {OUTBOX} SET lease_until = NULL, next_at = {self._db.now} + ?, last_error = ?"
            " WHERE delivery_id = ? AND attempts = ? AND state = 'pending'",
            (delay_s, _clip(error), row.delivery_id, row.attempt),
        )
        return changed == 1

    def _finish(self, row: Claimed, state: str, error: str | None) -> bool:
        changed = self._db.write(
            f"UPDATE {OUTBOX} SET state = ?, lease_until = NULL, done_at = {self._db.now},"
            " last_error = COALESCE(?, last_error)"
            " WHERE delivery_id = ? AND attempts = ? AND state = 'pending'",
            (state, None if error is None else _clip(error), row.delivery_id, row.attempt),
        )
        return changed == 1

    def counts(self) -> dict[str, int]:
        """How many rows are in each state (every state named, zero included)."""
        found = {
            str(s): int(n) for s, n in self._db.rows(f"SELECT state, count(*) FROM {OUTBOX} GROUP BY state")
        }
        return {state: found.get(state, 0) for state in _STATES}

    def rows(self, state: str | None, limit: int) -> list[DeliveryRow]:
        """The newest `limit` rows, of one state or all."""
        where, params = ("WHERE state = ?", [state]) if state is not None else ("", [])
        found = self._db.rows(
            f"SELECT delivery_id, webhook_id, run, ledger_index, state, attempts, last_error FROM {OUTBOX}"
            f" {where} ORDER BY created_at DESC, ledger_index DESC LIMIT ?",
            [*params, limit],
        )
        return [
            DeliveryRow(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), int(r[5]), r[6]) for r in found
        ]

    def requeue_failed(self, delivery_id: str | None) -> int:
        """Make failed rows (one, or all when None) pending again with fresh attempts; how many."""
        where, params = ("AND delivery_id = ?", [delivery_id]) if delivery_id is not None else ("", [])
        return self._db.write(
            f"UPDATE {OUTBOX} SET state = 'pending', attempts = 0, next_at = {self._db.now},"
            f" lease_until = NULL, done_at = NULL WHERE state = 'failed' {where}",
            params,
        )

    def prune(self, keep_s: float) -> int:
        """Forget delivered rows older than `keep_s` seconds (failed rows stay until requeued)."""
        return self._db.write(
            f"DELETE FROM {OUTBOX} WHERE state = 'delivered' AND done_at < {self._db.now} - ?", (keep_s,)
        )


def _clip(error: str) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in error)
    return text[:_MAX_ERROR]
