"""What `trainguard serve` does: check the ledger, its key and its tokens, then run uvicorn's workers."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.errors import ExitCode, MissingExtraError, UsageError
from trainguard.relay._delivery import ALIVE_EVERY_S
from trainguard.relay._destination import is_loopback_host
from trainguard.server._asgi import ENV_KEY, ENV_RATE_LIMITS, ENV_SILENT_AFTER, ENV_STORE, ENV_WEBHOOKS

if TYPE_CHECKING:
    from trainguard.server._ratelimit import RateLimits
    from trainguard.server._webhook_sender import WebhookLimits

__all__ = ["cmd_serve"]

# Only the request line and status: uvicorn's access log never writes request headers, so neither the
# Authorization header nor a token can reach it (tests/server/test_serve.py checks the whole output).
_ACCESS_FORMAT = '%(asctime)s %(client_addr)s "%(request_line)s" %(status_code)s'


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  (only to say which extra is missing)
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError(exc.name or "fastapi", "server", "trainguard serve") from None

    from trainguard.server._app import open_server

    tls = _tls_files(args)
    rate_limits, webhook_limits = _limits(args)

    # Fail here, with the command line's message and exit code, rather than in every worker: this also
    # makes the default key of a new default ledger, and the event key table, once.
    server = open_server(args.store, args.key)
    location = server.ledger.location
    server.close()
    # Every worker reads these when it builds its app (trainguard.server._asgi).
    if args.store is not None:
        os.environ[ENV_STORE] = str(args.store)
    if args.key is not None:
        os.environ[ENV_KEY] = str(args.key.resolve())
    os.environ[ENV_RATE_LIMITS] = rate_limits.to_env()
    os.environ[ENV_WEBHOOKS] = webhook_limits.to_env()
    os.environ[ENV_SILENT_AFTER] = repr(float(args.silent_after))
    if 0 < args.silent_after < 2 * ALIVE_EVERY_S:
        sys.stderr.write(
            f"trainguard: WARNING: --silent-after {args.silent_after:g} is less than twice the "
            f"{ALIVE_EVERY_S:g} s between a quiet job's signs of life: idle jobs will be judged silent\n"
        )
    if tls is None and not is_loopback_host(args.host):
        sys.stderr.write(_PLAIN_HTTP_WARNING.format(host=args.host))
    scheme = "https" if tls else "http"
    sys.stderr.write(
        f"trainguard: serving {location} on {scheme}://{args.host}:{args.port} with {args.workers} "
        f"worker{'s' if args.workers != 1 else ''}\n"
    )
    sys.stderr.flush()
    uvicorn.run(
        "trainguard.server._asgi:app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=_log_config(),
        access_log=not args.no_access_log,
        server_header=False,  # do not advertise the server's software
        timeout_graceful_shutdown=10,
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
    )
    return int(ExitCode.CLEAN)


_PLAIN_HTTP_WARNING = (
    "trainguard: WARNING: serving plain HTTP on {host}, which is not a loopback address: bearer tokens and "
    "every event cross the network unencrypted, for anyone on the path to read and replay. Give --tls-cert "
    "and --tls-key, or listen on 127.0.0.1 behind a reverse proxy that terminates TLS.\n"
)


def _limits(args: argparse.Namespace) -> tuple[RateLimits, WebhookLimits]:
    """The rate limits and webhook settings of the flags; UsageError before any worker starts."""
    from trainguard.server._ratelimit import RateLimits
    from trainguard.server._webhook_sender import WebhookLimits

    rates = RateLimits(
        job=args.rate_job, reader=args.rate_reader, failures=args.rate_failures, window_s=args.rate_window
    )
    hooks = WebhookLimits(
        attempts=args.webhook_attempts,
        backoff_s=args.webhook_backoff,
        backoff_cap_s=max(600.0, args.webhook_backoff),
        answer_timeout_s=args.webhook_timeout,
    )
    return rates, hooks


def _tls_files(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """The certificate and key files, both readable; None for plain HTTP. UsageError when only one is
    given or one cannot be read, before any worker starts."""
    cert, key = args.tls_cert, args.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together", hint="give both, or neither behind a proxy")
    _check_readable("--tls-cert", cert)
    _check_readable("--tls-key", key)
    return cert, key


def _check_readable(flag: str, path: Path) -> None:
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None


# Anything shaped like a token, whole or cut short: the public id stays, for whoever reads the log.
_TOKEN_TEXT = re.compile(r"tgs_(tg_[0-9a-f]{8})?[A-Za-z0-9_-]*")


def _redact(text: str) -> str:
    redacted = _TOKEN_TEXT.sub(_hide_secret, text)
    if "%" not in redacted:
        return redacted
    # A token percent-encoded in a URL (tgs%5Ftg_..., or every character escaped) hides from the pattern:
    # look again at the decoded text, and log that one when it held a token.
    decoded = urllib.parse.unquote(redacted, errors="replace")
    hidden = _TOKEN_TEXT.sub(_hide_secret, decoded)
    return hidden if hidden != decoded else redacted


def _hide_secret(match: re.Match[str]) -> str:
    return f"tgs_{match[1]}_[redacted]" if match[1] else "tgs_[redacted]"


class _RedactTokens(logging.Filter):
    """Replaces token secrets in a record's message and arguments (uvicorn's access log formats its
    arguments itself, so they are redacted one by one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def _log_config() -> dict[str, object]:
    stream = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        # A client that puts its token in a URL (a query, a run id) would otherwise have it logged.
        "filters": {"no_tokens": {"()": _RedactTokens}},
        "formatters": {
            "default": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"},
            "access": {"()": "uvicorn.logging.AccessFormatter", "fmt": _ACCESS_FORMAT, "use_colors": False},
        },
        "handlers": {
            "default": {**stream, "formatter": "default", "filters": ["no_tokens"]},
            "access": {**stream, "formatter": "access", "filters": ["no_tokens"]},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            # Refused requests (their reason, never a token) and store failures, whatever -v says.
            "trainguard": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }
