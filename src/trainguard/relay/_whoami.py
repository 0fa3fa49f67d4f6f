"""Asks the server whether it accepts a token, before a job is launched that reports with it.

who = whoami("https://tg.example", token)    # TokenGrant(token_id, scope, run, expires_at)

ServerError
├── ServerRefused       401 or 403: the token is unknown, expired, revoked, or not a job's (fail closed)
└── ServerUnreachable   no answer, a timeout, a 5xx or an answer that is not the server's (try later)
"""

from __future__ import annotations

import dataclasses
import http.client
import ssl
import time
import urllib.parse

from trainguard._strictjson import loads_strict
from trainguard.errors import ExitCode, TrainguardError

__all__ = ["ServerError", "ServerRefused", "ServerUnreachable", "TokenGrant", "whoami"]

_MAX_ANSWER = 64 << 10
_READ_CHUNK = 16 << 10


class ServerError(TrainguardError):
    """The server's answer about a token was not a grant."""

    exit_code = ExitCode.UNDECIDED


class ServerRefused(ServerError):
    """The server refuses the token: nothing reported with it would be stored."""

    exit_code = ExitCode.USAGE


class ServerUnreachable(ServerError):
    """The server could not be asked now."""


@dataclasses.dataclass(frozen=True)
class TokenGrant:
    """What the server says a token may do: never the secret."""

    token_id: str
    scope: str
    run: str | None
    expires_at: str | None


def whoami(url: str, token: str, *, timeout: float = 10.0) -> TokenGrant:
    """GET {url}/api/v1/whoami with `token`: the grant, ServerRefused, or ServerUnreachable."""
    parts = urllib.parse.urlsplit(url)
    path = f"{parts.path.rstrip('/')}/api/v1/whoami"
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    origin = f"{parts.scheme}://{parts.netloc}"
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
        response = conn.getresponse()
        status = response.status
        data = _read(response, timeout)
    except (OSError, http.client.HTTPException) as exc:
        raise ServerUnreachable(
            f"the server at {origin} does not answer: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        conn.close()
    if status in (401, 403):
        raise ServerRefused(
            f"the server at {origin} refuses the job token (HTTP {status}: {_snippet(data)})",
            hint="the token may be mistyped, expired or revoked: create a new one with "
            "`trainguard server token create --scope job --run RUN`",
        )
    if status != 200 or data is None:
        raise ServerUnreachable(f"the server at {origin} answered HTTP {status}: {_snippet(data)}")
    return _grant(data, origin)


def _read(response: http.client.HTTPResponse, timeout: float) -> bytes | None:
    """The answer, or None above _MAX_ANSWER; the deadline bounds a server that drips."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read(_READ_CHUNK):
        size += len(chunk)
        if size > _MAX_ANSWER:
            return None
        if time.monotonic() > deadline:
            raise TimeoutError(f"the answer took more than {timeout:g} s")
        chunks.append(chunk)
    return b"".join(chunks)


def _grant(data: bytes, origin: str) -> TokenGrant:
    try:
        doc = loads_strict(data)
    except (ValueError, RecursionError):
        doc = None
    fields = ("token_id", "scope", "run", "expires_at")
    if not isinstance(doc, dict) or not all(name in doc for name in fields):
        raise ServerUnreachable(f"{origin} does not answer as a trainguard server: {_snippet(data)}")
    token_id, scope, run, expires = (doc[name] for name in fields)
    if not (
        isinstance(token_id, str)
        and isinstance(scope, str)
        and (run is None or isinstance(run, str))
        and (expires is None or isinstance(expires, str))
    ):
        raise ServerUnreachable(f"{origin} answers whoami in an unknown shape: {_snippet(data)}")
    return TokenGrant(token_id, scope, run, expires)


def _snippet(data: bytes | None) -> str:
    if data is None:
        return "(answer too large)"
    text = data[:200].decode("utf-8", "replace")
    # Printable only: the answer is the server's, and it ends up in a terminal.
    return "".join(ch if ch.isprintable() else "?" for ch in text) or "(empty)"
