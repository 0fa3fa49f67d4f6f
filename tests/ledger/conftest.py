"""Ledger fixtures: every store test runs on SQLite and on a real PostgreSQL, each test in its own schema.

PostgreSQL is found at $TRAINGUARD_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test); the
PostgreSQL cases are skipped when no server answers there, unless that variable is set.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from trainguard.ledger._events import Actor, Event, new_event
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._merkle import Frontier, NodeKey, leaf_hash
from trainguard.ledger._store import completed_ranges, is_postgres_location

PG_URL = os.environ.get("TRAINGUARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
ORIGIN = "test.example/ledger"
ACTOR = Actor(user="tester", uid=1000, host="node-1", pid=4242)

_pg_state: dict[str, str | None] = {}


def _pg_unavailable() -> str | None:
    """Why PostgreSQL cannot be used, or None; asked once per session."""
    if "reason" not in _pg_state:
        try:
            import psycopg

            with psycopg.connect(PG_URL, connect_timeout=3):
                pass
            _pg_state["reason"] = None
        except Exception as exc:
            _pg_state["reason"] = f"PostgreSQL at {PG_URL} unavailable: {exc}"
    return _pg_state["reason"]


def schema_url(schema: str) -> str:
    """PG_URL with search_path set to `schema` through libpq's options parameter."""
    return with_query(PG_URL, options=f"-csearch_path={schema}")


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test away from the real ~/.local/share/trainguard."""
    home = tmp_path / "tg-home"
    monkeypatch.setenv("TRAINGUARD_HOME", str(home))
    return home


def require_pg() -> None:
    """Skip the test when no PostgreSQL answers at PG_URL; fail it when one was asked for."""
    reason = _pg_unavailable()
    if reason is not None:
        if "TRAINGUARD_TEST_POSTGRES" in os.environ:
            pytest.fail(reason)
        pytest.skip(reason)


def with_query(url: str, **params: str) -> str:
    """`url` with query parameters added."""
    parts = urllib.parse.urlsplit(url)
    query = [*urllib.parse.parse_qsl(parts.query), *params.items()]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """The name of a schema no one uses, dropped afterwards with all it holds (whoever created it)."""
    require_pg()
    import psycopg

    schema = f"tg_test_{secrets.token_hex(6)}"
    try:
        yield schema
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def pg_location() -> Iterator[str]:
    """A fresh, empty PostgreSQL schema for one test, named by search_path, dropped afterwards."""
    import psycopg

    with pg_schema() as schema:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        yield schema_url(schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger location on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return str(request.getfixturevalue("pg_location"))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate(ORIGIN)


def event(n: int, kind: str = "test.step", **payload: Any) -> Event:
    """A deterministic event carrying `n`."""
    return new_event(kind, {"n": n, **payload}, actor=ACTOR, time="2026-01-02T03:04:05.000000Z")


def make_ledger(location: str, key: SigningKey, batches: Sequence[int]) -> Ledger:
    """A ledger holding sum(batches) events, appended in batches of those sizes (one checkpoint each)."""
    ledger = Ledger.open(location, key=key, origin=ORIGIN)
    n = 0
    for size in batches:
        ledger.append_many([event(n + i) for i in range(size)])
        n += size
    return ledger


class MemoryTree:
    """Every node of a tree built in memory with a Frontier: the reference for proofs."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.table: dict[NodeKey, bytes] = {}
        frontier = Frontier.empty()
        self.roots = [frontier.root()]
        for leaf in leaves:
            self.table.update(frontier.append(leaf))
            self.roots.append(frontier.root())

    def nodes(self, keys: Any) -> dict[NodeKey, bytes]:
        return {k: self.table[k] for k in keys}


class Attacker:
    """Direct SQL on a ledger's database, as someone with full write access to it would have."""

    def __init__(self, location: str) -> None:
        self.pg = is_postgres_location(location)
        if self.pg:
            import psycopg

            self.conn: Any = psycopg.connect(location, autocommit=True)
        else:
            self.conn = sqlite3.connect(location, isolation_level=None)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.pg:
            sql = sql.replace("?", "%s")
        cur = self.conn.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []

    def entries(self) -> list[tuple[int, bytes]]:
        return [(int(i), bytes(d)) for i, d in self.execute("SELECT idx, data FROM entries ORDER BY idx")]

    def delete_nodes_from(self, start: int, end: int) -> None:
        """Delete the nodes that leaves start..end-1 completed."""
        for level, lo, hi in completed_ranges(start, end):
            self.execute("DELETE FROM nodes WHERE level = ? AND idx BETWEEN ? AND ?", (level, lo, hi))

    def rebuild_nodes(self) -> None:
        """Recompute the whole node table from the entries as they now are."""
        frontier = Frontier.empty()
        rows: list[tuple[int, int, bytes]] = []
        for _, data in self.entries():
            rows.extend((level, idx, h) for (level, idx), h in frontier.append(leaf_hash(data)))
        self.execute("DELETE FROM nodes")
        for row in rows:
            self.execute("INSERT INTO nodes (level, idx, hash) VALUES (?, ?, ?)", row)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def attacker_for() -> Iterator[Any]:
    opened: list[Attacker] = []

    def connect(location: str) -> Attacker:
        attacker = Attacker(location)
        opened.append(attacker)
        return attacker

    yield connect
    for attacker in opened:
        attacker.close()
