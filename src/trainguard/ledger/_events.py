"""Ledger events: who did what, when, in which run, as RFC 8785 canonical JSON.

An event's canonical bytes are what the ledger stores and hashes into the Merkle tree, so the same event
always has the same bytes, and stored bytes are accepted back only if they are exactly canonical.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import math
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from trainguard._strictjson import loads_strict
from trainguard.errors import UsageError, VerificationFailed
from trainguard.ledger._canonical import canonical_json

__all__ = ["MAX_ENTRY_BYTES", "Actor", "EntryError", "Event", "new_event"]

MAX_ENTRY_BYTES = 1 << 20
"""Largest canonical event; larger ones are refused when written and when read back."""

# JSON numbers are IEEE doubles: integers beyond this are not exact and RFC 8785 refuses them.
_MAX_SAFE_INT = 2**53 - 1
_MAX_DEPTH = 64
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_KEYS = frozenset({"type", "time", "actor", "run_id", "rank", "payload"})
_ACTOR_KEYS = frozenset({"user", "uid", "host", "pid"})


class EntryError(VerificationFailed):
    """A stored entry that is not a valid event in canonical form."""


# Checks on `object`, so that the types declared on the dataclass do not make them look redundant: values
# parsed from stored JSON arrive untyped.
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


@dataclasses.dataclass(frozen=True)
class Actor:
    """The account and process that recorded an event."""

    user: str
    uid: int
    host: str
    pid: int

    def __post_init__(self) -> None:
        for name in ("user", "host"):
            if not _is_str(getattr(self, name)):
                raise UsageError(f"actor {name} must be a string, not {type(getattr(self, name)).__name__}")
        for name in ("uid", "pid"):
            value = getattr(self, name)
            if not _is_int(value) or abs(value) > _MAX_SAFE_INT:
                raise UsageError(f"actor {name} must be an integer below 2**53, not {value!r}")

    @classmethod
    def current(cls) -> Actor:
        """This process: login name (or the uid when it has none), uid, host name and pid."""
        getuid = getattr(os, "getuid", None)
        uid = getuid() if getuid is not None else -1
        pid = os.getpid()
        cached = _current.get("actor")
        # A fork or a setuid makes another actor; the name lookups are slow enough to reuse otherwise.
        if cached is not None and cached.pid == pid and cached.uid == uid:
            return cached
        try:
            user = getpass.getuser()
        except (KeyError, OSError, ImportError):
            # No login name in the environment and none in the password database (containers often).
            user = str(uid)
        actor = cls(user=user, uid=uid, host=socket.gethostname(), pid=pid)
        _current["actor"] = actor
        return actor


_current: dict[str, Actor] = {}


def utc_now() -> str:
    """The current time as the ledger writes it: RFC 3339, UTC, microseconds."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True)
