"""A real `trainguard serve` (SQLite or PostgreSQL) and a job host beside it, each with a home of its own.

The server's home holds its ledger key and tokens; the job's home holds its spool and the token file. Jobs
run as real processes through `python -m trainguard run`; events are read back through the server's API.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.ledger.conftest import PG_URL, pg_schema, with_query
from trainguard.ledger import SigningKey

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

RUN = "train-42"
PATIENCE_S = 120.0
_SERVER_VARIABLES = ("TRAINGUARD_SERVER", "TRAINGUARD_SERVER_TOKEN_FILE", "TRAINGUARD_SERVER_ALLOW_HTTP")


def cli(home: Path, *args: str, timeout: float = PATIENCE_S, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *args],
        capture_output=True,
        text=True,
        env=clean_env(home, **env),
        timeout=timeout,
        check=False,
    )


def clean_env(home: Path, **env: str) -> dict[str, str]:
    out = {**os.environ, "TRAINGUARD_HOME": str(home), "OMP_NUM_THREADS": "1"}
    for name in ("TRAINGUARD_LEDGER", "TRAINGUARD_LEDGER_KEY", "TRAINGUARD_RUN_ID", *_SERVER_VARIABLES):
        out.pop(name, None)
    return {**out, **env}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Serve:
    """`trainguard serve` on `port`, as a process; stopped and started again at will."""

    def __init__(self, home: Path, store: str, port: int) -> None:
        self.home = home
        self.store = store
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.key = home / "keys" / "serve.key"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / f"serve-{port}.log"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "trainguard", "serve", "--store", self.store),
                    *("--key", str(self.key), "--port", str(self.port)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_env(self.home),
            )
        deadline = time.monotonic() + PATIENCE_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"trainguard serve exited {self.proc.returncode}: {self.output()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/healthz")[0] == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"trainguard serve did not answer: {self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, method: str, path: str, token: str | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


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
            status, body = self.server.request("GET", path, self.viewer)
            assert status == 200, body
            doc = json.loads(body)
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
    done = cli(home, "server", "token", "create", "--store", store, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


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
    server = Serve(server_home, store, free_port())
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
