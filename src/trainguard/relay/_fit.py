"""Events made to fit what the server stores: at most `MAX_EVENT_BYTES` of canonical JSON each.

A larger event would be refused (413) and, refused again at every try, would hold up every event behind it
in the spool. So an event whose payload carries its data as `rows` (the guard's per-step summaries) is
split into several events of the same type, each with a part of the rows and `"part": [i, n]`; any other
event too large is replaced by a `<its type>.too_large` event that names its size and SHA-256, so that the
server records what was lost instead of nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

from trainguard.ledger._events import Event
from trainguard.ledger._tiles import MAX_BUNDLED_ENTRY_BYTES

__all__ = ["MAX_EVENT_BYTES", "TOO_LARGE_SUFFIX", "fit"]

MAX_EVENT_BYTES = MAX_BUNDLED_ENTRY_BYTES
"""The largest event the server takes: one that fits in a C2SP tlog-tiles entry bundle."""
TOO_LARGE_SUFFIX = ".too_large"


def fit(event: Event, limit: int = MAX_EVENT_BYTES) -> list[Event]:
    """`event` as one or more events of at most `limit` bytes each (UsageError as Event.canonical)."""
    size = len(event.canonical())
    if size <= limit:
        return [event]
    rows = event.payload.get("rows")
    if isinstance(rows, list) and len(rows) > 1:
        parts = _split(event, rows, limit)
        if parts is not None:
            return parts
    return [_stand_in(event, size)]


def _split(event: Event, rows: list[Any], limit: int) -> list[Event] | None:
    """The rows in as few parts as fit, or None when a single row is already too large."""
    count = 2
    while True:
        step = -(-len(rows) // count)
        chunks = [rows[i : i + step] for i in range(0, len(rows), step)]
        parts = [
            dataclasses.replace(event, payload=_with(event.payload, rows=chunk, part=[i + 1, len(chunks)]))
            for i, chunk in enumerate(chunks)
        ]
        if all(len(part.canonical()) <= limit for part in parts):
            return parts
        if count >= len(rows):
            return None
        count = min(2 * count, len(rows))


def _with(payload: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    return {**payload, **changes}


def _stand_in(event: Event, size: int) -> Event:
    digest = hashlib.sha256(event.canonical()).hexdigest()
    payload = {"bytes": size, "sha256": digest, "limit": MAX_EVENT_BYTES}
    # The type keeps its prefix: the supervisor takes a job's `monitor.*` stand-in as it would the event.
    return dataclasses.replace(event, type=event.type + TOO_LARGE_SUFFIX, payload=payload)
