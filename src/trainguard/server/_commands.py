"""What `trainguard server token create|list|revoke` do."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import socket
import sys
from datetime import UTC, date, datetime, time, timedelta

from trainguard.errors import UsageError
from trainguard.server._access import Scope
from trainguard.server._tokens import DEFAULT_LIFETIME, TokenInfo, TokenStore

__all__ = ["cmd_token_create", "cmd_token_list", "cmd_token_revoke", "parse_expires"]

_DURATION = re.compile(r"([1-9][0-9]{0,5})([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Far enough for any real use, near enough that datetime arithmetic never overflows.
_MAX_LIFETIME = timedelta(days=10 * 366)
_LIST_COLUMNS = ("ID", "SCOPE", "RUN", "STATUS", "EXPIRES", "CREATED", "CREATED BY", "LABEL")


def parse_expires(text: str | None, scope: Scope, now: datetime) -> datetime | None:
    """When a new token expires: `text` is None (the scope's default), ``never``, a duration (``30m``,
    ``24h``, ``7d``, ``2w``), a date (``2026-12-31``: 00:00 UTC that day) or an ISO time with a zone."""
    if text is None:
        return now + DEFAULT_LIFETIME[scope]
    if text == "never":
        if scope is Scope.JOB:
            raise UsageError(
                "job tokens must expire: --expires never is refused",
                hint=f"a job token lives in the job's environment; give a lifetime such as "
                f"{DEFAULT_LIFETIME[scope].days}d",
            )
        return None
    expires = _parse_moment(text, now)
    if expires <= now:
        raise UsageError(f"--expires {text} is not in the future")
    if expires - now > _MAX_LIFETIME:
        raise UsageError(f"--expires {text} is more than 10 years away", hint="give a nearer time, or never")
    return expires


def _parse_moment(text: str, now: datetime) -> datetime:
    duration = _DURATION.fullmatch(text)
    if duration is not None:
        # Capped before it is added, as `now` plus a million weeks is past the year 9999.
        return now + min(timedelta(**{_UNITS[duration[2]]: int(duration[1])}), _MAX_LIFETIME * 2)
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise UsageError(
            f"--expires {text!r} is not a time",
            hint="give a duration (30m, 24h, 7d, 2w), a date (2026-12-31), a time with a zone "
            "(2026-12-31T18:00:00Z) or never",
        )
    return moment


def _operator() -> str:
    """Who made a token from the command line: ``cli:user@host``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry, as in some containers
        user = "unknown"
    return f"cli:{user}@{socket.gethostname() or 'localhost'}"


def cmd_token_create(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    scope = Scope(args.scope)
    expires_at = parse_expires(args.expires, scope, now)
    with TokenStore.open(args.store, create=True) as store:
        issued = store.create(
            scope, run=args.run_id, label=args.label, expires_at=expires_at, created_by=_operator(), now=now
        )
        location = store.location
    info = issued.info
    sys.stderr.write(
        f"created {_describe(info)} in {location}, "
        f"{'never expiring' if info.expires_at is None else 'expiring ' + _when(info.expires_at)}\n"
        "this is the only time the token is shown: store it now; a lost token can only be revoked "
        "and replaced\n"
    )
    # Alone on stdout, so `TOKEN=$(trainguard server token create ...)` captures exactly the token.
    sys.stdout.write(f"{issued.token}\n")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    with TokenStore.open(args.store) as store:
        tokens = store.tokens()
    if args.json:
        json.dump({"tokens": [info.to_json(now) for info in tokens]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_table(tokens, now))
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    with TokenStore.open(args.store) as store:
        info, revoked_now = store.revoke(args.id)
    if revoked_now:
        sys.stdout.write(f"revoked {info.token_id}: every server refuses it from now on\n")
    else:
        assert info.revoked_at is not None
        sys.stdout.write(f"{info.token_id} was already revoked at {_when(info.revoked_at)}\n")
    return 0


def _describe(info: TokenInfo) -> str:
    run = f" for run {info.run}" if info.scope is Scope.JOB else ""
    return f"{info.scope.value} token {info.token_id}{run}"


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _table(tokens: list[TokenInfo], now: datetime) -> str:
    if not tokens:
        return "no tokens\n"
    rows = [_LIST_COLUMNS] + [
        (
            info.token_id,
            info.scope.value,
            info.run or "-",
            info.status(now),
            "never" if info.expires_at is None else _when(info.expires_at),
            _when(info.created_at),
            info.created_by,
            info.label,
        )
        for info in tokens
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_LIST_COLUMNS))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )
