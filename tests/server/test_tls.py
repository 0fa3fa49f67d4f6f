"""`trainguard serve --tls-cert --tls-key`: HTTPS served by the server itself, and the flags' usage errors."""

from __future__ import annotations

import http.client
import ssl
import time
from pathlib import Path

import pytest

from tests.ledger.conftest import ORIGIN
from tests.server.serve_process import Serve, free_port, home_env, self_signed_certificate
from trainguard.ledger import SigningKey
from trainguard.server import TokenStore

pytest.importorskip("fastapi")

DEADLINE_S = 60.0


def _serve(home: Path, port: int, *flags: str) -> Serve:
    """`trainguard serve` over a SQLite ledger in `home` on `port`, launched and not waited for."""
    key = home / "ledger.key"
    if not key.exists():
        SigningKey.generate(ORIGIN).save(key)
        TokenStore.open(str(home / "ledger.db"), create=True).close()
    server = Serve.command(
        home, str(home / "ledger.db"), key, *flags, port=port, env=home_env(home, drop=("TRAINGUARD_LEDGER",))
    )
    server.launch()
    return server


def test_the_server_speaks_https_with_its_own_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    port = free_port()
    server = _serve(tmp_path, port, "--tls-cert", str(cert), "--tls-key", str(key))
    proc = server.proc
    assert proc is not None
    context = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert proc.poll() is None, server.output()
            try:
                conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
                conn.request("GET", "/healthz")
                answer = conn.getresponse()
                assert (answer.status, answer.read()) == (200, b'{"status":"ok"}')
                conn.close()
                break
            except (ConnectionRefusedError, ConnectionResetError):
                assert time.monotonic() < deadline, "trainguard serve did not answer"
                time.sleep(0.1)
        # Plain HTTP on the TLS port gets no answer of the API.
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            plain.request("GET", "/healthz")
            status: int | None = plain.getresponse().status
        except (http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine):
            status = None
        finally:
            plain.close()
        assert status != 200
    finally:
        server.stop()
    output = server.output()
    assert f"on https://127.0.0.1:{port}" in output, output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "key.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "missing.pem", "--tls-key", "key.pem"], "--tls-cert"),
    ],
)
def test_tls_flags_that_cannot_work_are_a_usage_error_before_any_worker_starts(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    self_signed_certificate(tmp_path)
    server = _serve(tmp_path, free_port(), *[str(tmp_path / f) if f.endswith(".pem") else f for f in flags])
    assert server.proc is not None
    server.proc.wait(DEADLINE_S)
    output = server.output()
    assert server.proc.returncode == 2, output
    assert message in output and "Traceback" not in output, output
