"""Arguments of `trainguard server token create|list|revoke` and of `trainguard serve`.

Only argparse here: the handlers import the server room when they run, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from trainguard._argtypes import handler, non_negative_int, positive_int
from trainguard._cli_webhook import add_serve_flags, add_webhook_commands

_EPILOG = "exit codes: 0 done, 2 usage error (bad flags, unknown token id), 3 the store could not be used"
_SERVE_EPILOG = (
    "For a cluster: one PostgreSQL database for every worker and host, e.g. trainguard serve --store "
    "'postgresql://trainguard@db/evidence' --key /etc/trainguard/ledger.key --host 0.0.0.0 --workers 4 "
    "--tls-cert cert.pem --tls-key key.pem; tokens with 'trainguard server token create' (a job token per "
    "run, for 'trainguard run --server'); back up with pg_dump or continuous archiving, and keep the key "
    "offline too (README: Running it for a cluster). "
    "exit codes: 0 stopped cleanly, 2 usage error (bad flags, no signing key, the server extra missing), "
    "3 the store could not be used"
)


def _run(name: str, module: str = "trainguard.server._commands") -> Callable[[argparse.Namespace], int]:
    return handler(module, name)


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    server = commands.add_parser(
        "server",
        parents=[common],
        help="administer the trainguard server: access tokens, webhooks",
        description="Administer what `trainguard serve` trusts. Its tokens live beside the ledger, in the "
        "same SQLite file or PostgreSQL schema, so every worker and host that shares the ledger shares them.",
        epilog=_EPILOG,
    )
    areas = server.add_subparsers(dest="area", required=True, metavar="AREA")
    token = areas.add_parser(
        "token",
        parents=[common],
        help="create, list and revoke access tokens",
        description="Tokens are shown once, stored only as a hash, scoped, expiring and revocable. Scopes: "
        "admin (everything, including tokens), viewer (read every run), job (append to one run only).",
        epilog=_EPILOG,
    )
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        metavar="LOCATION",
        default=os.environ.get("TRAINGUARD_LEDGER") or None,
        help="the ledger's SQLite file or postgresql:// URL (default $TRAINGUARD_HOME/ledger.db; "
        "env: TRAINGUARD_LEDGER)",
    )
    _add_create(actions, [common, store])
    _add_list(actions, [common, store])
    _add_revoke(actions, [common, store])
    add_webhook_commands(areas, [common, store])
    _add_serve(commands, [common, store])


def _add_serve(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    serve = commands.add_parser(
        "serve",
        parents=parents,
        help="run the HTTP server jobs report to and viewers read the ledger from",
        description="Serve the ledger over HTTP (needs the server extra: pip install 'trainguard[server]'): "
        "jobs POST events with a job token ('trainguard run --server'), people read runs, plots, alerts and "
        "in-page verified proofs on the dashboard at /ui/, auditors read the log as C2SP tlog-tiles, "
        "Prometheus reads /metrics, alerts go out as signed webhooks; every endpoint but /healthz needs a "
        "token from 'trainguard server token create'. Workers and hosts may share one "
        "PostgreSQL ledger: they keep no state of their own. Serve TLS itself (--tls-cert, --tls-key) or "
        "behind a reverse proxy that does (--forwarded-allow-ips names the proxy).",
        epilog=_SERVE_EPILOG,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=non_negative_int, default=8750, help="port to listen on (default 8750)")
    serve.add_argument("--workers", type=positive_int, default=1, metavar="N", help="worker processes (1)")
    serve.add_argument(
        "--key",
        type=Path,
        default=os.environ.get("TRAINGUARD_LEDGER_KEY") or None,
        help="the ledger's signing key file (default $TRAINGUARD_HOME/keys/ledger.key; "
        "env: TRAINGUARD_LEDGER_KEY)",
    )
    serve.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="serve HTTPS with this certificate chain (and --tls-key)"
    )
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    serve.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        metavar="ADDRS",
        help="comma-separated addresses of the reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed (default 127.0.0.1; '*' believes anyone: never on an open port)",
    )
    serve.add_argument("--no-access-log", action="store_true", help="do not log each request line")
    add_serve_flags(serve)
    serve.set_defaults(run=_run("cmd_serve", "trainguard.server._serve"))


def _add_create(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    create = actions.add_parser(
        "create",
        parents=parents,
        help="make a token and print it, once",
        description="Make a token and print it on stdout, alone on its line; it cannot be shown again. "
        "Creates the token table (and the ledger's, when missing) on first use.",
        epilog=_EPILOG,
    )
    create.add_argument("--scope", required=True, choices=("admin", "viewer", "job"), help="what it may do")
    create.add_argument(
        "--run", dest="run_id", metavar="RUN_ID", help="the one run a job token may append to (job only)"
    )
    create.add_argument("--label", default="", metavar="TEXT", help="a note for people: who or what holds it")
    create.add_argument(
        "--expires",
        metavar="WHEN",
        help="a duration (30m, 24h, 7d, 2w), a date (2026-12-31, at 00:00 UTC), a time with a zone, or "
        "never (not for job tokens); default: job 7d, viewer 90d, admin 365d",
    )
    create.set_defaults(run=_run("cmd_token_create"))


def _add_list(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    listing = actions.add_parser(
        "list",
        parents=parents,
        help="show every token and whether it is active, expired or revoked",
        description="Show every token's id, scope, run, status, expiry, creator and label; never a secret.",
        epilog=_EPILOG,
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_run("cmd_token_list"))


def _add_revoke(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    revoke = actions.add_parser(
        "revoke",
        parents=parents,
        help="revoke a token, at once and for every server",
        description="Revoke a token by its id (tg_ and 8 hex digits). Servers check the database on every "
        "request, so the token is refused everywhere from its next use. Revoking twice is harmless.",
        epilog=_EPILOG,
    )
    revoke.add_argument("id", metavar="ID", help="the token's id, as 'token list' shows it")
    revoke.set_defaults(run=_run("cmd_token_revoke"))
