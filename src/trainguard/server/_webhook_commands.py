"""What `trainguard server webhook add|list|remove|deliveries|retry` do."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainguard.errors import UsageError
from trainguard.ledger._ledger import default_location
from trainguard.ledger._store import open_store
from trainguard.server._alerts import EventFilter
from trainguard.server._commands import _operator
from trainguard.server._sidetables import SideDb, create_tables, open_side_db
from trainguard.server._webhook_outbox import Outbox
from trainguard.server._webhooks import (
    add_webhook,
    list_webhooks,
    new_secret,
    read_secret_file,
    redact_url,
    remove_webhook,
)

__all__ = [
    "cmd_webhook_add",
    "cmd_webhook_deliveries",
    "cmd_webhook_list",
    "cmd_webhook_remove",
    "cmd_webhook_retry",
]


def _location(args: argparse.Namespace) -> str | Path:
    return args.store if args.store is not None else default_location()


def cmd_webhook_add(args: argparse.Namespace) -> int:
    events = EventFilter(args.events)
    generated = args.secret_file is None
    secret = new_secret().encode() if generated else read_secret_file(args.secret_file)
    store = open_store(_location(args), create=True)
    try:
        hook = add_webhook(
            store,
            args.url,
            secret,
            events,
            label=args.label,
            created_by=_operator(),
            allow_http=args.allow_http,
        )
        location = store.location
    finally:
        store.close()
    sys.stderr.write(
        f"added webhook {hook.webhook_id} to {redact_url(hook.url)} for {events.text} in {location}\n"
    )
    if generated:
        sys.stderr.write("this is the only time its signing secret is shown: give it to the receiver now\n")
        # Alone on stdout, so `SECRET=$(trainguard server webhook add ...)` captures exactly the secret.
        sys.stdout.write(f"{secret.decode()}\n")
    else:
        sys.stdout.write(f"{hook.webhook_id}\n")
    return 0


def cmd_webhook_list(args: argparse.Namespace) -> int:
    store = open_store(_location(args), create=False)
    try:
        hooks = list_webhooks(store)
    finally:
        store.close()
    if args.json:
        json.dump({"webhooks": [hook.to_json() for hook in hooks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not hooks:
        sys.stdout.write("no webhooks\n")
    for hook in hooks:
        label = f"  {hook.label}" if hook.label else ""
        sys.stdout.write(f"{hook.webhook_id}  {redact_url(hook.url)}  {hook.events.text}{label}\n")
    return 0


def cmd_webhook_remove(args: argparse.Namespace) -> int:
    store = open_store(_location(args), create=False)
    try:
        removed = remove_webhook(store, args.id)
    finally:
        store.close()
    if not removed:
        raise UsageError(f"no webhook {args.id!r}", hint="'trainguard server webhook list' shows their ids")
    sys.stdout.write(f"removed {args.id}: its pending deliveries will be marked failed\n")
    return 0


def _outbox(args: argparse.Namespace) -> tuple[SideDb, Outbox]:
    store = open_store(_location(args), create=False)
    try:
        create_tables(store)
    finally:
        store.close()
    db = open_side_db(_location(args))
    return db, Outbox(db)


def cmd_webhook_deliveries(args: argparse.Namespace) -> int:
    db, outbox = _outbox(args)
    try:
        counts = outbox.counts()
        rows = outbox.rows(args.state, args.limit)
    finally:
        db.close()
    if args.json:
        doc = {"counts": counts, "deliveries": [row.to_json() for row in rows]}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(", ".join(f"{n} {state}" for state, n in counts.items()) + "\n")
        for row in rows:
            error = f"  {row.last_error}" if row.last_error else ""
            sys.stdout.write(
                f"{row.delivery_id}  {row.webhook_id}  {row.state}  attempts={row.attempts}  "
                f"run={row.run!r} index={row.ledger_index}{error}\n"
            )
    # Failed deliveries are alerts nobody received: say so in the exit code too.
    return 1 if counts["failed"] else 0


def cmd_webhook_retry(args: argparse.Namespace) -> int:
    db, outbox = _outbox(args)
    try:
        count = outbox.requeue_failed(None if args.all else args.delivery_id)
    finally:
        db.close()
    if count == 0 and not args.all:
        raise UsageError(f"no failed delivery {args.delivery_id!r}")
    sys.stdout.write(f"{count} failed deliveries queued again\n")
    return 0
