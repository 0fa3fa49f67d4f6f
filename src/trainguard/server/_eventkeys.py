"""Idempotent appends: the ``server_event_keys(run, key, ledger_index)`` table beside the ledger.

The key rows are written by `Store.append_batch`'s `within` callback, inside the transaction that appends
the events and under the ledger's writer lock (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock): the
key rows and the entries commit together or not at all. A batch first drops the keys already stored; then
its append claims the rest with ``INSERT ... ON CONFLICT DO NOTHING`` and, when fewer rows went in than it
claimed (a racing worker or host stored some of them between the read and the lock), raises, so the
transaction rolls back and the batch is tried again without them. The primary key decides, never a check
in the process.

The key is unique per run, not globally: a job token can never make another run's event read as a
duplicate by sending its key first. The table doubles as the index of a run's entries (`ledger_index`),
so reading one run never scans the whole log.
"""

from __future__ import annotations

from collections.abc import Sequence

from trainguard.errors import StoreError
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._note import sign_checkpoint
from trainguard.ledger._store import Store, Transaction

__all__ = ["KEYS_TABLE", "EventKeys"]

KEYS_TABLE = "server_event_keys"
_CREATE = {
    "sqlite": f"CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (run TEXT NOT NULL, key TEXT NOT NULL,"
    " ledger_index INTEGER NOT NULL, PRIMARY KEY (run, key)) WITHOUT ROWID",
    "postgresql": f"CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (run text NOT NULL, key text NOT NULL,"
    " ledger_index bigint NOT NULL, PRIMARY KEY (run, key))",
}
_INDEX = f"CREATE INDEX IF NOT EXISTS {KEYS_TABLE}_by_index ON {KEYS_TABLE} (run, ledger_index)"
_CHUNK = 500


class _KeyClaimed(Exception):
    """Another writer stored one of the batch's keys after we looked: roll back and look again."""


class EventKeys:
    """The run-scoped idempotency keys of `store`, whose appends are signed with `key`."""

    def __init__(self, store: Store, key: SigningKey) -> None:
        self._store = store
        self._key = key
        store.transaction(_create_table)  # under the writer lock: two workers creating it do not collide

    def known(self, run: str, keys: Sequence[str]) -> set[str]:
        """Which of `keys` the run already holds."""
        found: set[str] = set()
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            rows = self._store.read(
                f"SELECT key FROM {KEYS_TABLE} WHERE run = ? AND key IN ({','.join('?' * len(chunk))})",
                [run, *chunk],
            )
            found.update(str(row[0]) for row in rows)
        return found

    def append(self, run: str, items: Sequence[tuple[str, bytes]]) -> tuple[list[str], list[str]]:
        """Append the events whose keys the run does not hold yet; (accepted keys, duplicate keys)."""
        keys = [key for key, _ in items]
        # Each retry follows another writer's commit that took at least one of these keys: bounded.
        for _ in range(len(items) + 1):
            known = self.known(run, keys)
            fresh = [(key, data) for key, data in items if key not in known]
            if not fresh:
                return [], keys
            fresh_keys = [key for key, _ in fresh]

            def claim(tx: Transaction, first: int, fresh_keys: list[str] = fresh_keys) -> None:
                rows = [(run, key, first + i) for i, key in enumerate(fresh_keys)]
                if _insert_keys(tx, rows) != len(rows):
                    raise _KeyClaimed

            try:
                self._store.append_batch(
                    [data for _, data in fresh], lambda c: sign_checkpoint(c, self._key), claim
                )
            except _KeyClaimed:
                continue
            return fresh_keys, [key for key in keys if key in known]
        raise StoreError(f"ledger {self._store.location}: the event keys kept changing under this append")


def _create_table(tx: Transaction) -> None:
    tx.execute(_CREATE[tx.dialect])
    tx.execute(_INDEX)


def _insert_keys(tx: Transaction, rows: list[tuple[str, str, int]]) -> int:
    """Insert the key rows; how many went in (a key already stored is skipped, not an error)."""
    if tx.dialect == "postgresql":
        # One statement for the whole batch: per-row INSERTs would cost a round trip each.
        return tx.execute(
            f"INSERT INTO {KEYS_TABLE} (run, key, ledger_index)"
            " SELECT ?::text, k, i FROM unnest(?::text[], ?::int8[]) AS t(k, i) ON CONFLICT DO NOTHING",
            (rows[0][0], [row[1] for row in rows], [row[2] for row in rows]),
        )
    return tx.executemany(
        f"INSERT INTO {KEYS_TABLE} (run, key, ledger_index) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", rows
    )
