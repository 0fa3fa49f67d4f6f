"""What the server writes beside each append, in the append's own transaction (an `AppendHook`).

For every accepted event: one count in ``server_event_counts`` under its type label, and one outbox row per
webhook whose filter it matches. Both commit with the entries or not at all: an alert in the ledger always
gets its webhook, and an append that rolled back (a key conflict, a failed signature, a crash) sends none.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Sequence

from trainguard.ledger._store import Transaction
from trainguard.server._alerts import EventFilter, event_type_and_payload, type_label
from trainguard.server._eventkeys import AppendedEvent
from trainguard.server._sidetables import COUNTS, OUTBOX, WEBHOOKS, now_sql

__all__ = ["on_append"]


def on_append(tx: Transaction, run: str, appended: Sequence[AppendedEvent]) -> None:
    hooks = [
        (str(row[0]), EventFilter(str(row[1]))) for row in tx.query(f"SELECT id, events FROM {WEBHOOKS}")
    ]
    counts: Counter[str] = Counter()
    outbox: list[tuple[object, ...]] = []
    for event in appended:
        event_type, payload = event_type_and_payload(event.data)
        counts[type_label(event_type)] += 1
        outbox.extend(
            (secrets.token_hex(16), webhook_id, run, event.index, event.data)
            for webhook_id, events in hooks
            if events.matches(event_type, payload)
        )
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
