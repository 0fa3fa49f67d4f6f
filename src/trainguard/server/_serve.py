"""What `trainguard serve` does: check the ledger, its key and its tokens, then run uvicorn's workers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainguard.errors import ExitCode, MissingExtraError, UsageError
from trainguard.server._asgi import ENV_KEY, ENV_STORE

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


def _log_config() -> dict[str, object]:
    stream = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"},
            "access": {"()": "uvicorn.logging.AccessFormatter", "fmt": _ACCESS_FORMAT, "use_colors": False},
        },
        "handlers": {
            "default": {**stream, "formatter": "default"},
            "access": {**stream, "formatter": "access"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            # Refused requests (their reason, never a token) and store failures, whatever -v says.
            "trainguard": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }
