"""Webhooks: where alerts are POSTed, kept in the ``server_webhooks`` table beside the ledger.

Why in the database and not in flags of `trainguard serve`: every worker and every host behind a proxy
must send to the same places with the same secrets, and an outbox row written by one worker may be
delivered by another; one table read by all of them cannot disagree, and a change needs no restart.

The secret is stored as given, because signing needs it (a hash would not do): whoever reads the ledger's
database can sign webhooks, so give the database role to the server alone. The secret is never shown
again after `add`, never logged, and never put into an error message or a metric. The URL may carry a
secret of its own (many chat services put one in the path), so listings and logs show only its origin.

A webhook to plain http:// is refused unless its host is a loopback address: the alert and its
signature would cross the network in clear. `allow_http` overrides that, deliberately.
"""

from __future__ import annotations

import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from trainguard.errors import UsageError
from trainguard.ledger._store import Store, Transaction
from trainguard.relay._destination import is_loopback_host
from trainguard.server._alerts import EventFilter
from trainguard.server._sidetables import WEBHOOKS, create_tables

__all__ = [
    "MIN_SECRET_BYTES",
    "Webhook",
    "add_webhook",
    "check_url",
    "list_webhooks",
    "new_secret",
    "read_secret_file",
    "redact_url",
    "remove_webhook",
]

MIN_SECRET_BYTES = 16
_MAX_SECRET_BYTES = 1024
_MAX_URL = 2048
_MAX_LABEL = 200
_ID_ALPHABET = "0123456789abcdef"


@dataclass(frozen=True)
class Webhook:
    """A configured webhook; `secret` stays out of its repr, so a logged object never shows it."""

    webhook_id: str
    url: str
    events: EventFilter
    label: str
    created_at: float
    created_by: str
    secret: bytes = field(repr=False, default=b"")

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.webhook_id,
            "url": redact_url(self.url),
            "events": self.events.text,
            "label": self.label,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }


def new_secret() -> str:
    """A fresh signing secret: 32 random bytes, base64url."""
    return secrets.token_urlsafe(32)


def read_secret_file(path: Path) -> bytes:
    """The secret in `path`, a trailing newline removed; UsageError when unreadable, short or huge."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_SECRET_BYTES + 2)
    except OSError as exc:
        raise UsageError(f"cannot read the webhook secret file {path}: {exc.strerror or exc}") from None
    data = data.rstrip(b"\r\n")
    if len(data) > _MAX_SECRET_BYTES:
        raise UsageError(f"the webhook secret in {path} is longer than {_MAX_SECRET_BYTES} bytes")
    if len(data) < MIN_SECRET_BYTES:
        raise UsageError(
            f"the webhook secret in {path} is shorter than {MIN_SECRET_BYTES} bytes",
            hint="leave --secret-file out to have a random secret made and printed once",
        )
    return data


def check_url(url: str, *, allow_http: bool = False) -> str:
    """`url` if trainguard may POST alerts to it; UsageError saying why not otherwise."""
    if not url or len(url) > _MAX_URL or not url.isascii() or not url.isprintable() or " " in url:
        raise UsageError(f"a webhook URL is 1 to {_MAX_URL} printable ASCII characters without spaces")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise UsageError("the webhook URL does not parse (check the host and port)") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UsageError("a webhook URL is https://HOST[:PORT]/PATH")
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            "a webhook URL may not carry user:password@",
            hint="receivers authenticate deliveries by the X-Trainguard-Signature header",
        )
    if parts.fragment:
        raise UsageError("a webhook URL has no #fragment")
    if port == 0:
        raise UsageError("a webhook URL's port is 1 to 65535")
    if parts.scheme == "http" and not allow_http and not is_loopback_host(parts.hostname):
        raise UsageError(
            f"refusing http:// to {parts.hostname}: alerts and their signatures would travel in clear",
            hint="use https://, or pass --allow-http if the network between is trusted",
        )
    return url


def redact_url(url: str) -> str:
    """The URL's scheme, host and port, its path hidden: the part that is safe to log or list."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}/..."


def add_webhook(
    store: Store,
    url: str,
    secret: bytes,
    events: EventFilter,
    *,
    label: str,
    created_by: str,
    allow_http: bool = False,
) -> Webhook:
    """Store a new webhook (its tables are made when missing); the stored Webhook, with its new id."""
    check_url(url, allow_http=allow_http)
    if len(secret) < MIN_SECRET_BYTES:
        raise UsageError(f"a webhook secret is at least {MIN_SECRET_BYTES} bytes")
    if len(label) > _MAX_LABEL or not label.isprintable():
        raise UsageError(f"a webhook label is at most {_MAX_LABEL} printable characters")
    create_tables(store)
    hook = Webhook(
        webhook_id="wh_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(8)),
        url=url,
        events=events,
        label=label,
        created_at=time.time(),
        created_by=created_by,
        secret=secret,
    )

    def insert(tx: Transaction) -> None:
        tx.execute(
            f"INSERT INTO {WEBHOOKS} (id, url, secret, events, label, created_at, created_by)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (hook.webhook_id, url, secret, events.text, label, hook.created_at, created_by),
        )

    store.transaction(insert)
    return hook


def list_webhooks(store: Store) -> list[Webhook]:
    """Every configured webhook, oldest first (secrets included: for the sender, never for display)."""
    create_tables(store)
    rows = store.read(
        f"SELECT id, url, secret, events, label, created_at, created_by FROM {WEBHOOKS}"
        " ORDER BY created_at, id"
    )
    return [
        Webhook(
            webhook_id=str(row[0]),
            url=str(row[1]),
            secret=bytes(row[2]),
            events=EventFilter(str(row[3])),
            label=str(row[4]),
            created_at=float(row[5]),
            created_by=str(row[6]),
        )
        for row in rows
    ]


def remove_webhook(store: Store, webhook_id: str) -> bool:
    """Remove a webhook; False when no such id. Its pending deliveries fail ("webhook removed") when due."""
    create_tables(store)
    return bool(
        store.transaction(lambda tx: tx.execute(f"DELETE FROM {WEBHOOKS} WHERE id = ?", (webhook_id,)))
    )
