"""Browser sessions of the dashboard: a pasted token kept in an HttpOnly cookie, and the login CSRF check.

The cookie holds the token itself (no session table: every request authenticates it afresh, so a revoked
or expired token stops working on the next page). It is HttpOnly (no script reads it), SameSite=Strict
(no other site's page sends it), Path=/, and Secure with the ``__Host-`` name prefix when the request came
over https, which includes a reverse proxy that uvicorn trusts to say so (X-Forwarded-Proto from
--forwarded-allow-ips, loopback by default). A POST must carry an Origin header equal to this server's own
origin: a form on another site cannot log a browser in with the attacker's token, or out.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import anyio
from fastapi import Request
from fastapi.responses import Response

__all__ = [
    "COOKIE",
    "FORM_TIMEOUT_S",
    "MAX_FORM_BYTES",
    "FormRefused",
    "cookie_token",
    "forget",
    "origin_ok",
    "read_form",
    "remember",
]

COOKIE = "trainguard_session"
_SECURE_COOKIE = "__Host-" + COOKIE
MAX_FORM_BYTES = 4096
FORM_TIMEOUT_S = 10.0
# The cookie lives no longer than a browser session of a working day; the token's own expiry still rules.
_COOKIE_MAX_AGE_S = 12 * 3600


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def cookie_token(request: Request) -> str | None:
    """The token in this request's cookie, if it has one."""
    return request.cookies.get(_SECURE_COOKIE if _secure(request) else COOKIE)


def remember(response: Response, request: Request, token: str) -> None:
    secure = _secure(request)
    response.set_cookie(
        _SECURE_COOKIE if secure else COOKIE,
        token,
        max_age=_COOKIE_MAX_AGE_S,
        path="/",
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def forget(response: Response, request: Request) -> None:
    secure = _secure(request)
    response.delete_cookie(
        _SECURE_COOKIE if secure else COOKIE, path="/", secure=secure, httponly=True, samesite="strict"
    )


def origin_ok(request: Request) -> bool:
    """Whether the request's Origin is this server's own (scheme://host[:port] as the browser sent it)."""
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    if origin is None or host is None:
        return False  # fail closed: browsers send Origin on every POST
    # A browser says where the request came from in a header no page script can set; trust it when sent.
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return False
    return origin == f"{request.url.scheme}://{host}"


class FormRefused(Exception):
    """The form was not read: `status` 413 (too large) or 408 (too slow)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_form(request: Request, timeout_s: float = FORM_TIMEOUT_S) -> dict[str, str] | None:
    """The fields of a small urlencoded form, one value each; None when it is anything else.

    FormRefused when Content-Length announces more than MAX_FORM_BYTES (refused before a byte is read), or
    the body does not arrive within `timeout_s`: a client that never sends it holds nothing for long.
    """
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return None
    declared = request.headers.get("content-length")
    if declared is not None and not (declared.isascii() and declared.isdigit() and len(declared) < 10):
        raise FormRefused(413, f"the form is at most {MAX_FORM_BYTES} bytes")
    if declared is not None and int(declared) > MAX_FORM_BYTES:
        raise FormRefused(413, f"the form is at most {MAX_FORM_BYTES} bytes")
    body = b""
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    raise FormRefused(413, f"the form is at most {MAX_FORM_BYTES} bytes")
    except TimeoutError:
        raise FormRefused(408, f"the form took more than {timeout_s:g} s to arrive") from None
    try:
        fields = parse_qs(body.decode("ascii"), strict_parsing=True, max_num_fields=4)
    except (UnicodeDecodeError, ValueError):
        return None
    if any(len(values) != 1 for values in fields.values()):
        return None
    return {name: values[0] for name, values in fields.items()}
