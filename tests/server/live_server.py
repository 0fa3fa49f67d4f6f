"""A ledger with tokens of every kind, and `trainguard serve` over it as a real process, for the fuzz and
security tests (tests/server/test_api_fuzz.py, tests/server/test_security.py).

`LiveServer(...)` runs the real command (uvicorn workers, the command's own logging). For the limits
no flag reaches (a body timeout of a second, to see a 408 without waiting a minute), `limited=True` runs
uvicorn on `limited_app`, which builds the same app with `ServeLimits` read from the environment.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.server.serve_process import LEDGER_VARIABLES, Serve, free_port, home_env, serve_argv
from trainguard.ledger import SigningKey, new_event
from trainguard.server import Scope, TokenStore

if TYPE_CHECKING:
    from fastapi import FastAPI

    from trainguard.server._ratelimit import RateLimits

ORIGIN = "test.example/security"
JOB_RUN = "job-run"
OTHER_RUN = "other-run"
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


def batch(run: str, prefix: str, n: int = 1, **payload: Any) -> bytes:
    items = [
        {
            "key": f"{prefix}/{i}",
            "event": json.loads(new_event("test.step", {"i": i, **payload}, run_id=run).canonical()),
        }
        for i in range(n)
    ]
    return json.dumps({"events": items}).encode()


class LiveServer(Serve):
    """A server process on loopback, started. Its stdout and stderr go to files the tests read whole."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        limited: bool = False,
        extra_env: dict[str, str] | None = None,
        flags: tuple[str, ...] = ("--rate-failures", "1000000000", "--rate-reader", "1000000000"),
    ) -> None:
        self.ledger = ledger
        port = free_port()
        if limited:
            env = home_env(
                ledger.home,
                drop=(),
                extra={
                    **(extra_env or {}),
                    "TRAINGUARD_LEDGER": ledger.store,
                    "TRAINGUARD_LEDGER_KEY": str(ledger.key),
                },
            )
            argv = [
                *(sys.executable, "-m", "uvicorn", "--factory", "tests.server.live_server:limited_app"),
                *("--app-dir", str(REPO), "--host", "127.0.0.1", "--port", str(port), "--no-server-header"),
            ]
        else:
            env = home_env(ledger.home, extra=extra_env)
            for name in LEDGER_VARIABLES:
                env.pop(name, None)
            argv = serve_argv(ledger.store, ledger.key, port, *flags)
        super().__init__(argv, env, port=port, logs=ledger.home, separate_output=True, cwd=REPO)
        self.start()


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
