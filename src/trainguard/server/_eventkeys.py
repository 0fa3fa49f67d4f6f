"""Idempotent appends: the ``server_event_keys(run, key, ledger_index, digest, token_id)`` table beside the
ledger.

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

Each row also keeps the SHA-256 of the event's canonical bytes and the id of the token that sent it. A key
sent again with other content is not a duplicate but a conflict (`KeyConflict`, HTTP 409): a client whose
spool was edited, or a second writer reusing keys, must not have its new content silently dropped as
"already stored". The token id says which credential wrote each entry, for the evidence of a forged one.

Hooks (`AppendHook`) run in the same transaction after the key rows are written, with the accepted events
and their indices: whatever they write (a webhook's outbox rows) commits with the entries or not at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trainguard.errors import StoreError
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._note import sign_checkpoint
from trainguard.ledger._store import Store, Transaction

__all__ = ["KEYS_TABLE", "AppendHook", "AppendedEvent", "EventKeys", "KeyConflict"]

KEYS_TABLE = "server_event_keys"
_CREATE = {
    "sqlite": f"CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (run TEXT NOT NULL, key TEXT NOT NULL,"
    " ledger_index INTEGER NOT NULL, digest BLOB NOT NULL, token_id TEXT NOT NULL,"
    " PRIMARY KEY (run, key)) WITHOUT ROWID",
    "postgresql": f"CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (run text NOT NULL, key text NOT NULL,"
    " ledger_index bigint NOT NULL, digest bytea NOT NULL, token_id text NOT NULL,"
    " PRIMARY KEY (run, key))",
}
_INDEX = f"CREATE INDEX IF NOT EXISTS {KEYS_TABLE}_by_index ON {KEYS_TABLE} (run, ledger_index)"
_CHUNK = 500


class _KeyClaimed(Exception):
    """Another writer stored one of the batch's keys after we looked: roll back and look again."""


class KeyConflict(Exception):
    """Keys the run already holds for other content; the batch was not appended."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"{len(keys)} key(s) already stored with other content")
        self.keys = keys


@dataclass(frozen=True)
class AppendedEvent:
    """An event as it was appended: its log index, its key and its canonical bytes."""

    index: int
    key: str
    data: bytes


AppendHook = Callable[[Transaction, str, Sequence[AppendedEvent]], None]


class EventKeys:
    """The run-scoped idempotency keys of `store`, whose appends are signed with `key`."""

    def __init__(self, store: Store, key: SigningKey, hooks: Sequence[AppendHook] = ()) -> None:
        self._store = store
        self._key = key
        self._hooks = tuple(hooks)
        store.transaction(_create_table)  # under the writer lock: two workers creating it do not collide

    def known(self, run: str, keys: Sequence[str]) -> dict[str, bytes]:
        """The digests of those of `keys` that the run already holds."""
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._store.read(
                f"SELECT key, digest FROM {KEYS_TABLE} WHERE run = ? AND key IN ({marks})", [run, *chunk]
            )
            found.update((str(row[0]), bytes(row[1])) for row in rows)
        return found

    def append(
        self, run: str, items: Sequence[tuple[str, bytes]], token_id: str
    ) -> tuple[list[str], list[str]]:
        """Append the events whose keys the run does not hold yet; (accepted keys, duplicate keys).

        KeyConflict, and nothing appended, when a key the run holds came with other content.
        """
        keys = [key for key, _ in items]
        digests = {key: hashlib.sha256(data).digest() for key, data in items}
        # Each retry follows another writer's commit that took at least one of these keys: bounded.
        for _ in range(len(items) + 1):
            known = self.known(run, keys)
            conflicts = [key for key in keys if key in known and known[key] != digests[key]]
            if conflicts:
                raise KeyConflict(conflicts)
            fresh = [(key, data) for key, data in items if key not in known]
            if not fresh:
                return [], keys
            try:
                self._store.append_batch(
                    [data for _, data in fresh],
                    lambda c: sign_checkpoint(c, self._key),
                    self._within(run, fresh, digests, token_id),
                )
            except _KeyClaimed:
                continue
            return [key for key, _ in fresh], [key for key in keys if key in known]
        raise StoreError(f"ledger {self._store.location}: the event keys kept changing under this append")

    def _within(
        self, run: str, fresh: Sequence[tuple[str, bytes]], digests: dict[str, bytes], token_id: str
    ) -> Callable[[Transaction, int], None]:
        def claim_then_hooks(tx: Transaction, first: int) -> None:
            rows = [(run, key, first + i, digests[key], token_id) for i, (key, _) in enumerate(fresh)]
            if _insert_keys(tx, rows) != len(rows):
                raise _KeyClaimed
            appended = [AppendedEvent(first + i, key, data) for i, (key, data) in enumerate(fresh)]
            for hook in self._hooks:
                hook(tx, run, appended)

        return claim_then_hooks


def _create_table(tx: Transaction) -> None:
    tx.execute(_CREATE[tx.dialect])
    tx.execute(_INDEX)


def _insert_keys(tx: Transaction, rows: list[tuple[str, str, int, bytes, str]]) -> int:
    """Insert the key rows; how many went in (a key already stored is skipped, not an error)."""
    if tx.dialect == "postgresql":
        # One statement for the whole batch: per-row INSERTs would cost a round trip each.
        return tx.execute(
            f"INSERT INTO {KEYS_TABLE} (run, key, ledger_index, digest, token_id)"
            " SELECT ?::text, k, i, d, ?::text FROM unnest(?::text[], ?::int8[], ?::bytea[]) AS t(k, i, d)"
            " ON CONFLICT DO NOTHING",
            (
                rows[0][0],
                rows[0][4],
                [row[1] for row in rows],
                [row[2] for row in rows],
                [row[3] for row in rows],
            ),
        )
    return tx.executemany(
        f"INSERT INTO {KEYS_TABLE} (run, key, ledger_index, digest, token_id) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        rows,
    )
