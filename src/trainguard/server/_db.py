"""The connection the token store uses: the ledger's own database, SQLite file or PostgreSQL schema.

The ledger resolves the location (its default file, ``?schema=NAME``, a search_path option, a legacy
ledger in ``public``), so tokens always sit beside the ledger the same URL opens. The token table is created
only when asked to (`trainguard server token create`); every other use finds it or fails with a StoreError.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from trainguard.errors import NoLedgerError, StoreError, TrainguardError
from trainguard.ledger._store import is_postgres_location, open_store

__all__ = ["TABLE", "TokenDb", "connect"]

TABLE = "server_tokens"
_MISSING_HINT = "create the first token with 'trainguard server token create --scope admin' (same --store)"

_SQLITE_TABLE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('admin', 'viewer', 'job')),
    run_id TEXT,
    label TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT,
    created_by TEXT NOT NULL,
    CHECK ((scope = 'job') = (run_id IS NOT NULL)),
    CHECK (scope <> 'job' OR expires_at IS NOT NULL)
)"""
_POSTGRES_TABLE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    id text PRIMARY KEY,
    secret_hash bytea NOT NULL,
    scope text NOT NULL CHECK (scope IN ('admin', 'viewer', 'job')),
    run_id text,
    label text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    revoked_at timestamptz,
    created_by text NOT NULL,
    CHECK ((scope = 'job') = (run_id IS NOT NULL)),
    CHECK (scope <> 'job' OR expires_at IS NOT NULL)
)"""
# Advisory lock ("TGSV", crc32 of the schema) so two admins creating the table at once do not collide.
_LOCK_CLASS = 0x54475356
_CONNECT_TIMEOUT_S = 10
_BUSY_TIMEOUT_S = 30.0


class TokenDb(Protocol):
    """One connection; SQL is written with ``?`` placeholders. Every failure is a StoreError."""

    location: str

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows (none for a write)."""
        ...

    def write(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement, committed when it returns; the number of rows it changed."""
        ...

    def to_db(self, moment: datetime | None) -> object: ...

    def from_db(self, value: object) -> datetime | None: ...

    def close(self) -> None: ...


def connect(location: str | Path, *, create: bool) -> TokenDb:
    """The token table at `location` (a SQLite path or a ``postgresql://`` URL).

    With `create`, the ledger (its schema and tables) and the token table are created when missing, so the
    file or schema stays one a ledger opens; without it a missing table is a StoreError saying how to make
    one.
    """
    if is_postgres_location(location):
        return _postgres(str(location), create=create)
    return _sqlite(Path(location), create=create)


def _sqlite(path: Path, *, create: bool) -> TokenDb:
    if create:
        # The ledger refuses a SQLite file that holds tables but no ledger: make the ledger's tables first.
        open_store(path, create=True).close()
    elif not path.exists():
        raise StoreError(f"no server tokens at {path}: the file does not exist", hint=_MISSING_HINT)
    db = _SqliteDb(path)
    try:
        db.ensure_table(create)
    except BaseException:
        db.close()
        raise
    return db


def _postgres(url: str, *, create: bool) -> TokenDb:
    try:
        ledger = open_store(url, create=create)  # MissingExtraError when psycopg is not installed
    except NoLedgerError as exc:
        if create:
            raise
        # No ledger means no tokens either; say how to make tokens, not how to make a ledger.
        raise StoreError(f"no server tokens: {exc.message}", hint=_MISSING_HINT) from None
    try:
        from trainguard.ledger._postgres import PostgresStore

        assert isinstance(ledger, PostgresStore)
        schema, display = ledger.schema, ledger.location
    finally:
        ledger.close()
    db = _PostgresDb(url, schema, display)
    try:
        db.ensure_table(create)
    except BaseException:
        db.close()
        raise
    return db


def _missing(location: str) -> StoreError:
    return StoreError(f"no server tokens at {location}", hint=_MISSING_HINT)


class _SqliteDb:
    """Autocommit: every statement the store runs is one complete change, so none needs a transaction."""

    def __init__(self, path: Path) -> None:
        self.location = str(path)
        self._lock = threading.Lock()
        with self._errors("open"):
            # mode=rw: opening never creates a file; `connect` made it already when asked to.
            self._conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )

    def ensure_table(self, create: bool) -> None:
        found = self.rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,))
        if not found:
            if not create:
                raise _missing(self.location)
            self.write(_SQLITE_TABLE)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"cannot {action} the server tokens in {self.location}: {exc}") from None
        except OSError as exc:
            raise StoreError(
                f"cannot {action} the server tokens in {self.location}: {exc.strerror or exc}"
            ) from None

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._errors("read"):
            return self._conn.execute(sql, params).fetchall()

    def write(self, sql: str, params: Sequence[object] = ()) -> int:
        with self._lock, self._errors("write"):
            return self._conn.execute(sql, params).rowcount

    def to_db(self, moment: datetime | None) -> object:
        return None if moment is None else moment.astimezone(UTC).isoformat()

    def from_db(self, value: object) -> datetime | None:
        if value is None:
            return None
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise StoreError(f"server tokens in {self.location}: {value!r} is not a time") from None
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _PostgresDb:
    """Autocommit on a connection whose search_path is the ledger's schema alone."""

    def __init__(self, url: str, schema: str, display: str) -> None:
        import psycopg
        from psycopg import sql

        from trainguard.ledger._postgres import split_schema

        self.location = display
        self._schema = schema
        self._lock = threading.Lock()
        with self._errors("connect to"):
            self._conn = psycopg.connect(
                split_schema(url)[0], autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S
            )
        with self._errors("open"):
            self._conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))

    def ensure_table(self, create: bool) -> None:
        found = self.rows(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema()"
            " AND table_name = ?",
            (TABLE,),
        )
        if found:
            return
        if not create:
            raise _missing(self.location)
        lock = zlib.crc32(self._schema.encode()) - (1 << 31)  # any int4 derived from the schema
        with self._lock, self._errors("create"), self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, lock))
            self._conn.execute(_POSTGRES_TABLE)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        import psycopg

        try:
            yield
        except TrainguardError:
            raise
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StoreError(
                f"cannot {action} the server tokens in {self.location}: {first}",
                hint="check that the PostgreSQL server is running and the URL, user and database are right"
                if isinstance(exc, psycopg.OperationalError)
                else None,
            ) from None

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._errors("read"), self._conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params or None)
            return cur.fetchall() if cur.description is not None else []

    def write(self, sql: str, params: Sequence[object] = ()) -> int:
        with self._lock, self._errors("write"), self._conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params or None)
            return cur.rowcount

    def to_db(self, moment: datetime | None) -> object:
        return moment

    def from_db(self, value: object) -> datetime | None:
        if value is None or (isinstance(value, datetime) and value.tzinfo is not None):
            return value
        raise StoreError(f"server tokens in {self.location}: {value!r} is not a time with a zone")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