class Event:
    """One ledger entry. `payload` must be JSON: str keys, finite floats, integers within +-(2**53 - 1)."""

    type: str
    time: str
    actor: Actor
    run_id: str | None
    rank: int | None
    payload: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not _is_str(self.type) or not self.type:
            raise UsageError(f"event type must be a non-empty string, not {self.type!r}")
        if not _is_str(self.time) or not _valid_time(self.time):
            raise UsageError(
                f"event time {self.time!r} is not an RFC 3339 UTC time with microseconds",
                hint='write it as "2026-11-27T23:35:08.123456Z"',
            )
        if not isinstance(self.actor, Actor):
            raise UsageError(f"event actor must be an Actor, not {type(self.actor).__name__}")
        if self.run_id is not None and not _is_str(self.run_id):
            raise UsageError(f"event run_id must be a string or None, not {type(self.run_id).__name__}")
        if self.rank is not None and (not _is_int(self.rank) or not 0 <= self.rank <= _MAX_SAFE_INT):
            raise UsageError(f"event rank must be a non-negative integer or None, not {self.rank!r}")
        if not isinstance(self.payload, Mapping):
            raise UsageError(f"event payload must be a mapping, not {type(self.payload).__name__}")

    def _document(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        a = self.actor
        return {
            "type": self.type,
            "time": self.time,
            "actor": {"user": a.user, "uid": a.uid, "host": a.host, "pid": a.pid},
            "run_id": self.run_id,
            "rank": self.rank,
            "payload": payload,
        }

    def canonical(self) -> bytes:
        """The RFC 8785 bytes of this event; UsageError naming the field that JSON cannot carry."""
        try:
            data = canonical_json(self._document(self.payload))
        except (ValueError, TypeError, RecursionError):
            # CanonicalizationError, or a surrogate met while sorting keys: find and name the culprit.
            data = self._canonical_slowly()
        if len(data) > MAX_ENTRY_BYTES:
            raise UsageError(
                f"event is {len(data)} bytes as canonical JSON; the ledger takes at most {MAX_ENTRY_BYTES}",
                hint="store large data elsewhere and record its digest in the payload",
            )
        return data

    def _canonical_slowly(self) -> bytes:
        """Turn other mappings and tuples into plain JSON, or name the value that cannot be JSON."""
        a = self.actor
        for where, text in (
            ("type", self.type),
            ("run_id", self.run_id),
            ("actor user", a.user),
            ("actor host", a.host),
        ):
            if text is not None:
                _check_text(text, where)
        document = self._document(_plain(self.payload, "payload", 0))
        try:
            return canonical_json(document)
        except (ValueError, TypeError, RecursionError) as exc:
            raise UsageError(f"event cannot be written as canonical JSON: {exc}") from None

    @classmethod
    def from_canonical(cls, data: bytes, *, index: int | None = None) -> Event:
        """Parse stored bytes; EntryError unless they are a valid event in exactly canonical form.

        `index`, when given, is the ledger position named in the error.
        """
        where = "entry" if index is None else f"entry {index}"
        if len(data) > MAX_ENTRY_BYTES:
            raise EntryError(f"{where} is {len(data)} bytes, above the {MAX_ENTRY_BYTES} limit", index=index)
        raw = bytes(data)
        try:
            doc = loads_strict(raw, parse_int=_json_int)
        except (ValueError, RecursionError) as exc:
            raise EntryError(f"{where} is not valid JSON: {exc}", index=index) from None
        try:
            event = cls._from_document(doc)
            again = event.canonical()
        except UsageError as exc:
            raise EntryError(f"{where} is not a valid event: {exc.message}", index=index) from None
        if again != raw:
            raise EntryError(f"{where} is not in RFC 8785 canonical form", index=index)
        return event

    @classmethod
    def _from_document(cls, doc: object) -> Event:
        if not isinstance(doc, dict):
            raise UsageError(f"an event is a JSON object, not {type(doc).__name__}")
        if doc.keys() != _KEYS:
            raise UsageError(f"event fields are {sorted(doc)}, expected {sorted(_KEYS)}")
        actor = doc["actor"]
        if not isinstance(actor, dict) or actor.keys() != _ACTOR_KEYS:
            raise UsageError(f"event actor must be an object with fields {sorted(_ACTOR_KEYS)}")
        if not isinstance(doc["payload"], dict):
            raise UsageError("event payload must be a JSON object")
        return cls(
            type=doc["type"],
            time=doc["time"],
            actor=Actor(user=actor["user"], uid=actor["uid"], host=actor["host"], pid=actor["pid"]),
            run_id=doc["run_id"],
            rank=doc["rank"],
            payload=doc["payload"],
        )


def new_event(
    type: str,
    payload: Mapping[str, Any] | None = None,
    *,
    run_id: str | None = None,
    rank: int | None = None,
    actor: Actor | None = None,
    time: str | None = None,
) -> Event:
    """An event recorded now by this process, unless `time` and `actor` say otherwise."""
    return Event(
        type=type,
        time=utc_now() if time is None else time,
        actor=Actor.current() if actor is None else actor,
        run_id=run_id,
        rank=rank,
        payload=dict(payload) if payload is not None else {},
    )


def _valid_time(value: str) -> bool:
    if not _TIME.fullmatch(value):
        return False
    try:
        datetime.datetime.fromisoformat(value[:-1])
    except ValueError:
        return False
    return True


def _check_text(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where} contains a lone surrogate, which is not valid Unicode text") from None


def _plain(value: Any, where: str, depth: int) -> Any:
    """`value` as dicts, lists and scalars that RFC 8785 accepts; UsageError naming the first that is not."""
    if depth > _MAX_DEPTH:
        raise UsageError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > _MAX_SAFE_INT:
            raise UsageError(
                f"{where} is the integer {value}, beyond what JSON carries exactly (2**53 - 1)",
                hint="record it as a string",
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UsageError(
                f"{where} is {value}, which JSON cannot carry", hint="record it as a string or null"
            )
        return value
    if isinstance(value, str):
        _check_text(value, where)
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise UsageError(f"{where} has the key {key!r}; JSON object keys must be strings")
            _check_text(key, f"a key of {where}")
            out[key] = _plain(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise UsageError(f"{where} is a {type(value).__name__}, which is not JSON")


def _json_int(text: str) -> int | float:
    # RFC 8785 writes large doubles such as 1e16 in integer form; they are doubles, not integers.
    value = int(text)
    return value if abs(value) <= _MAX_SAFE_INT else float(text)
