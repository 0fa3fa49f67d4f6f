"""Which PostgreSQL schema a ledger lives in: ``trainguard`` by default, ``?schema=NAME``, a search_path
option, and ledgers that earlier versions made in ``public``. Each test gets a database of its own, so the
default schemas it touches are its own too."""

from __future__ import annotations

import logging
import secrets
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from tests.ledger.conftest import ORIGIN, PG_URL, event, make_ledger, require_pg, with_query
from trainguard.errors import StoreError, UsageError
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._store import open_store

psycopg = pytest.importorskip("psycopg")


def _admin() -> Any:
    return psycopg.connect(PG_URL, autocommit=True)


@pytest.fixture
def database() -> Iterator[str]:
    """The URL of a new, empty database, dropped afterwards."""
    require_pg()
    name = f"tg_test_{secrets.token_hex(6)}"
    with _admin() as conn:
        try:
            conn.execute(f"CREATE DATABASE {name}")
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip(f"the role of {PG_URL} may not create a database")
    try:
        yield urllib.parse.urlsplit(PG_URL)._replace(path=f"/{name}").geturl()
    finally:
        with _admin() as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _tables(url: str) -> dict[str, set[str]]:
    """Schema -> the ledger tables it holds, outside the system schemas."""
    found: dict[str, set[str]] = {}
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    for schema, table in rows:
        found.setdefault(str(schema), set()).add(str(table))
    return found


def _schemas(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {str(r[0]) for r in conn.execute("SELECT nspname FROM pg_namespace").fetchall()}


LEDGER_TABLES = {"entries", "nodes", "checkpoints", "cosignatures", "meta"}


def test_a_new_ledger_goes_in_schema_trainguard(database: str, key: SigningKey) -> None:
    make_ledger(database, key, [3]).close()
    assert _tables(database) == {"trainguard": LEDGER_TABLES}
    with Ledger.open(database, verifier=key.verifier()) as again:
        assert again.size == 3
        assert again.verify().ok


def test_schema_parameter_keeps_two_ledgers_apart(database: str, key: SigningKey) -> None:
    other = SigningKey.generate("test.example/other")
    make_ledger(with_query(database, schema="ledger_a"), key, [2]).close()
    with Ledger.open(with_query(database, schema="ledger_b"), key=other) as ledger:
        ledger.append(event(0))
    assert _tables(database) == {"ledger_a": LEDGER_TABLES, "ledger_b": LEDGER_TABLES}
    with Ledger.open(with_query(database, schema="ledger_a")) as a:
        assert (a.origin, a.size) == (ORIGIN, 2)
    with Ledger.open(with_query(database, schema="ledger_b")) as b:
        assert (b.origin, b.size) == (other.name, 1)


def test_a_read_only_open_creates_no_schema(database: str) -> None:
    with pytest.raises(StoreError, match=r"no ledger at .*schema 'trainguard' does not exist") as caught:
        Ledger.open(database)
    assert caught.value.hint
    with pytest.raises(StoreError, match="schema 'absent' does not exist"):
        open_store(with_query(database, schema="absent"), create=False)
    assert "trainguard" not in _schemas(database)
    assert "absent" not in _schemas(database)


def test_many_writers_creating_the_schema_at_once_share_one_ledger(database: str, key: SigningKey) -> None:
    errors: list[BaseException] = []

    def append(n: int) -> None:
        try:
            with Ledger.open(database, key=key) as ledger:
                ledger.append(event(n))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Ledger.open(database) as ledger:
        assert ledger.size == 6
        assert ledger.verify().ok


def test_a_role_that_may_not_create_the_schema_is_told_the_fix(database: str, key: SigningKey) -> None:
    role = f"tg_test_{secrets.token_hex(6)}"
    with _admin() as conn:
        try:
            conn.execute(f"CREATE ROLE {role} LOGIN")
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip(f"the role of {PG_URL} may not create roles")
    try:
        parts = urllib.parse.urlsplit(database)
        as_role = parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}").geturl()
        with pytest.raises(StoreError, match=f"role '{role}' may not create schema 'trainguard'") as caught:
            Ledger.open(as_role, key=key)
        assert caught.value.hint is not None
        assert f"CREATE SCHEMA trainguard AUTHORIZATION {role}" in caught.value.hint
        assert "?schema=" in caught.value.hint
        assert "trainguard" not in _schemas(database)
    finally:
        with _admin() as conn:
            conn.execute(f"DROP ROLE {role}")


