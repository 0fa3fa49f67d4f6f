"""The shared ledger store: PostgreSQL through psycopg 3 (the ``postgresql`` extra).

The location is a libpq URL. Its tables live in the connection's current schema, so one database can hold
several ledgers, each chosen with ``?options=-csearch_path%3D<schema>``. Writers from any host serialise on a
transaction-level advisory lock keyed by that schema.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.parse
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import psycopg

from trainguard.errors import StoreError, TrainguardError
from trainguard.ledger._keys import VerifierKey
from trainguard.ledger._merkle import NodeKey
from trainguard.ledger._sqlreads import SqlReads
from trainguard.ledger._store import (
    META_FORMAT,
    META_ORIGIN,
    META_VERIFIER,
    STORE_FORMAT,
    Signer,
    check_meta,
    completed_ranges,
    missing_nodes_error,
    next_batch,
)

__all__ = ["PostgresStore", "redact"]

_TABLES = ("entries", "nodes", "checkpoints", "cosignatures", "meta")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (idx bigint PRIMARY KEY, data bytea NOT NULL)",
    "CREATE TABLE IF NOT EXISTS nodes (level smallint NOT NULL, idx bigint NOT NULL, hash bytea NOT NULL,"
    " PRIMARY KEY (level, idx))",
    "CREATE TABLE IF NOT EXISTS checkpoints (size bigint PRIMARY KEY, note text NOT NULL,"
    " created timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS cosignatures (size bigint NOT NULL, witness text NOT NULL,"
    " line text NOT NULL, PRIMARY KEY (size, witness))",
    "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)",
)
# First half of the advisory lock key ("TGLG"); the second half is derived from the schema name.
_LOCK_CLASS = 0x54474C47
_CONNECT_TIMEOUT_S = 10


def redact(url: str) -> str:
    """The URL with any password replaced, fit for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "postgresql://(unparseable URL)"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


