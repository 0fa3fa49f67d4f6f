"""The embedded ledger store: one SQLite file in WAL mode, shared safely by many processes on one host."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from trainguard.errors import NoLedgerError, StoreError
from trainguard.ledger._keys import VerifierKey
from trainguard.ledger._merkle import NodeKey
from trainguard.ledger._sqlreads import SqlReads
from trainguard.ledger._store import (
    META_FORMAT,
    META_ORIGIN,
    META_VERIFIER,
    STORE_FORMAT,
    Signer,
    Transaction,
    Within,
    check_meta,
    completed_ranges,
    missing_nodes_error,
    next_batch,
)

__all__ = ["SqliteStore"]

_T = TypeVar("_T")

_TABLES = ("entries", "nodes", "checkpoints", "cosignatures", "meta")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS nodes (level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,"
    " PRIMARY KEY (level, idx)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL,"
    " created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
    "CREATE TABLE IF NOT EXISTS cosignatures (size INTEGER NOT NULL, witness TEXT NOT NULL,"
    " line TEXT NOT NULL, PRIMARY KEY (size, witness))",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# How long a writer waits for another process's transaction before giving up with a StoreError.
LOCK_TIMEOUT_S = 120.0


class SqliteStore(SqlReads):
    """A ledger in one SQLite file. Thread-safe: one connection, used under a lock."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._origin: str | None = None
        if not create and not path.exists():
            raise NoLedgerError(
                f"no ledger at {path}", hint="check the path, or append an event to create one"
            )
        with self._errors("open"):
            if create:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                path, timeout=LOCK_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        with self._errors("open"):
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a transaction is on disk when COMMIT returns, also across a power loss.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=OFF")
            self._create_schema()

    @property
    def location(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn sqlite3's exceptions into a StoreError that names the file and says what to do."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise StoreError(
                    f"ledger {self.path} stayed locked by another process for {LOCK_TIMEOUT_S:.0f} s"
                    f" ({action})",
                    hint="another trainguard process holds a long write transaction; retry later",
                ) from None
            raise StoreError(f"cannot {action} ledger {self.path}: {text}") from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"cannot {action} ledger {self.path}: {exc}",
                hint="not a SQLite database, or a damaged one; check the path or restore a backup",
            ) from None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot {action} ledger {self.path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"cannot {action} ledger {self.path}: {exc.strerror or exc}") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction under SQLite's writer lock (BEGIN IMMEDIATE), rolled back on any error."""
        conn = self._conn
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                # The busy handler already waited; WAL recovery by another opener can still answer BUSY.
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        try:
            yield conn.cursor()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _create_schema(self) -> None:
        conn = self._conn
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            raise StoreError(
                f"{self.path} is a SQLite database but not a trainguard ledger",
                hint="give the path of a ledger file, or a new path to create one",
            )
        if tables.issuperset(_TABLES):
            return
        with self._write() as cur:
            for statement in _SCHEMA:
                cur.execute(statement)

    def init(self, origin: str, verifier: VerifierKey) -> None:
        with self._lock, self._errors("initialise"), self._write() as cur:
            existing = dict(cur.execute("SELECT key, value FROM meta").fetchall())
            check_meta(existing, origin, verifier, self.location)
            if not existing:
                cur.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [(META_FORMAT, STORE_FORMAT), (META_ORIGIN, origin), (META_VERIFIER, verifier.text())],
                )

    def append_batch(
        self, entries: Sequence[bytes], sign: Signer, within: Within | None = None
    ) -> tuple[int, str]:
        if not entries:
            raise ValueError("an append needs at least one entry")
        with self._lock, self._errors("append to"), self._write() as cur:
            origin = self._origin_in(cur)
            size, signed = self._state_in(cur)
            batch = next_batch(self.location, size, signed, lambda keys: self._nodes_in(cur, keys), entries)
            cur.executemany(
                "INSERT INTO entries (idx, data) VALUES (?, ?)",
                [(size + i, data) for i, data in enumerate(entries)],
            )
            cur.executemany("INSERT INTO nodes (level, idx, hash) VALUES (?, ?, ?)", batch.nodes)
            if within is not None:
                within(_SqliteTransaction(cur), size)
            note = sign(batch.checkpoint(origin))
            cur.execute("INSERT INTO checkpoints (size, note) VALUES (?, ?)", (batch.size, note))
        return size, note

    def _origin_in(self, cur: sqlite3.Cursor) -> str:
        if self._origin is None:
            row = cur.execute("SELECT value FROM meta WHERE key = ?", (META_ORIGIN,)).fetchone()
            if row is None:
                raise StoreError(f"ledger {self.path} has not been initialised with an origin and key")
            self._origin = str(row[0])
        return self._origin

    @staticmethod
    def _state_in(cur: sqlite3.Cursor) -> tuple[int, int]:
        row = cur.execute(
            "SELECT (SELECT max(idx) FROM entries), (SELECT max(size) FROM checkpoints)"
        ).fetchone()
        return (0 if row[0] is None else row[0] + 1), (row[1] or 0)

    @staticmethod
    def _nodes_in(cur: sqlite3.Cursor, keys: Collection[NodeKey]) -> dict[NodeKey, bytes]:
        keys = list(dict.fromkeys(keys))
        values = ",".join(["(?, ?)"] * len(keys))
        params = [n for key in keys for n in key]
        # A join from the key list, not `(level, idx) IN (VALUES ...)`: SQLite plans the IN form as a
        # scan of the whole table, the join as one primary-key search per key.
        rows = cur.execute(
            "SELECT n.level, n.idx, n.hash FROM (VALUES "
            + values
            + ") AS k CROSS JOIN nodes AS n ON n.level = k.column1 AND n.idx = k.column2",
            params,
        )
        return {(level, idx): bytes(h) for level, idx, h in rows}

    def size(self) -> int:
        return self.state()[0]

    def state(self) -> tuple[int, int]:
        with self._lock, self._errors("read"):
            return self._state_in(self._conn.cursor())

    def nodes(self, keys: Collection[NodeKey]) -> Mapping[NodeKey, bytes]:
        if not keys:
            return {}
        with self._lock, self._errors("read"):
            found = self._nodes_in(self._conn.cursor(), keys)
        if len(found) < len(set(keys)):
            raise missing_nodes_error(keys, found, self.location)
        return found

    def nodes_completed(self, start: int, end: int) -> dict[NodeKey, bytes]:
        ranges = completed_ranges(start, end)
        if not ranges:
            return {}
        query = " UNION ALL ".join(
            ["SELECT level, idx, hash FROM nodes WHERE level = ? AND idx BETWEEN ? AND ?"] * len(ranges)
        )
        params = [n for triple in ranges for n in triple]
        with self._lock, self._errors("read"):
            return {(level, idx): bytes(h) for level, idx, h in self._conn.execute(query, params)}

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._errors("read"):
            return self._conn.execute(sql, params).fetchall()

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._rows(sql, params)

    def transaction(self, work: Callable[[Transaction], _T]) -> _T:
        with self._lock, self._errors("write to"), self._write() as cur:
            return work(_SqliteTransaction(cur))

    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        with self._lock, self._errors("write to"), self._write() as cur:
            cur.execute(
                "INSERT INTO cosignatures (size, witness, line) VALUES (?, ?, ?)"
                " ON CONFLICT (size, witness) DO UPDATE SET line = excluded.line",
                (size, witness, line),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteStore({self.location!r})"


class _SqliteTransaction:
    """`Transaction` on a cursor of an open SQLite write transaction."""

    dialect = "sqlite"

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return int(self._cur.execute(sql, params).rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        return int(self._cur.executemany(sql, rows).rowcount) if rows else 0

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._cur.execute(sql, params).fetchall()
