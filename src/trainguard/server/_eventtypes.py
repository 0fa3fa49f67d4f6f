"""The ``server_event_types(run, type, ledger_index)`` table: which of a run's entries are of which type.

The dashboard reads a run's alerts, checkpoints and summaries through it, so a page costs an index range,
never a scan of the run's events. `index_types` is an append hook (`EventKeys` runs it in the append's
own transaction): the rows commit with the entries or not at all. `create_type_table` makes the table and,
the first time, fills it from the event keys and entries already stored, under the ledger's writer lock,
so no append can slip between the fill and the hook.

The type recorded is the one the event had when it was appended. A page still parses each entry it shows:
an entry whose bytes now carry another type (a row edited in the database) is shown as such.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from trainguard.ledger._store import Store, Transaction
from trainguard.server._eventkeys import KEYS_TABLE, AppendedEvent

__all__ = [
    "END_TYPES",
    "START_TYPES",
    "TYPES_TABLE",
    "UNREADABLE",
    "any_of_query",
    "create_type_table",
    "index_types",
]

TYPES_TABLE = "server_event_types"
_CREATE = {
    "sqlite": f"CREATE TABLE {TYPES_TABLE} (run TEXT NOT NULL, type TEXT NOT NULL,"
    " ledger_index INTEGER NOT NULL, PRIMARY KEY (run, type, ledger_index)) WITHOUT ROWID",
    "postgresql": f"CREATE TABLE {TYPES_TABLE} (run text NOT NULL, type text NOT NULL,"
    " ledger_index bigint NOT NULL, PRIMARY KEY (run, type, ledger_index))",
}
_EXISTS = {
    "sqlite": "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
    "postgresql": "SELECT 1 WHERE to_regclass(?) IS NOT NULL",
}
_FILL_CHUNK = 2000
_INSERT = f"INSERT INTO {TYPES_TABLE} (run, type, ledger_index) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
UNREADABLE = "(unreadable)"
"""The type recorded for an entry that did not parse when the table was filled."""
START_TYPES = ("run.start", "monitor.start")
END_TYPES = ("run.end", "monitor.end")
"""A run whose events include one of these has ended."""


def any_of_query(run: str, types: Sequence[str]) -> tuple[str, list[object]]:
    """SQL and parameters answering one row when `run` holds an event of one of `types`, else none."""
    marks = ",".join("?" * len(types))
    return f"SELECT 1 FROM {TYPES_TABLE} WHERE run = ? AND type IN ({marks}) LIMIT 1", [run, *types]


def create_type_table(store: Store) -> None:
    """Make the table when it is missing, filled from the events the server appended before it existed."""
    store.transaction(_create)


def _create(tx: Transaction) -> None:
    if tx.query(_EXISTS[tx.dialect], (TYPES_TABLE,)):
        return
    tx.execute(_CREATE[tx.dialect])
    if not tx.query(_EXISTS[tx.dialect], (KEYS_TABLE,)):
        return
    after: tuple[str, int] = ("", -1)
    while True:
        rows = tx.query(
            f"SELECT k.run, k.ledger_index, e.data FROM {KEYS_TABLE} k"
            " JOIN entries e ON e.idx = k.ledger_index WHERE k.run > ? OR (k.run = ? AND k.ledger_index > ?)"
            " ORDER BY k.run, k.ledger_index LIMIT ?",
            (after[0], after[0], after[1], _FILL_CHUNK),
        )
        if not rows:
            return
        tx.executemany(_INSERT, [(str(run), _type_of(bytes(data)), int(index)) for run, index, data in rows])
        after = (str(rows[-1][0]), int(rows[-1][1]))


def index_types(tx: Transaction, run: str, appended: Sequence[AppendedEvent]) -> None:
    """The append hook: one row per event appended to `run`."""
    tx.executemany(_INSERT, [(run, _type_of(event.data), event.index) for event in appended])


def _type_of(data: bytes) -> str:
    """The event's type; events reach the ledger through the server only once they parsed as events."""
    try:
        kind = json.loads(data)["type"]
    except (ValueError, KeyError, TypeError):
        return UNREADABLE  # only a row edited in the database before the fill: shown, never dropped
    return kind if isinstance(kind, str) else UNREADABLE