class PostgresStore(SqlReads):
    """A ledger in a PostgreSQL schema. Thread-safe: one autocommit connection, used under a lock."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._display = redact(url)
        self._lock = threading.RLock()
        self._origin: str | None = None
        with self._errors("connect to"):
            self._conn = psycopg.connect(url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
        with self._errors("open"):
            row = self._conn.execute("SELECT current_schema()").fetchone()
            if row is None or row[0] is None:
                raise StoreError(
                    f"ledger {self._display} has no schema to live in",
                    hint="create the schema named in search_path, or drop the search_path option",
                )
            self.schema = str(row[0])
            self._lock_key = _int32(zlib.crc32(self.schema.encode()))
            self._create_schema()

    @property
    def location(self) -> str:
        return self._display

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn psycopg's exceptions into a StoreError naming the database (never its password)."""
        try:
            yield
        except TrainguardError:
            raise
        except psycopg.OperationalError as exc:
            first = (str(exc).strip().splitlines() or ["connection failed"])[0]
            raise StoreError(
                f"cannot {action} ledger {self._display}: {first}",
                hint="check that the PostgreSQL server is running and the URL, user and database are right",
            ) from None
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreError(f"cannot {action} ledger {self._display}: {first}") from None

    def _create_schema(self) -> None:
        conn = self._conn
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = ANY(%s)",
            (list(_TABLES),),
        ).fetchall()
        present = {str(r[0]) for r in rows}
        if present and "meta" not in present:
            raise StoreError(
                f"schema {self.schema!r} of {self._display} holds tables that are not a trainguard ledger",
                hint="choose another schema with ?options=-csearch_path%3D<schema>",
            )
        if len(present) == len(_TABLES):
            return
        with conn.transaction(), conn.cursor() as cur:
            # Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog; serialise them.
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, self._lock_key))
            for statement in _SCHEMA:
                cur.execute(statement)

    def init(self, origin: str, verifier: VerifierKey) -> None:
        with self._lock, self._errors("initialise"), self._conn.transaction(), self._conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, self._lock_key))
            existing = {str(k): str(v) for k, v in cur.execute("SELECT key, value FROM meta").fetchall()}
            check_meta(existing, origin, verifier, self.location)
            if not existing:
                cur.executemany(
                    "INSERT INTO meta (key, value) VALUES (%s, %s)",
                    [(META_FORMAT, STORE_FORMAT), (META_ORIGIN, origin), (META_VERIFIER, verifier.text())],
                )

    def append_batch(self, entries: Sequence[bytes], sign: Signer) -> tuple[int, str]:
        if not entries:
            raise ValueError("an append needs at least one entry")
        conn = self._conn
        with self._lock, self._errors("append to"), conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, self._lock_key))
            origin = self._origin_in(cur)
            size, signed = self._state_in(cur)
            batch = next_batch(self.location, size, signed, lambda keys: self._nodes_in(cur, keys), entries)
            # COPY streams every row in one round trip; per-row INSERTs would cost one each.
            with cur.copy("COPY entries (idx, data) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int8", "bytea"])
                for i, data in enumerate(entries):
                    copy.write_row((size + i, data))
            with cur.copy("COPY nodes (level, idx, hash) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int2", "int8", "bytea"])
                for row in batch.nodes:
                    copy.write_row(row)
            note = sign(batch.checkpoint(origin))
            cur.execute("INSERT INTO checkpoints (size, note) VALUES (%s, %s)", (batch.size, note))
        return size, note

    def _origin_in(self, cur: psycopg.Cursor[tuple[object, ...]]) -> str:
        if self._origin is None:
            row = cur.execute("SELECT value FROM meta WHERE key = %s", (META_ORIGIN,)).fetchone()
            if row is None:
                raise StoreError(f"ledger {self.location} has not been initialised with an origin and key")
            self._origin = str(row[0])
        return self._origin

    @staticmethod
    def _state_in(cur: psycopg.Cursor[tuple[object, ...]]) -> tuple[int, int]:
        row = cur.execute(
            "SELECT (SELECT max(idx) FROM entries), (SELECT max(size) FROM checkpoints)"
        ).fetchone()
        assert row is not None
        last, signed = row
        return (0 if last is None else int(last) + 1), (0 if signed is None else int(signed))  # type: ignore[call-overload]

    @staticmethod
    def _nodes_in(cur: psycopg.Cursor[tuple[object, ...]], keys: Collection[NodeKey]) -> dict[NodeKey, bytes]:
        levels = [k[0] for k in keys]
        indices = [k[1] for k in keys]
        rows = cur.execute(
            "SELECT level, idx, hash FROM nodes WHERE (level, idx) IN"
            " (SELECT * FROM unnest(%s::int2[], %s::int8[]))",
            (levels, indices),
        ).fetchall()
        return {(int(lv), int(ix)): bytes(h) for lv, ix, h in rows}  # type: ignore[call-overload]

    def size(self) -> int:
        return self.state()[0]

    def state(self) -> tuple[int, int]:
        with self._lock, self._errors("read"), self._conn.cursor() as cur:
            return self._state_in(cur)

    def nodes(self, keys: Collection[NodeKey]) -> Mapping[NodeKey, bytes]:
        if not keys:
            return {}
        with self._lock, self._errors("read"), self._conn.cursor() as cur:
            found = self._nodes_in(cur, keys)
        if len(found) < len(set(keys)):
            raise missing_nodes_error(keys, found, self.location)
        return found

    def nodes_completed(self, start: int, end: int) -> dict[NodeKey, bytes]:
        ranges = completed_ranges(start, end)
        if not ranges:
            return {}
        with self._lock, self._errors("read"):
            rows = self._conn.execute(
                "SELECT n.level, n.idx, n.hash FROM unnest(%s::int2[], %s::int8[], %s::int8[]) r(lv, lo, hi)"
                " JOIN nodes n ON n.level = r.lv AND n.idx BETWEEN r.lo AND r.hi",
                ([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]),
            ).fetchall()
        return {(int(lv), int(ix)): bytes(h) for lv, ix, h in rows}

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._errors("read"):
            return self._conn.execute(sql.replace("?", "%s"), params).fetchall()

    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        with self._lock, self._errors("write to"):
            self._conn.execute(
                "INSERT INTO cosignatures (size, witness, line) VALUES (%s, %s, %s)"
                " ON CONFLICT (size, witness) DO UPDATE SET line = excluded.line",
                (size, witness, line),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r})"
