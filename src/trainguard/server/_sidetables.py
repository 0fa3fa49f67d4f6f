"""The tables the server keeps beside the ledger for alerts and limits, and a connection to write them.

    server_webhooks         id, url, secret, event filter: where alerts go (`trainguard server webhook`)
    server_webhook_outbox   one row per (webhook, event) to deliver; written in the append's transaction
    server_event_counts     events appended through the server, per type label (bounded: see _alerts)
    server_rate_limits      requests per (bucket, window): a bucket is a token id or a client address
    server_worker_metrics   each worker's request counters, for /metrics answered by any worker
    server_run_contact      when each run's job was last heard from, and whether it was judged silent

All of it lives in the ledger's own database (SQLite file or PostgreSQL schema), so every worker and host
sees the same rows; a worker keeps nothing a second one would lack. Times are the database's clock, in
seconds since the epoch, so hosts whose clocks drift still agree on windows, leases and retries.

`SideDb` is an autocommit connection of its own: a rate-limit UPSERT or an outbox claim is one statement,
atomic by itself, and must not wait for the ledger's writer lock (only SQLite's own single writer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainguard.ledger._store import Store, Transaction, is_postgres_location
from trainguard.server._db import TokenDb, connect

__all__ = [
    "CONTACT",
    "COUNTS",
    "LIMITS",
    "METRICS",
    "OUTBOX",
    "WEBHOOKS",
    "SideDb",
    "create_tables",
    "now_sql",
    "open_side_db",
]

WEBHOOKS = "server_webhooks"
OUTBOX = "server_webhook_outbox"
COUNTS = "server_event_counts"
LIMITS = "server_rate_limits"
METRICS = "server_worker_metrics"
CONTACT = "server_run_contact"

_NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "extract(epoch from now())::float8",
}
_TYPES = {
    "sqlite": {"blob": "BLOB", "real": "REAL", "int": "INTEGER", "text": "TEXT"},
    "postgresql": {"blob": "bytea", "real": "float8", "int": "bigint", "text": "text"},
}
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {WEBHOOKS} (id {{text}} PRIMARY KEY, url {{text}} NOT NULL,"
    " secret {blob} NOT NULL, events {text} NOT NULL, label {text} NOT NULL, created_at {real} NOT NULL,"
    " created_by {text} NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {OUTBOX} (delivery_id {{text}} PRIMARY KEY, webhook_id {{text}} NOT NULL,"
    " run {text} NOT NULL, ledger_index {int} NOT NULL, event {blob} NOT NULL,"
    " state {text} NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),"
    " attempts {int} NOT NULL DEFAULT 0, next_at {real} NOT NULL, lease_until {real},"
    " last_error {text}, created_at {real} NOT NULL, done_at {real}, UNIQUE (webhook_id, ledger_index))",
    f"CREATE INDEX IF NOT EXISTS {OUTBOX}_due ON {OUTBOX} (state, next_at)",
    f"CREATE INDEX IF NOT EXISTS {OUTBOX}_run ON {OUTBOX} (run, state, webhook_id)",
    f"CREATE TABLE IF NOT EXISTS {COUNTS} (type {{text}} PRIMARY KEY, events {{int}} NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {LIMITS} (bucket {{text}} NOT NULL, window_start {{int}} NOT NULL,"
    " hits {int} NOT NULL, PRIMARY KEY (bucket, window_start))",
    f"CREATE TABLE IF NOT EXISTS {METRICS} (worker {{text}} NOT NULL, name {{text}} NOT NULL,"
    " labels {text} NOT NULL, value {real} NOT NULL, updated {real} NOT NULL,"
    " PRIMARY KEY (worker, name, labels))",
    f"CREATE TABLE IF NOT EXISTS {CONTACT} (run {{text}} PRIMARY KEY, last_contact {{real}} NOT NULL,"
    " state {text} NOT NULL CHECK (state IN ('heard', 'silent', 'done')))",
    f"CREATE INDEX IF NOT EXISTS {CONTACT}_due ON {CONTACT} (state, last_contact)",
)


def now_sql(dialect: str) -> str:
    """SQL for the database's clock in seconds since the epoch (a float)."""
    return _NOW[dialect]


def create_tables(store: Store) -> None:
    """Create the tables when missing, under the ledger's writer lock (workers starting together)."""

    def create(tx: Transaction) -> None:
        for statement in _SCHEMA:
            tx.execute(statement.format(**_TYPES[tx.dialect]))

    store.transaction(create)


class SideDb:
    """An autocommit connection to the ledger's database, for one-statement reads and writes."""

    def __init__(self, db: TokenDb, dialect: str) -> None:
        self._db = db
        self.dialect = dialect
        self.now = _NOW[dialect]

    @property
    def location(self) -> str:
        return self._db.location

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Every row a statement returns (a write with RETURNING included). StoreError on failure."""
        return self._db.rows(sql, params)

    def write(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement, committed when it returns; the number of rows it changed."""
        return self._db.write(sql, params)

    def write_each(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """Run one statement per row, each committed on its own."""
        for row in rows:
            self._db.write(sql, row)

    def close(self) -> None:
        self._db.close()


def open_side_db(location: str | Path) -> SideDb:
    """A SideDb on the ledger at `location`, whose server tables (tokens included) exist already."""
    dialect = "postgresql" if is_postgres_location(location) else "sqlite"
    db = connect(location, create=False)
    try:
        # A counter, a claim or a lease lost to a crash costs a few requests more or a duplicate delivery
        # (receivers deduplicate on its id); waiting for the disk at every request would cost milliseconds.
        # The ledger's own connection, which writes the entries and the outbox rows, keeps full durability.
        db.write(
            "SET synchronous_commit TO off" if dialect == "postgresql" else "PRAGMA synchronous = NORMAL"
        )
    except BaseException:
        db.close()
        raise
    return SideDb(db, dialect)
