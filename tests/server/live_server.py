"""A ledger with tokens of every kind, and `trainguard serve` over it as a real process, for the fuzz and
security tests (tests/server/test_api_fuzz.py, tests/server/test_security.py).

`LiveServer.start(...)` runs the real command (uvicorn workers, the command's own logging). For the limits
no flag reaches (a body timeout of a second, to see a 408 without waiting a minute), `limited=True` runs
uvicorn on `limited_app`, which builds the same app with `ServeLimits` read from the environment.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from trainguard.ledger import SigningKey, new_event
from trainguard.server import Scope, TokenStore

if TYPE_CHECKING:
    from fastapi import FastAPI

    from trainguard.server._ratelimit import RateLimits

ORIGIN = "test.example/security"
JOB_RUN = "job-run"
OTHER_RUN = "other-run"
DEADLINE_S = 90.0
REPO = Path(__file__).resolve().parents[2]
ENV_BODY_TIMEOUT = "TRAINGUARD_TEST_BODY_TIMEOUT_S"
ENV_MAX_BODY = "TRAINGUARD_TEST_MAX_BODY_BYTES"


@dataclass(frozen=True)
class Tokens:
    admin: str
    viewer: str
    job: str
    """A job token for JOB_RUN."""
    other_job: str
    """A job token for OTHER_RUN."""
    revoked: str
    expired: str

    def all(self) -> list[str]:
        return [self.admin, self.viewer, self.job, self.other_job, self.revoked, self.expired]

    def secrets(self) -> list[str]:
        """The part of each token that must never be written anywhere but the client."""
        return [token.split("_", 3)[3] for token in self.all()]  # the secret may hold "_"


@dataclass(frozen=True)
class Ledger:
    home: Path
    store: str
    key: Path
    tokens: Tokens


def make_ledger(home: Path) -> Ledger:
    """A SQLite ledger under `home` with its key and one token of each kind (and a revoked, an expired)."""
    home.mkdir(parents=True, exist_ok=True)
    key = home / "ledger.key"
    SigningKey.generate(ORIGIN).save(key)
    store = str(home / "ledger.db")
    with TokenStore.open(store, create=True) as tokens:

        def create(scope: Scope, run: str | None = None) -> str:
            expires = datetime.now(UTC) + timedelta(days=1)
            return tokens.create(scope, run=run, expires_at=expires, created_by="test").token

        revoked = create(Scope.VIEWER)
        tokens.revoke(token_id(revoked))
        past = datetime.now(UTC) - timedelta(hours=2)
        expired = tokens.create(
            Scope.ADMIN, expires_at=past + timedelta(hours=1), created_by="test", now=past
        ).token
        issued = Tokens(
            admin=create(Scope.ADMIN),
            viewer=create(Scope.VIEWER),
            job=create(Scope.JOB, JOB_RUN),
            other_job=create(Scope.JOB, OTHER_RUN),
            revoked=revoked,
            expired=expired,
        )
    return Ledger(home, store, key, issued)


def token_id(token: str) -> str:
    """The public id: tgs_<tg_xxxxxxxx>_<secret>."""
    return "_".join(token.split("_", 3)[1:3])


def make_app(ledger: Ledger) -> FastAPI:
    from trainguard.server._app import create_app

    return create_app(ledger.store, key_path=ledger.key, rate_limits=no_rate_limits())


def no_rate_limits() -> RateLimits:
    """Limits no test reaches: the matrix sends far more refused tokens than a real client would."""
    from trainguard.server._ratelimit import RateLimits

    return RateLimits(job=10**9, reader=10**9, failures=10**9)


def close_app(app: FastAPI) -> None:
    app.state.server.close()


def events_path(run: str) -> str:
    return f"/api/v1/runs/{quote(run, safe='')}/events"


def batch(run: str, prefix: str, n: int = 1, **payload: Any) -> bytes:
    items = [
        {
            "key": f"{prefix}/{i}",
            "event": json.loads(new_event("test.step", {"i": i, **payload}, run_id=run).canonical()),
        }
        for i in range(n)
    ]
    return json.dumps({"events": items}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self
        return json.loads(self.body)


class LiveServer:
    """A server process on loopback. Its stdout and stderr go to files the tests read whole."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        limited: bool = False,
        extra_env: dict[str, str] | None = None,
        flags: tuple[str, ...] = ("--rate-failures", "1000000000", "--rate-reader", "1000000000"),
    ) -> None:
        self.ledger = ledger
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = ledger.home / f"serve-{self.port}.err"
        self.stdout_path = ledger.home / f"serve-{self.port}.out"
        env = {**os.environ, "TRAINGUARD_HOME": str(ledger.home), **(extra_env or {})}
        if limited:
            env["TRAINGUARD_LEDGER"] = ledger.store
            env["TRAINGUARD_LEDGER_KEY"] = str(ledger.key)
            argv = [
                *(sys.executable, "-m", "uvicorn", "--factory", "tests.server.live_server:limited_app"),
                *(
                    "--app-dir",
                    str(REPO),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--no-server-header",
                ),
            ]
        else:
            env.pop("TRAINGUARD_LEDGER", None)
            env.pop("TRAINGUARD_LEDGER_KEY", None)
            argv = [
                *(sys.executable, "-m", "trainguard", "serve", "--store", ledger.store),
                *("--key", str(ledger.key), "--port", str(self.port), *flags),
            ]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=REPO)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.output()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/healthz").status == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not answer: {self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        """Everything the process wrote, stdout and stderr."""
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            sent = dict(headers or {})
            if token is not None:
                sent["Authorization"] = f"Bearer {token}"
            if body is not None:
                sent.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        finally:
            conn.close()

    @contextlib.contextmanager
    def socket(self) -> Iterator[socket.socket]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            yield sock


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 answer read off a raw socket (the server closes or sends Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(status, headers, body)


def limited_app() -> FastAPI:
    """The server's app with limits from the environment (uvicorn --factory)."""
    from trainguard.server._app import ServeLimits, create_app

    limits = ServeLimits(
        body_timeout_s=float(os.environ.get(ENV_BODY_TIMEOUT, "60")),
        max_body_bytes=int(os.environ.get(ENV_MAX_BODY, str(8 << 20))),
    )
    key = Path(os.environ["TRAINGUARD_LEDGER_KEY"])
    store = os.environ["TRAINGUARD_LEDGER"]
    return create_app(store, key_path=key, limits=limits, rate_limits=no_rate_limits())
