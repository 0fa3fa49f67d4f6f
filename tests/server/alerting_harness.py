"""A real webhook receiver (an HTTP server on a thread) and a ledger with tokens to run `trainguard serve`
over with its alerting flags, for tests/server/test_webhooks.py, test_metrics.py and test_ratelimit.py."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.server.serve_process import DEADLINE_S, Serve, cli, free_port, make_token
from trainguard.ledger import SigningKey, new_event

ORIGIN = "test.example/alerting"
# Fast retries, so a test sees several attempts in a few seconds.
FAST_HOOKS = ("--webhook-attempts", "3", "--webhook-backoff", "0.2", "--webhook-timeout", "3")


def wait_for(what: str, check: Callable[[], bool], deadline_s: float = DEADLINE_S) -> None:
    """Poll `check` until it holds; fail naming `what` after a generous deadline (never a timing claim)."""
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1. `answers` is consumed one status per request; when empty every
    request gets `default`. `hold_s` keeps each request open that long before answering."""

    port: int = field(default_factory=free_port)
    default: int = 200
    answers: list[int] = field(default_factory=list)
    hold_s: float = 0.0
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/secret-path-token"

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.in_flight += 1
                    receiver.most_in_flight = max(receiver.most_in_flight, receiver.in_flight)
                    status = receiver.answers.pop(0) if receiver.answers else receiver.default
                time.sleep(receiver.hold_s)
                with receiver._lock:
                    receiver.in_flight -= 1
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if status >= 300 else b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(r.body) for r in self.received]

    def count(self) -> int:
        with self._lock:
            return len(self.received)


def event(run: str, event_type: str, **payload: Any) -> bytes:
    return new_event(event_type, payload, run_id=run).canonical()


@dataclass
class Site:
    """A ledger with its signing key and tokens, ready for `Serve`."""

    home: Path
    store: str
    key: Path
    admin: str
    viewer: str
    job: str
    run: str

    def serve(self, *flags: str, workers: int = 1) -> contextlib.AbstractContextManager[Serve]:
        @contextlib.contextmanager
        def running() -> Iterator[Serve]:
            server = Serve.command(self.home, self.store, self.key, *flags, workers=workers).start()
            try:
                yield server
            finally:
                server.stop()

        return running()

    def add_webhook(self, url: str, *flags: str, secret: bytes = b"s" * 32) -> str:
        """`trainguard server webhook add URL FLAGS` with `secret` in a file; the new webhook's id line."""
        secret_file = self.home / "hook.secret"
        secret_file.write_bytes(secret + b"\n")
        done = cli(
            self.home,
            "server",
            "webhook",
            "add",
            url,
            "--store",
            self.store,
            "--secret-file",
            str(secret_file),
            *flags,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def make_site(home: Path, store: str, run: str = "alert-run") -> Site:
    key = home / "keys" / "serve.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    SigningKey.generate(ORIGIN).save(key)
    admin = make_token(home, store, "--scope", "admin")
    viewer = make_token(home, store, "--scope", "viewer")
    job = make_token(home, store, "--scope", "job", "--run", run, "--expires", "1h")
    return Site(home, store, key, admin, viewer, job, run)
