"""What the server writes beside each append, in the append's own transaction (an `AppendHook`).

For every accepted event: one count in ``server_event_counts`` under its type label, and one outbox row per
webhook whose filter it matches. Both commit with the entries or not at all: an alert in the ledger always
gets its webhook, and an append that rolled back (a key conflict, a failed signature, a crash) sends none.

At most `MAX_PENDING_PER_RUN` deliveries of one run wait for one webhook. A job token (stolen, or a job gone
wrong) may append a thousand alerts a batch, and on-call must not be paged a thousand times for one run:
the first event over the limit is sent as one ``webhook.suppressed`` notice (not a ledger entry; its
`ledger_index` is the first event not sent), and the run's later events wait in the ledger, on the dashboard
and in /metrics, unsent, until its backlog drains below the limit.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence

from trainguard.ledger._canonical import canonical_json
from trainguard.ledger._store import Transaction
from trainguard.server._alerts import EventFilter, event_type_and_payload, type_label
from trainguard.server._eventkeys import AppendedEvent
from trainguard.server._sidetables import COUNTS, OUTBOX, WEBHOOKS, now_sql

__all__ = ["MAX_PENDING_PER_RUN", "SUPPRESSED", "on_append"]

MAX_PENDING_PER_RUN = 100
SUPPRESSED = "webhook.suppressed"


def on_append(tx: Transaction, run: str, appended: Sequence[AppendedEvent]) -> None:
    hooks = [
        (str(row[0]), EventFilter(str(row[1]))) for row in tx.query(f"SELECT id, events FROM {WEBHOOKS}")
    ]
    counts: Counter[str] = Counter()
    outbox: list[tuple[object, ...]] = []
    pending: Counter[str] | None = None
    for event in appended:
        event_type, payload = event_type_and_payload(event.data)
        counts[type_label(event_type)] += 1
        for webhook_id, events in hooks:
            if not events.matches(event_type, payload):
                continue
            if pending is None:
                pending = _pending(tx, run)
            waiting = pending[webhook_id]
            if waiting <= MAX_PENDING_PER_RUN:
                data = event.data if waiting < MAX_PENDING_PER_RUN else _notice(run, event.index)
                outbox.append((secrets.token_hex(16), webhook_id, run, event.index, data))
                pending[webhook_id] += 1
    tx.executemany(
        f"INSERT INTO {COUNTS} (type, events) VALUES (?, ?)"
        f" ON CONFLICT (type) DO UPDATE SET events = {COUNTS}.events + excluded.events",
        sorted(counts.items()),
    )
    if outbox:
        now = now_sql(tx.dialect)
        tx.executemany(
            f"INSERT INTO {OUTBOX} (delivery_id, webhook_id, run, ledger_index, event, state, attempts,"
            f" next_at, created_at) VALUES (?, ?, ?, ?, ?, 'pending', 0, {now}, {now})",
            outbox,
        )


def _pending(tx: Transaction, run: str) -> Counter[str]:
    """How many deliveries of `run` wait, per webhook."""
    rows = tx.query(
        f"SELECT webhook_id, count(*) FROM {OUTBOX} WHERE run = ? AND state = 'pending' GROUP BY webhook_id",
        (run,),
    )
    return Counter({str(webhook_id): int(n) for webhook_id, n in rows})


def _notice(run: str, first_unsent: int) -> bytes:
    return canonical_json(
        {
            "type": SUPPRESSED,
            "run_id": run,
            "payload": {
                "pending": MAX_PENDING_PER_RUN,
                "first_index_not_sent": first_unsent,
                "message": f"{MAX_PENDING_PER_RUN} deliveries of run {run} wait for this webhook: its later "
                f"events are not sent until they are delivered; every one is in the ledger, from index "
                f"{first_unsent}",
            },
        }
    )
