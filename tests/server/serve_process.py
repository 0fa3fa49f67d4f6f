"""`trainguard serve` as a real process, and the `trainguard` command line, for the tests that talk to one.

`Serve` runs an argv (built by the caller, or by `Serve.command` from store, key, flags and workers) with
its output in files, waits for GET /healthz with a deadline, stops with SIGTERM then SIGKILL, and speaks
plain HTTP to it. `cli` runs `python -m trainguard` and `token` makes a server token with it.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

DEADLINE_S = 90.0
"""How long a server gets to answer /healthz; generous, never a timing claim."""
CLI_TIMEOUT_S = 120.0
LEDGER_VARIABLES = ("TRAINGUARD_LEDGER", "TRAINGUARD_LEDGER_KEY")
"""Set in a developer's shell, these would point a command at a ledger other than the test's."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def home_env(
    home: Path, *, drop: Iterable[str] = LEDGER_VARIABLES, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment with TRAINGUARD_HOME=`home`, `drop` removed, then `extra` set."""
    env = {**os.environ, "TRAINGUARD_HOME": str(home)}
    for name in drop:
        env.pop(name, None)
    return {**env, **(extra or {})}


def cli(
    home: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """`python -m trainguard ARGS` in `env` (by default `home_env(home)`), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "trainguard", *args],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else home_env(home),
        timeout=timeout,
        check=False,
    )


def make_token(home: Path, store: str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """A new token from `trainguard server token create --store STORE ARGS`."""
    done = cli(home, "server", "token", "create", "--store", store, *args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def events_path(run: str) -> str:
    return f"/api/v1/runs/{quote(run, safe='')}/events"


def events_batch(items: Sequence[tuple[str, bytes]]) -> bytes:
    """The body of POST .../events: each (key, canonical event bytes) sent as they are."""
    parts = [b'{"key":' + json.dumps(key).encode() + b',"event":' + data + b"}" for key, data in items]
    return b'{"events":[' + b",".join(parts) + b"]}"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    """Names in lower case."""
    body: bytes

    def json(self, *, typed: bool = True) -> Any:
        """The body parsed; with `typed`, first assert it was sent as application/json."""
        if typed:
            assert self.headers.get("content-type") == "application/json", self
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
) -> Answer:
    """One plain HTTP request on a connection of its own. A body goes as application/json unless
    `headers` say otherwise; `token` goes as a bearer token."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
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


def serve_argv(store: str, key: Path, port: int, *flags: str, workers: int | None = None) -> list[str]:
    """`python -m trainguard serve` on `port` over `store`, signing with `key`."""
    argv = [sys.executable, "-m", "trainguard", "serve", "--store", store, "--key", str(key)]
    argv += ["--port", str(port)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return [*argv, *flags]


class Serve:
    """A server process on 127.0.0.1:`port`, its output in files under `logs`.

    The output goes to `logs/serve-PORT.log`, stdout and stderr together, or with `separate_output` to
    `serve-PORT.out` and `serve-PORT.err`. With `append` a start adds to what earlier starts wrote (a
    server stopped and started again on its port keeps one log); without, each start begins the file anew.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        port: int,
        logs: Path,
        separate_output: bool = False,
        append: bool = False,
        cwd: Path | None = None,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.separate_output = separate_output
        self.append = append
        self.cwd = cwd
        self.deadline_s = deadline_s
        if separate_output:
            self.stdout_path = logs / f"serve-{port}.out"
            self.stderr_path: Path | None = logs / f"serve-{port}.err"
        else:
            self.stdout_path = logs / f"serve-{port}.log"
            self.stderr_path = None
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def command(
        cls,
        home: Path,
        store: str,
        key: Path,
        *flags: str,
        workers: int | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        append: bool = False,
        deadline_s: float = DEADLINE_S,
    ) -> Serve:
        """`trainguard serve` over `store` (not started), in `env` (by default `home_env(home)`), with
        its log in `home`."""
        port = port if port is not None else free_port()
        return cls(
            serve_argv(store, key, port, *flags, workers=workers),
            env if env is not None else home_env(home),
            port=port,
            logs=home,
            append=append,
            deadline_s=deadline_s,
        )

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process and return at once."""
        mode = "ab" if self.append else "wb"
        with contextlib.ExitStack() as files:
            out = files.enter_context(self.stdout_path.open(mode))
            err: Any = subprocess.STDOUT
            if self.stderr_path is not None:
                err = files.enter_context(self.stderr_path.open(mode))
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=err, env=self.env, cwd=self.cwd)
        return self.proc

    def start(self) -> Serve:
        """Start the process and wait until GET /healthz answers 200; fail the test if it exits first
        or does not answer by the deadline."""
        proc = self.launch()
        deadline = time.monotonic() + self.deadline_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"trainguard serve exited {proc.returncode}: {self.output()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/healthz").status == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"trainguard serve did not answer: {self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        """Everything the process wrote: stdout, then stderr where they are apart."""
        text = self.stdout_path.read_text(errors="replace")
        if self.stderr_path is not None:
            text += self.stderr_path.read_text(errors="replace")
        return text

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not exited 30 seconds later."""
        if self.proc is not None and self.proc.poll() is None:
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
        headers: Mapping[str, str] | None = None,
        **named: str,
    ) -> Answer:
        """`request` to this server; `named` headers are spelled with "-" for "_" (x_forwarded_for=...)."""
        sent = {**(headers or {}), **{k.replace("_", "-"): v for k, v in named.items()}}
        return request(self.port, method, path, body, token, sent)

    def post_events(self, run: str, items: Sequence[tuple[str, bytes]], token: str) -> Answer:
        """POST (key, canonical event bytes) pairs to `run`'s events."""
        return self.request("POST", events_path(run), events_batch(items), token)

    @contextlib.contextmanager
    def socket(self) -> Iterator[socket.socket]:
        """A raw TCP connection to the server."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            yield sock


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost valid for a day, and its key (mode 0600): cert.pem, key.pem in `folder`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
