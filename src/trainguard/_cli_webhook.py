"""Arguments of `trainguard server webhook ...`, and the rate-limit and webhook flags of `trainguard serve`.

Only argparse here: the handlers import the server room when they run, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainguard._argtypes import handler, positive_int

__all__ = ["add_serve_flags", "add_webhook_commands"]

_EPILOG = (
    "exit codes: 0 done, 1 (deliveries) some deliveries failed for good, 2 usage error (bad URL, secret "
    "or filter, unknown id), 3 the store could not be used"
)
_MODULE = "trainguard.server._webhook_commands"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0 and at most 86400 seconds")
    return value


def _seconds_or_off(text: str) -> float:
    return 0.0 if text.strip() in {"0", "0.0", "off"} else _seconds(text)


def add_webhook_commands(
    areas: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    webhook = areas.add_parser(
        "webhook",
        parents=parents,
        help="add, list and remove the webhooks alerts are POSTed to",
        description="Webhooks live beside the ledger, so every worker and host of `trainguard serve` sends "
        "to the same ones. Each alert appended is POSTed as JSON, signed with the header "
        "X-Trainguard-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, '<t>.<body>')>, retried with "
        "backoff, and marked failed after its last attempt.",
        epilog=_EPILOG,
    )
    actions = webhook.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add",
        parents=parents,
        help="add a webhook",
        description="Add a webhook. Without --secret-file a random signing secret is made and printed on "
        "stdout, once; with it, the webhook's id is printed. Plain http:// is refused unless the host is a "
        "loopback address or --allow-http is given.",
        epilog=_EPILOG,
    )
    add.add_argument("url", metavar="URL", help="where to POST: https://HOST[:PORT]/PATH")
    add.add_argument(
        "--secret-file",
        type=Path,
        metavar="FILE",
        help="read the signing secret (16 to 1024 bytes) from FILE",
    )
    add.add_argument(
        "--events",
        default="alerts",
        metavar="TYPES",
        help="comma-separated: alerts (guard and supervisor alarms, lost or killed ranks, signals, refused "
        "runs, spool gaps, failed verifications), an event type (run.end), a prefix (run.*) or *; "
        "default alerts",
    )
    add.add_argument("--label", default="", metavar="TEXT", help="a note for people")
    add.add_argument(
        "--allow-http", action="store_true", help="allow http:// to a host that is not loopback (in clear)"
    )
    add.set_defaults(run=handler(_MODULE, "cmd_webhook_add"))

    listing = actions.add_parser(
        "list",
        parents=parents,
        help="show the webhooks (origins only, never a secret)",
        description="Show each webhook's id, origin (the URL's path may hold a secret: never shown), "
        "event filter and label.",
        epilog=_EPILOG,
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of lines")
    listing.set_defaults(run=handler(_MODULE, "cmd_webhook_list"))

    remove = actions.add_parser(
        "remove",
        parents=parents,
        help="remove a webhook",
        description="Remove a webhook by its id.",
        epilog=_EPILOG,
    )
    remove.add_argument("id", metavar="ID", help="the webhook's id (wh_ and 8 hex digits)")
    remove.set_defaults(run=handler(_MODULE, "cmd_webhook_remove"))

    deliveries = actions.add_parser(
        "deliveries",
        parents=parents,
        help="show the outbox: pending, delivered and failed deliveries",
        description="Count the outbox's rows by state and list the newest; exits 1 when any delivery "
        "failed for good (an alert no receiver got).",
        epilog=_EPILOG,
    )
    deliveries.add_argument("--state", choices=("pending", "delivered", "failed"), help="only this state")
    deliveries.add_argument("--limit", type=positive_int, default=50, metavar="N", help="at most N rows (50)")
    deliveries.add_argument("--json", action="store_true", help="print JSON instead of lines")
    deliveries.set_defaults(run=handler(_MODULE, "cmd_webhook_deliveries"))

    retry = actions.add_parser(
        "retry",
        parents=parents,
        help="queue failed deliveries again",
        description="Make a failed delivery (or every one, with --all) pending again, with fresh attempts.",
        epilog=_EPILOG,
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("delivery_id", nargs="?", metavar="DELIVERY_ID", help="the delivery's id")
    which.add_argument("--all", action="store_true", help="every failed delivery")
    retry.set_defaults(run=handler(_MODULE, "cmd_webhook_retry"))


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    """Rate limits and webhook delivery settings; every worker gets them from `trainguard serve`."""
    limits = serve.add_argument_group(
        "rate limits (shared by every worker and host through the database; over a limit: 429 + Retry-After)"
    )
    limits.add_argument(
        "--rate-window", type=positive_int, default=60, metavar="S", help="the window in seconds (60)"
    )
    limits.add_argument(
        "--rate-job",
        type=positive_int,
        default=1200,
        metavar="N",
        help="requests per window per job token (1200)",
    )
    limits.add_argument(
        "--rate-reader",
        type=positive_int,
        default=600,
        metavar="N",
        help="requests per window per viewer or admin token (600)",
    )
    limits.add_argument(
        "--rate-failures",
        type=positive_int,
        default=30,
        metavar="N",
        help="failed authentications per window per client address (an IPv6 /64) before it is refused "
        "(30); behind a proxy the address is the proxy's unless --forwarded-allow-ips trusts it",
    )
    hooks = serve.add_argument_group("webhooks ('trainguard server webhook add' says where)")
    hooks.add_argument(
        "--webhook-attempts",
        type=positive_int,
        default=8,
        metavar="N",
        help="attempts before a delivery fails (8)",
    )
    hooks.add_argument(
        "--webhook-backoff",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="first retry after about S seconds, doubling up to 600 s, with jitter (2)",
    )
    hooks.add_argument(
        "--webhook-timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="seconds a receiver has to answer, after 5 s to connect (10)",
    )
    runs = serve.add_argument_group("runs")
    runs.add_argument(
        "--silent-after",
        type=_seconds_or_off,
        default=300.0,
        metavar="S",
        help="a run whose job has not been heard from for S seconds and has not ended gets a "
        "server.run_silent alarm (a killed supervisor or reporting rank); jobs say they are alive every "
        "60 s, so keep it above 120; 0 or off: never (300)",
    )
