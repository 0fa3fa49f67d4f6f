"""A real `trainguard serve` (SQLite or PostgreSQL) and a job host beside it, each with a home of its own.

The server's home holds its ledger key and tokens; the job's home holds its spool and the token file. Jobs
run as real processes through `python -m trainguard run`; events are read back through the server's API.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.ledger.conftest import PG_URL, pg_schema, with_query
from tests.server import serve_process
from tests.server.serve_process import LEDGER_VARIABLES, Serve, free_port, home_env, make_token
from trainguard.ledger import SigningKey

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

RUN = "train-42"
PATIENCE_S = 120.0
_SERVER_VARIABLES = ("TRAINGUARD_SERVER", "TRAINGUARD_SERVER_TOKEN_FILE", "TRAINGUARD_SERVER_ALLOW_HTTP")


def cli(home: Path, *args: str, timeout: float = PATIENCE_S, **env: str) -> subprocess.CompletedProcess[str]:
    return serve_process.cli(home, *args, env=clean_env(home, **env), timeout=timeout)


def clean_env(home: Path, **env: str) -> dict[str, str]:
    drop = (*LEDGER_VARIABLES, "TRAINGUARD_RUN_ID", *_SERVER_VARIABLES)
    return home_env(home, drop=drop, extra={"OMP_NUM_THREADS": "1", **env})


def serve(home: Path, store: str, port: int) -> Serve:
    """`trainguard serve` on `port`, not started; stopped and started again at will, with one log."""
    return Serve.command(
        home,
        store,
        home / "keys" / "serve.key",
        port=port,
        env=clean_env(home),
        append=True,
        deadline_s=PATIENCE_S,
    )


@dataclass
class Deployment:
    server: Serve
    server_home: Path
    job_home: Path
    viewer: str
    job_token: str
    token_file: Path
    """A mode 600 file holding `job_token`, a job token of RUN."""
    other_tokens: dict[str, Path] = field(default_factory=dict)
    """Token files that must be refused for RUN: revoked, another run's, a viewer's, unknown."""

    def events(self, run: str = RUN) -> list[dict[str, Any]]:
        """Every event of `run`, in log order, read through GET /api/v1/runs/{run}/events."""
        found: list[dict[str, Any]] = []
        start: int | None = 0
        while start is not None:
            path = f"/api/v1/runs/{quote(run, safe='')}/events?start={start}&limit=1000"
            answer = self.server.request("GET", path, token=self.viewer)
            assert answer.status == 200, answer.body
            doc = json.loads(answer.body)
            found.extend(item["event"] for item in doc["events"])
            start = doc["next"]
        return found

    def run(self, job: Sequence[str], *options: str, **env: str) -> subprocess.Popen[str]:
        """`trainguard run --no-env-check OPTIONS -- JOB` on the job host, in the background."""
        return subprocess.Popen(
            [sys.executable, "-m", "trainguard", "run", "--no-env-check", *options, "--", *job],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(self.job_home, **env),
        )

    def server_options(self, token_file: Path | None = None) -> list[str]:
        return ["--server", self.server.url, "--server-token-file", str(token_file or self.token_file)]


def _token(home: Path, store: str, *args: str) -> str:
    return make_token(home, store, *args, env=clean_env(home))


def token_file(folder: Path, name: str, token: str, mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


@contextlib.contextmanager
def deployment(tmp_path: Path, store: str | None, *, start: bool = True) -> Iterator[Deployment]:
    server_home, job_home = tmp_path / "server-home", tmp_path / "job-home"
    (server_home / "keys").mkdir(parents=True)
    job_home.mkdir()
    store = store or str(server_home / "ledger.db")
    SigningKey.generate("test.example/relay").save(server_home / "keys" / "serve.key")
    viewer = _token(server_home, store, "--scope", "viewer")
    job = _token(server_home, store, "--scope", "job", "--run", RUN, "--expires", "1h")
    revoked = _token(server_home, store, "--scope", "job", "--run", RUN, "--expires", "1h")
    done = cli(server_home, "server", "token", "revoke", "--store", store, revoked[4:15])
    assert done.returncode == 0, done.stderr
    other = _token(server_home, store, "--scope", "job", "--run", "another-run", "--expires", "1h")
    unknown = "tgs_tg_00000000_" + job[16:]
    tokens = job_home / "tokens"
    tokens.mkdir(mode=0o700)
    others = {
        "revoked": token_file(tokens, "revoked", revoked),
        "other-run": token_file(tokens, "other", other),
        "viewer": token_file(tokens, "viewer", viewer),
        "unknown": token_file(tokens, "unknown", unknown),
    }
    server = serve(server_home, store, free_port())
    if start:
        server.start()
    try:
        yield Deployment(server, server_home, job_home, viewer, job, token_file(tokens, "job", job), others)
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (a SQLite ledger in the server's home), or a PostgreSQL schema no one uses."""
    if request.param == "sqlite":
        yield None
        return
    with pg_schema() as schema:
        yield with_query(PG_URL, schema=schema)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=PATIENCE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"trainguard run did not finish:\n{err}")
    return proc.returncode, out, err
