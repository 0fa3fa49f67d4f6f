"""What `trainguard serve` writes to its log never holds a token's secret, however the client spelled it."""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest

from trainguard.server._serve import _redact, _RedactTokens

TOKEN_ID = "tg_0123abcd"
SECRET = "Ab3_-" + "x" * 37 + "A"
TOKEN = f"tgs_{TOKEN_ID}_{SECRET}"


@pytest.mark.parametrize(
    "spelling",
    [
        TOKEN,
        quote(TOKEN, safe=""),  # _ stays as it is: quote leaves it
        TOKEN.replace("_", "%5F"),
        TOKEN.replace("_", "%5f"),
        "".join(f"%{byte:02X}" for byte in TOKEN.encode()),  # every character escaped
        TOKEN[:-10],  # cut short
    ],
    ids=["plain", "quoted", "underscores-escaped", "lowercase-escapes", "all-escaped", "truncated"],
)
def test_a_token_in_a_request_line_is_redacted_however_it_is_spelled(spelling: str) -> None:
    line = f'127.0.0.1:5000 - "GET /api/v1/runs/{spelling}/events?token={spelling} HTTP/1.1" 401'
    logged = _redact(line)
    assert SECRET[:20] not in logged and "x" * 20 not in logged, logged
    assert "[redacted]" in logged
    if spelling in (TOKEN, TOKEN.replace("_", "%5F")):
        assert TOKEN_ID in logged  # the public id stays, for whoever reads the log


def test_a_line_without_a_token_is_logged_as_it_came() -> None:
    line = '127.0.0.1:5000 - "GET /api/v1/runs/exp%2F7/events?start=10 HTTP/1.1" 200'
    assert _redact(line) == line


def test_the_filter_redacts_the_message_and_every_argument() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, "%s %s", (TOKEN, quote(TOKEN).replace("_", "%5F")), None
    )
    assert _RedactTokens().filter(record)
    assert all(SECRET not in str(arg) for arg in record.args or ())
    assert record.msg == "%s %s"
