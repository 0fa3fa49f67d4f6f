"""`trainguard server token create|list|revoke`, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from trainguard.server import AuthenticationFailed, AuthFailure, Scope, TokenStore


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRAINGUARD_HOME": str(home)}
    env.pop("TRAINGUARD_LEDGER", None)
    return subprocess.run(
        [sys.executable, "-m", "trainguard", "server", "token", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _create(home: Path, *args: str) -> tuple[str, str]:
    """(token, its id) from a `create` that must succeed."""
    done = _run(home, "create", *args)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == f"{token}\n"  # alone on stdout, for $(...)
    assert "only time the token is shown" in done.stderr
    assert token not in done.stderr
    return token, token[len("tgs_") : len("tgs_tg_00000000")]


def test_create_list_revoke_on_the_default_store(home: Path) -> None:
    token, token_id = _create(home, "--scope", "job", "--run", "r42", "--label", "ci", "--expires", "24h")
    _, admin_id = _create(home, "--scope", "admin", "--expires", "never")
    with TokenStore.open() as store:  # the default ledger under TRAINGUARD_HOME
        assert store.authenticate(token).run == "r42"

    listed = _run(home, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "SCOPE", "RUN", "STATUS"]
    assert lines[1].split()[:4] == [token_id, "job", "r42", "active"] and lines[1].endswith("ci")
    assert lines[2].split()[:5] == [admin_id, "admin", "-", "active", "never"]
    assert token.split("_", 3)[3] not in listed.stdout

    revoked = _run(home, "revoke", token_id)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith(f"revoked {token_id}")
    again = _run(home, "revoke", token_id)
    assert again.returncode == 0 and "already revoked" in again.stdout

    as_json = _run(home, "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    tokens = {t["id"]: t for t in json.loads(as_json.stdout)["tokens"]}
    assert tokens[token_id]["status"] == "revoked" and tokens[token_id]["revoked_at"].endswith("Z")
    assert tokens[admin_id] | {"created_at": None, "created_by": None} == {
        "id": admin_id,
        "scope": "admin",
        "run": None,
        "label": "",
        "status": "active",
        "created_at": None,
        "expires_at": None,
        "revoked_at": None,
        "created_by": None,
    }
    assert tokens[admin_id]["created_by"].startswith("cli:")
    assert token.split("_", 3)[3] not in as_json.stdout
    with TokenStore.open() as store, pytest.raises(AuthenticationFailed) as caught:
        store.authenticate(token)
    assert caught.value.failure is AuthFailure.REVOKED


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("create", "--scope", "job"), 2, "bound to one run"),
        (("create", "--scope", "job", "--run", "r1", "--expires", "never"), 2, "must expire"),
        (("create", "--scope", "viewer", "--run", "r1"), 2, "only for job tokens"),
        (("create", "--scope", "viewer", "--expires", "soon"), 2, "not a time"),
        (("create", "--scope", "root"), 2, "invalid choice"),
        (("revoke", "tg_00000000"), 3, "no server tokens"),  # nothing made yet: the store is missing
        (("list",), 3, "no server tokens"),
    ],
)
def test_usage_errors_and_a_missing_store(home: Path, args: tuple[str, ...], code: int, message: str) -> None:
    done = _run(home, *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert done.stdout == ""


def test_revoking_an_unknown_id_or_a_pasted_token(home: Path) -> None:
    token, token_id = _create(home, "--scope", "viewer")
    unknown = _run(home, "revoke", "tg_00000000")
    assert unknown.returncode == 2 and "no token tg_00000000" in unknown.stderr
    pasted = _run(home, "revoke", token)
    assert pasted.returncode == 2 and f"its id is {token_id}" in pasted.stderr
    assert token.split("_", 3)[3] not in pasted.stderr


def test_on_postgresql(home: Path, pg_location: str) -> None:
    token, token_id = _create(home, "--store", pg_location, "--scope", "viewer", "--expires", "2w")
    with TokenStore.open(pg_location) as store:
        assert store.authenticate(token).scope is Scope.VIEWER
    assert _run(home, "revoke", token_id, "--store", pg_location).returncode == 0
    listed = _run(home, "list", "--json", "--store", pg_location)
    assert [t["status"] for t in json.loads(listed.stdout)["tokens"]] == ["revoked"]
    expires = datetime.fromisoformat(json.loads(listed.stdout)["tokens"][0]["expires_at"])
    assert 13 <= (expires - datetime.now(UTC)).days <= 14


def test_help_imports_no_server_code() -> None:
    code = (
        "import sys\n"
        "from trainguard.cli import main\n"
        "try:\n"
        "    main(['server', 'token', 'create', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('trainguard.server', 'trainguard.ledger', 'psycopg')\n"
        "loaded = [m for m in sys.modules if m.startswith(heavy)]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps to the terminal's width
    assert "--expires WHEN" in text and "never (not for job tokens)" in text