def test_a_search_path_option_still_names_the_schema(database: str, key: SigningKey) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA chosen")
    make_ledger(with_query(database, options="-csearch_path=chosen"), key, [2]).close()
    assert _tables(database) == {"chosen": LEDGER_TABLES}
    with Ledger.open(with_query(database, schema="chosen")) as ledger:
        assert ledger.size == 2


def test_a_ledger_made_in_public_by_an_earlier_version_still_opens_there(
    database: str, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    # An earlier trainguard put its tables in the connection's current schema: public.
    make_ledger(with_query(database, options="-csearch_path=public"), key, [3]).close()
    with caplog.at_level(logging.WARNING, logger="trainguard"), Ledger.open(database, key=key) as ledger:
        assert ledger.size == 3
        ledger.append(event(3))
    assert "schema 'public'" in caplog.text
    assert "?schema=public" in caplog.text
    assert _tables(database) == {"public": LEDGER_TABLES}
    assert "trainguard" not in _schemas(database)
    caplog.clear()
    with (
        caplog.at_level(logging.WARNING, logger="trainguard"),
        Ledger.open(with_query(database, schema="public")) as named,
    ):
        assert named.size == 4
        assert named.verify().ok
    assert caplog.text == ""

    # The move the README describes: afterwards the plain URL opens it in its new schema, silently.
    with psycopg.connect(database, autocommit=True) as conn, conn.transaction():
        conn.execute("CREATE SCHEMA trainguard")
        for table in LEDGER_TABLES:
            conn.execute(f"ALTER TABLE public.{table} SET SCHEMA trainguard")
    with caplog.at_level(logging.WARNING, logger="trainguard"), Ledger.open(database, key=key) as moved:
        assert moved.append(event(4)) == 4
        assert moved.verify().ok
    assert caplog.text == ""
    assert _tables(database) == {"trainguard": LEDGER_TABLES}


def test_ledgers_in_both_public_and_trainguard_are_refused_until_the_url_chooses(
    database: str, key: SigningKey
) -> None:
    make_ledger(with_query(database, options="-csearch_path=public"), key, [1]).close()
    make_ledger(with_query(database, schema="trainguard"), key, [2]).close()
    with pytest.raises(StoreError, match="two trainguard ledgers") as caught:
        Ledger.open(database, key=key)
    assert caught.value.hint == "add ?schema=trainguard or ?schema=public to the URL"
    with Ledger.open(with_query(database, schema="public")) as old:
        assert old.size == 1
    with Ledger.open(with_query(database, schema="trainguard")) as new:
        assert new.size == 2


def test_other_tables_called_meta_in_public_are_not_a_ledger(database: str, key: SigningKey) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        for table in LEDGER_TABLES:
            conn.execute(f"CREATE TABLE public.{table} (id int)")
    make_ledger(database, key, [1]).close()
    assert _tables(database)["trainguard"] == LEDGER_TABLES


def test_a_schema_holding_other_tables_is_refused(database: str, key: SigningKey) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
        conn.execute("CREATE TABLE app.entries (id int)")
    with pytest.raises(StoreError, match="not a trainguard ledger") as caught:
        Ledger.open(with_query(database, schema="app"), key=key)
    assert caught.value.hint == "choose another schema with ?schema=NAME"


@pytest.mark.parametrize(
    "schema",
    ["", "Ledger", "1st", "pg_ledger", "my-ledger", 'a"b', "a b", "a;drop", "x" * 64, "l\u00e9dger"],
)
def test_a_schema_name_that_is_not_a_plain_identifier_is_a_usage_error(schema: str) -> None:
    url = with_query(PG_URL, schema=schema)
    with pytest.raises(UsageError, match="not a usable schema name"):
        open_store(url)


def test_a_schema_named_twice_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="names a schema 2 times"):
        open_store(f"{PG_URL}?schema=a&schema=b")
    with pytest.raises(UsageError, match="names its schema twice"):
        open_store(with_query(PG_URL, schema="a", options="-c search_path=b"))
