"""Server fixtures: every token-store test runs on SQLite and on a real PostgreSQL, each in its own schema.

PostgreSQL is the one the ledger tests use ($TRAINGUARD_TEST_POSTGRES); its cases skip when none answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ledger.conftest import PG_URL, pg_schema, with_query


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test away from the real ~/.local/share/trainguard and from a TRAINGUARD_LEDGER set."""
    home = tmp_path / "tg-home"
    monkeypatch.setenv("TRAINGUARD_HOME", str(home))
    monkeypatch.delenv("TRAINGUARD_LEDGER", raising=False)
    return home


@pytest.fixture
def pg_location() -> Iterator[str]:
    """A PostgreSQL URL naming a schema no one uses (created by the store), dropped afterwards."""
    with pg_schema() as schema:
        yield with_query(PG_URL, schema=schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A location where no ledger and no tokens exist yet, on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "db" / "ledger.db")
    return str(request.getfixturevalue("pg_location"))
