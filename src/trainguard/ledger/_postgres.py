"""The shared ledger store: PostgreSQL through psycopg 3 (the ``postgresql`` extra).

The location is a libpq URL. A ledger's five tables live in one schema, so a database shared with other
applications, or holding several ledgers, keeps them apart:

- ``?schema=NAME`` names it (a lowercase SQL identifier), and is taken out of the URL before libpq sees it;
- otherwise a ``search_path`` set in the URL's ``options`` (or in ``PGOPTIONS``) names it;
- otherwise it is ``trainguard``. A ledger made by an earlier trainguard in the connection's default schema
  (usually ``public``) is opened where it is, with a warning, as long as ``trainguard`` holds none: a
  ledger found in both is refused rather than guessed at, so processes never split between two ledgers.

A missing schema is created (``CREATE SCHEMA``) only when the store is opened to be written. Writers from any
host serialise on a transaction-level advisory lock keyed by the schema's name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from trainguard.errors import NoLedgerError, StoreError, TrainguardError, UsageError
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

__all__ = ["DEFAULT_SCHEMA", "PostgresStore", "redact", "split_schema"]

_T = TypeVar("_T")

DEFAULT_SCHEMA = "trainguard"
# Lowercase only: PostgreSQL folds unquoted names, so "Ledger" in psql and in the URL would differ.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_MAX_IDENTIFIER_BYTES = 63

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


def split_schema(url: str) -> tuple[str, str | None]:
    """The URL without its ``schema`` query parameter, for libpq, and that parameter (None when absent).

    UsageError when the parameter is repeated or is not a lowercase SQL identifier.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url, None  # libpq says what is wrong with it
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    named = [value for name, value in query if name == "schema"]
    if not named:
        return url, None
    if len(named) > 1:
        raise UsageError(f"ledger {redact(url)} names a schema {len(named)} times", hint="give ?schema= once")
    schema = named[0]
    if (
        not _SCHEMA_NAME.fullmatch(schema)
        or len(schema) > _MAX_IDENTIFIER_BYTES
        or schema.startswith("pg_")  # reserved for the system
    ):
        raise UsageError(
            f"ledger {redact(url)}: schema {schema!r} is not a usable schema name",
            hint="use lowercase letters, digits and '_', at most 63, not starting with a digit or 'pg_'",
        )
    rest = urllib.parse.urlencode([(name, value) for name, value in query if name != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schema


def _sets_search_path(url: str) -> bool:
    """Whether the URL's ``options`` or $PGOPTIONS set search_path, which then names the schema."""
    try:
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)
    except ValueError:
        query = []
    options = [value for name, value in query if name == "options"]
    options.append(os.environ.get("PGOPTIONS", ""))
    return any(re.search(r"search[_-]path", value) for value in options)


def _int32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


# Second half of the lock taken to create a schema: two sessions creating one collide in the catalog.
_SCHEMA_LOCK = _int32(zlib.crc32(b"trainguard schema creation"))


class PostgresStore(SqlReads):
    """A ledger in a PostgreSQL schema. Thread-safe: one autocommit connection, used under a lock."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self._url = url
        self._display = redact(url)
        self._lock = threading.RLock()
        self._origin: str | None = None
        libpq_url, named = split_schema(url)
        if named is not None and _sets_search_path(libpq_url):
            raise UsageError(
                f"ledger {self._display} names its schema twice, with schema= and a search_path option",
                hint="keep only ?schema=NAME",
            )
        with self._errors("connect to"):
            self._conn = psycopg.connect(libpq_url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
        try:
            with self._errors("open"):
                if named is None and _sets_search_path(libpq_url):
                    self.schema = self._search_path_schema()
                else:
                    self.schema = named or self._default_schema()
                    self._enter_schema(create)
                self._lock_key = _int32(zlib.crc32(self.schema.encode()))
                self._create_tables(create)
        except BaseException:
            self._conn.close()
            raise

    def _current_schema(self) -> str | None:
        row = self._conn.execute("SELECT current_schema()").fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def _search_path_schema(self) -> str:
        """The schema a search_path option names; it must exist, as trainguard does not parse the path."""
        schema = self._current_schema()
        if schema is None:
            raise StoreError(
                f"ledger {self._display} has no schema to live in: none named in its search_path exists",
                hint="create that schema, or name one with ?schema=NAME instead, which trainguard creates",
            )
        return schema

    def _holds_ledger(self, schema: str) -> bool:
        """Whether `schema` holds all five tables and a meta table naming a verifier key."""
        row = self._conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = ANY(%s)",
            (schema, list(_TABLES)),
        ).fetchone()
        if row is None or int(row[0]) != len(_TABLES):
            return False
        query = sql.SQL("SELECT 1 FROM {} WHERE key = %s").format(sql.Identifier(schema, "meta"))
        try:
            return self._conn.execute(query, (META_VERIFIER,)).fetchone() is not None
        except (psycopg.errors.UndefinedColumn, psycopg.errors.InsufficientPrivilege):
            return False  # another application's table called meta, or one this role could never use

    def _default_schema(self) -> str:
        """``trainguard``, or the schema where an earlier trainguard made this database's ledger."""
        legacy = self._current_schema()
        if legacy is None or legacy == DEFAULT_SCHEMA or not self._holds_ledger(legacy):
            return DEFAULT_SCHEMA
        if self._holds_ledger(DEFAULT_SCHEMA):
            raise StoreError(
                f"database {self._display} holds two trainguard ledgers, in schemas {DEFAULT_SCHEMA!r} and "
                f"{legacy!r}, and the URL does not say which one to use",
                hint=f"add ?schema={DEFAULT_SCHEMA} or ?schema={legacy} to the URL",
            )
        logging.getLogger("trainguard").warning(
            "ledger %s is in schema %r, where earlier trainguard versions made ledgers; new ledgers go in "
            "schema %r. Add ?schema=%s to the URL to keep it there (and silence this), or move its five "
            "tables with ALTER TABLE ... SET SCHEMA %s while no process writes to it",
            self._display,
            legacy,
            DEFAULT_SCHEMA,
            legacy,
            DEFAULT_SCHEMA,
        )
        return legacy

    def _enter_schema(self, create: bool) -> None:
        """Make `self.schema` the connection's only schema, creating it first when `create` allows."""
        schema = sql.Identifier(self.schema)
        if not self._schema_exists():
            if not create:
                raise NoLedgerError(
                    f"no ledger at {self._display}: schema {self.schema!r} does not exist",
                    hint="check the URL's database and schema, or append an event with the ledger's key "
                    "to create one",
                )
            try:
                with self._conn.transaction():
                    # IF NOT EXISTS would still need the privilege to create: test under the lock instead.
                    self._conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _SCHEMA_LOCK))
                    if not self._schema_exists():
                        self._conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            except psycopg.errors.InsufficientPrivilege:
                user = self._user()
                raise StoreError(
                    f"cannot create the ledger {self._display}: role {user!r} may not create schema "
                    f"{self.schema!r}",
                    hint=f"have an administrator run 'CREATE SCHEMA {self.schema} AUTHORIZATION {user}', "
                    "or name a schema this role may write with ?schema=NAME",
                ) from None
        self._conn.execute(sql.SQL("SET search_path TO {}").format(schema))
        if self._current_schema() != self.schema:
            raise StoreError(
                f"cannot open ledger {self._display}: role {self._user()!r} may not use schema "
                f"{self.schema!r}",
                hint=f"have an administrator run 'GRANT USAGE, CREATE ON SCHEMA {self.schema} TO "
                f"{self._user()}'",
            )

    def _schema_exists(self) -> bool:
        row = self._conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone()
        return row is not None

    def _user(self) -> str:
        row = self._conn.execute("SELECT current_user").fetchone()
        return "" if row is None else str(row[0])

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

    def _create_tables(self, create: bool) -> None:
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
                hint="choose another schema with ?schema=NAME",
            )
        if len(present) == len(_TABLES):
            return
        if not present and not create:
            raise NoLedgerError(
                f"no ledger at {self._display}: schema {self.schema!r} holds none",
                hint="check the URL's database and schema, or append an event with the ledger's key "
                "to create one",
            )
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

    def append_batch(
        self, entries: Sequence[bytes], sign: Signer, within: Within | None = None
    ) -> tuple[int, str]:
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
            if within is not None:
                within(_PostgresTransaction(cur), size)
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

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._rows(sql, params)

    def transaction(self, work: Callable[[Transaction], _T]) -> _T:
        conn = self._conn
        with self._lock, self._errors("write to"), conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, self._lock_key))
            return work(_PostgresTransaction(cur))

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


class _PostgresTransaction:
    """`Transaction` on a cursor of an open PostgreSQL transaction: ``?`` placeholders become ``%s``."""

    dialect = "postgresql"

    def __init__(self, cur: psycopg.Cursor[tuple[Any, ...]]) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return int(self._cur.execute(sql.replace("?", "%s"), params).rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        if not rows:
            return 0
        self._cur.executemany(sql.replace("?", "%s"), rows)
        return int(self._cur.rowcount)

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._cur.execute(sql.replace("?", "%s"), params).fetchall()
