"""`trainguard keygen`, `trainguard ledger ...` and `trainguard witness serve`, run as real processes."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ledger.conftest import PG_URL, pg_schema, with_query
from trainguard.ledger._events import new_event
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._merkle import leaf_hash

ROOT = Path(__file__).resolve().parents[2]


def _run(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRAINGUARD_HOME": str(home)}
    env.pop("TRAINGUARD_LEDGER", None)
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=120,
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A TRAINGUARD_HOME whose default ledger holds five events."""
    home = tmp_path / "home"
    for step in range(5):
        done = _run(home, "ledger", "append", "--type", "step", "--payload", json.dumps({"step": step}))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(step)
    return home


def test_first_append_creates_a_private_key_and_says_so(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = _run(home, "ledger", "append", "--type", "run.start")
    assert done.returncode == 0, done.stderr
    assert "created the ledger signing key" in done.stderr
    assert (home / "keys" / "ledger.key").stat().st_mode & 0o777 == 0o600
    assert (home / "keys" / "ledger.pub").read_text().startswith("trainguard/")


def test_verify_head_prove_show_export(home: Path, tmp_path: Path) -> None:
    verified = _run(home, "ledger", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verified 5 entries" in verified.stdout

    head = _run(home, "ledger", "head").stdout
    assert head.splitlines()[1] == "5"

    proof = json.loads(_run(home, "ledger", "prove", "3").stdout)
    assert proof["index"] == 3 and proof["size"] == 5
    assert json.loads(proof["entry"])["payload"] == {"step": 3}
    consistency = json.loads(_run(home, "ledger", "prove", "--consistency", "2").stdout)
    assert consistency["old_size"] == 2 and consistency["consistency"]

    shown = [
        json.loads(line)
        for line in _run(home, "ledger", "show", "--start", "1", "--end", "3").stdout.splitlines()
    ]
    assert [event["payload"]["step"] for event in shown] == [1, 2]

    export = tmp_path / "ledger.jsonl"
    assert _run(home, "ledger", "export", str(export)).returncode == 0
    public = str(home / "keys" / "ledger.pub")
    offline = _run(home, "ledger", "verify", "--export", str(export), "--public-key", public)
    assert offline.returncode == 0, offline.stdout + offline.stderr

    # One edited character in the export is found and located.
    lines = export.read_text().splitlines()
    lines[-2] = lines[-2].replace('\\"step\\":3', '\\"step\\":7')
    export.write_text("\n".join(lines) + "\n")
    edited = _run(home, "ledger", "verify", "--export", str(export), "--public-key", public)
    assert edited.returncode == 1
    assert "first bad index: 3" in edited.stdout


def _sql(home: Path, statement: str, *params: object) -> None:
    with sqlite3.connect(home / "ledger.db") as db:
        db.execute(statement, params)


def test_edited_row_exits_1_and_names_its_index(home: Path) -> None:
    _sql(home, "UPDATE entries SET data = replace(data, '\"step\":2', '\"step\":9') WHERE idx = 2")
    done = _run(home, "ledger", "verify", "--format", "json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["first_bad_index"] == 2


def test_edit_with_recomputed_leaf_hash_is_still_caught(home: Path) -> None:
    with sqlite3.connect(home / "ledger.db") as db:
        (data,) = db.execute("SELECT data FROM entries WHERE idx = 1").fetchone()
        forged = bytes(data).replace(b'"step":1', b'"step":8')
        db.execute("UPDATE entries SET data = ? WHERE idx = 1", (forged,))
        db.execute("UPDATE nodes SET hash = ? WHERE level = 0 AND idx = 1", (leaf_hash(forged),))
    done = _run(home, "ledger", "verify")
    assert done.returncode == 1
    assert "first bad index: 1" in done.stdout


def test_a_deleted_checkpoint_row_exits_1_and_names_its_size(home: Path) -> None:
    # Each append signed one checkpoint, each naming the size of the one before it.
    _sql(home, "DELETE FROM checkpoints WHERE size = 3")
    done = _run(home, "ledger", "verify")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the checkpoint at size 3 is missing" in done.stdout


def test_a_replaced_verifier_key_in_the_store_exits_1(home: Path) -> None:
    origin = (home / "keys" / "ledger.pub").read_text().split("+")[0]
    other = SigningKey.generate(origin).verifier().text()
    _sql(home, "UPDATE meta SET value = ? WHERE key = 'verifier'", other)
    done = _run(home, "ledger", "verify")  # against keys/ledger.pub, kept apart from the store
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the store records verifier key" in done.stdout


def test_ledger_rewritten_under_another_key_is_caught(home: Path, tmp_path: Path) -> None:
    # The attacker builds a whole new history under the same origin with a key of their own, then puts it
    # in place of the real database. It is self-consistent; only the key kept apart gives it away.
    origin = (home / "keys" / "ledger.pub").read_text().split("+")[0]
    forged_key = SigningKey.generate(origin)
    forged = tmp_path / "forged.db"
    with Ledger.open(forged, key=forged_key, origin=origin) as ledger:
        ledger.append_many([new_event("step", {"step": 100 + step}) for step in range(5)])
    (home / "ledger.db").unlink()
    forged.rename(home / "ledger.db")
    done = _run(home, "ledger", "verify")
    assert done.returncode == 1
    assert "first bad index: 0" in done.stdout
    assert forged_key.verifier().ident in done.stdout


def test_wrong_key_permissions_are_refused(home: Path) -> None:
    key = home / "keys" / "ledger.key"
    key.chmod(0o644)
    done = _run(home, "ledger", "append", "--type", "step")
    assert done.returncode == 2
    assert "chmod 600" in done.stderr and str(key) in done.stderr


def test_bad_payload_is_a_usage_error(home: Path) -> None:
    done = _run(home, "ledger", "append", "--type", "step", "--payload", "[1, 2]")
    assert done.returncode == 2
    assert "must be a JSON object" in done.stderr


def test_unreadable_store_exits_3(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    done = _run(tmp_path, "ledger", "verify", "--store", str(junk))
    assert done.returncode == 3
    assert str(junk) in done.stderr
    assert "Traceback" not in done.stderr


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "w.key"
    first = _run(tmp_path, "keygen", str(key), "--name", "witness-a", "--witness")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("witness-a+")
    assert key.stat().st_mode & 0o777 == 0o600
    original = key.read_bytes()
    again = _run(tmp_path, "keygen", str(key), "--name", "witness-a", "--witness")
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert key.read_bytes() == original


@pytest.fixture
def witness(home: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    key = tmp_path / "witness.key"
    assert _run(tmp_path, "keygen", str(key), "--name", "witness-a", "--witness").returncode == 0
    env = {**os.environ, "TRAINGUARD_HOME": str(home)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainguard",
            "witness",
            "serve",
            "--key",
            str(key),
            "--log",
            str(home / "keys" / "ledger.pub"),
            "--state",
            str(tmp_path / "witness.db"),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("port "), process.stderr.read() if process.stderr else line
        yield f"http://127.0.0.1:{int(line.split()[1])}", tmp_path / "witness.key.pub"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_rollback_to_an_older_consistent_state_is_caught_only_by_the_witness(
    home: Path, tmp_path: Path, witness: tuple[str, Path]
) -> None:
    url, witness_key = witness
    db = home / "ledger.db"
    saved = tmp_path / "saved.db"
    with sqlite3.connect(db) as src, sqlite3.connect(saved) as dst:
        src.backup(dst)
    first = _run(home, "ledger", "verify", "--witness", url, "--witness-key", str(witness_key))
    assert first.returncode == 0, first.stdout + first.stderr
    assert _run(home, "ledger", "append", "--type", "step").returncode == 0
    grown = _run(home, "ledger", "verify", "--witness", url, "--witness-key", str(witness_key))
    assert grown.returncode == 0, grown.stdout + grown.stderr

    # Someone with write access restores the older, self-consistent database.
    with sqlite3.connect(saved) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    assert _run(home, "ledger", "verify").returncode == 0  # nothing inside the store betrays it
    caught = _run(home, "ledger", "verify", "--witness", url, "--witness-key", str(witness_key))
    assert caught.returncode == 1
    assert "rollback" in caught.stdout
    assert "first bad index: 5" in caught.stdout


# The README's PostgreSQL-and-witness commands, with the placeholders a test must replace.
README_STORE = "postgresql://ledger@db-host/evidence"
README_LISTEN = "0.0.0.0:7490"
README_WITNESS = "http://witness-host:7490"
_LEDGER_TABLES = ("entries", "nodes", "checkpoints", "cosignatures", "meta")


def _readme_witness_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("### Witnesses", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    for placeholder in (README_STORE, README_LISTEN, README_WITNESS):
        assert placeholder in block, f"the README's witness commands no longer say {placeholder}"
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_postgresql_ledger_with_a_witness_catches_a_rollback(tmp_path: Path) -> None:
    import psycopg

    commands = _readme_witness_commands()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_LEDGER")}
    env["TRAINGUARD_HOME"] = str(tmp_path / "home")  # no default key to fall back on

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        assert argv[0] == "trainguard", argv
        return subprocess.run(
            [sys.executable, "-m", "trainguard", *argv[1:]],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
            check=False,
        )

    with pg_schema() as schema:
        replace = {README_STORE: with_query(PG_URL, schema=schema), README_LISTEN: "127.0.0.1:0"}
        witness: subprocess.Popen[str] | None = None

        def filled(argv: list[str]) -> list[str]:
            for placeholder, value in replace.items():
                argv = [arg.replace(placeholder, value) for arg in argv]
            return argv

        try:
            for readme_argv in commands:
                argv = filled(readme_argv)
                if argv[0] == "export":
                    for assignment in argv[1:]:
                        name, _, value = assignment.partition("=")
                        env[name] = value
                elif argv[1:3] == ["witness", "serve"]:
                    witness = subprocess.Popen(
                        [sys.executable, "-m", "trainguard", *argv[1:]],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=env,
                        cwd=tmp_path,
                    )
                    assert witness.stdout is not None and witness.stderr is not None
                    line = witness.stdout.readline()
                    assert line.startswith("port "), witness.stderr.read()
                    replace[README_WITNESS] = f"http://127.0.0.1:{int(line.split()[1])}"
                else:
                    done = run(argv)
                    assert done.returncode == 0, f"{shlex.join(readme_argv)}:\n{done.stdout}{done.stderr}"
            verify = filled(commands[-1])
            assert verify[1:3] == ["ledger", "verify"]
            first = done  # what the README's last command printed
            assert "(example.org/train-ledger): verified 1 entries" in first.stdout
            assert f"witness {replace[README_WITNESS]} cosigned size 1: \u2014 witness-a " in first.stderr

            # Someone with write access saves the database, lets it grow, then puts the saved copy back.
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                for table in _LEDGER_TABLES:
                    conn.execute(f"CREATE TABLE {schema}.saved_{table} AS TABLE {schema}.{table}")
            for step in range(2):
                appended = run(["trainguard", "ledger", "append", "--type", "step", "--rank", str(step)])
                assert appended.returncode == 0, appended.stderr
            grown = run(verify)
            assert grown.returncode == 0, grown.stdout + grown.stderr
            assert "cosigned size 3" in grown.stderr
            with psycopg.connect(PG_URL, autocommit=True) as conn, conn.transaction():
                for table in _LEDGER_TABLES:
                    conn.execute(f"TRUNCATE {schema}.{table}")
                    conn.execute(f"INSERT INTO {schema}.{table} SELECT * FROM {schema}.saved_{table}")

            alone = run(verify[: verify.index("--witness")])
            assert alone.returncode == 0, alone.stdout + alone.stderr  # nothing inside the store betrays it
            caught = run(verify)
            assert caught.returncode == 1, caught.stdout + caught.stderr
            assert "rollback: the witness has cosigned size 3" in caught.stdout
            assert "first bad index: 1" in caught.stdout
        finally:
            if witness is not None:
                witness.terminate()
                witness.wait(timeout=30)


HELP_COMMANDS = [["ledger", "verify"], ["sign"], ["verify"], ["ckpt", "audit"], ["keygen"]]


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help_imports_no_room(command: list[str]) -> None:
    code = (
        "import sys; from trainguard.cli import main\n"
        f"try:\n    main({[*command, '--help']!r})\nexcept SystemExit:\n    pass\n"
        "rooms = ('trainguard.ledger', 'trainguard.provenance', 'trainguard.gate', 'cryptography', 'torch')\n"
        "assert not [m for m in rooms if m in sys.modules], sorted(m for m in rooms if m in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", [["verify"], ["head"], ["show"], ["prove", "0"], ["export", "out.jsonl"]])
def test_reading_a_ledger_that_does_not_exist_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    home = tmp_path / "empty-home"
    done = _run(home, "ledger", *command)
    assert done.returncode == 3, done.stdout + done.stderr  # never "verified": it may have been deleted
    assert "no ledger at" in done.stderr
    assert not home.exists()


def test_show_of_an_entry_beyond_the_end_is_an_error(home: Path) -> None:
    done = _run(home, "ledger", "show", "999")
    assert done.returncode == 2
    assert "has 5 entries (0..4); no entry 999" in done.stderr
