"""Where a writer's events go: the local ledger, or a `trainguard serve` through a spool.

settings = server_settings()              # from $TRAINGUARD_SERVER and $TRAINGUARD_SERVER_TOKEN_FILE
if settings is None: ...                  # neither set: the local ledger, exactly as without a server
token = settings.token()                  # read from the file now, checked like a private key file

Configuration comes from flags and variables only. A token crosses the network in every request, so plain
http is accepted only to a loopback address, unless the user opts in with $TRAINGUARD_SERVER_ALLOW_HTTP=1.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from trainguard._keyfile import read_key_file
from trainguard.errors import UsageError
from trainguard.relay._tokenformat import is_token

__all__ = [
    "ENV_ALLOW_HTTP",
    "ENV_SERVER",
    "ENV_TOKEN_FILE",
    "SERVER_VARIABLES",
    "ServerSettings",
    "check_server_url",
    "is_loopback_host",
    "server_settings",
]

ENV_SERVER = "TRAINGUARD_SERVER"
ENV_TOKEN_FILE = "TRAINGUARD_SERVER_TOKEN_FILE"
ENV_ALLOW_HTTP = "TRAINGUARD_SERVER_ALLOW_HTTP"
SERVER_VARIABLES = (ENV_SERVER, ENV_TOKEN_FILE, ENV_ALLOW_HTTP)
"""The variables that point a writer at a server; a supervised job is given none of them."""

_MAX_TOKEN_FILE = 4096
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """A server to report to, and the file that holds the job token it accepts."""

    url: str
    token_file: Path
    allow_http: bool = False

    def __post_init__(self) -> None:
        check_server_url(self.url, allow_http=self.allow_http)

    def token(self) -> str:
        """The token in `token_file`: a private file (no access for group or others) holding one token."""
        data = read_key_file(self.token_file, private=True, max_bytes=_MAX_TOKEN_FILE)
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            text = ""
        if not is_token(text):
            # Never echoed: a damaged token may still hold most of a secret.
            raise UsageError(
                f"{self.token_file} does not hold a trainguard server token",
                hint="write the output of `trainguard server token create --scope job --run RUN` to it",
            )
        return text


def check_server_url(url: str, *, allow_http: bool = False) -> None:
    """UsageError unless `url` is https://HOST[:PORT][/PREFIX], or http:// to a loopback host (any host with
    `allow_http`)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- parsed for its ValueError on a bad port
    except ValueError as exc:
        raise UsageError(f"not a server URL: {url!r}: {exc}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UsageError(f"not a server URL: {url!r}", hint="give https://HOST[:PORT][/PREFIX]")
    if parts.username is not None or parts.query or parts.fragment:
        raise UsageError(
            "the server URL must carry no user, query or fragment", hint="the token goes in its own file"
        )
    if parts.scheme == "http" and not allow_http and not is_loopback_host(parts.hostname):
        raise UsageError(
            f"refusing plain http to {parts.hostname}: the job token would cross the network in clear",
            hint=f"use https:// (TLS at a reverse proxy), or set {ENV_ALLOW_HTTP}=1 to accept the risk",
        )


def server_settings(
    url: str | None = None,
    token_file: str | Path | None = None,
    *,
    allow_http: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerSettings | None:
    """The server given by the arguments, else by the variables; None when neither names one.

    A server without a token file (or a token file without a server) is a UsageError: half a setting
    must not quietly send a job's evidence to the local ledger instead.
    """
    env = os.environ if environ is None else environ
    url = url or env.get(ENV_SERVER) or None
    token_file = token_file or env.get(ENV_TOKEN_FILE) or None
    if allow_http is None:
        allow_http = _flag(env.get(ENV_ALLOW_HTTP, ""))
    if url is None and token_file is None:
        return None
    if url is None:
        raise UsageError(
            "a server token file is given but no server",
            hint=f"give the server with --server URL or {ENV_SERVER}",
        )
    if token_file is None:
        raise UsageError(
            f"reporting to {url} needs a job token",
            hint=f"give the file that holds it with --server-token-file FILE or {ENV_TOKEN_FILE}",
        )
    return ServerSettings(url, Path(token_file), allow_http)


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in {"", "0", "no", "false"}:
        return False
    if value in {"1", "yes", "true"}:
        return True
    raise UsageError(f"{ENV_ALLOW_HTTP} must be 1 or 0, not {text!r}")


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a name, an address, or an IPv6 address in brackets) is this machine alone; a name
    other than localhost may resolve anywhere, so it is not."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
