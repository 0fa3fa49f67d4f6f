"""Append one event to the default ledger from a command: a ledger that cannot be written warns, unless
the caller requires it.

The default ledger is $TRAINGUARD_LEDGER, else $TRAINGUARD_HOME/ledger.db; its signing key
$TRAINGUARD_LEDGER_KEY, else the ledger's default key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainguard.errors import StoreError, TrainguardError

__all__ = ["record", "valid_text"]

_SURROGATES = range(0xD800, 0xE000)
_ESCAPED_BYTES = range(0xDC80, 0xDD00)  # what os.fsdecode makes of a byte that is not UTF-8


def valid_text(value: Any) -> Any:
    """`value` with every string made valid Unicode: a file name that is not UTF-8 reaches Python with
    lone surrogates, which JSON cannot carry, and the event must be recorded all the same. Such a byte
    is written ``\\xff``, any other lone surrogate ``\\udXXX``."""
    if isinstance(value, str):
        return value if value.isascii() else _escape_surrogates(value)
    if isinstance(value, Mapping):
        return {valid_text(key): valid_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [valid_text(item) for item in value]
    return value


def _escape_surrogates(text: str) -> str:
    if not any(ord(ch) in _SURROGATES for ch in text):
        return text
    return "".join(
        ch
        if ord(ch) not in _SURROGATES
        else (f"\\x{ord(ch) - 0xDC00:02x}" if ord(ch) in _ESCAPED_BYTES else f"\\u{ord(ch):04x}")
        for ch in text
    )


def record(event_type: str, payload: Mapping[str, Any], *, require: bool = False) -> int | None:
    """Append an event to the default ledger; returns its index, or None when it could not be written.

    Without `require`, a failure is a warning on stderr; with it, a StoreError.
    """
    from trainguard.ledger._events import new_event
    from trainguard.ledger._keys import ALG_ED25519, SigningKey
    from trainguard.ledger._ledger import Ledger

    location = os.environ.get("TRAINGUARD_LEDGER") or None
    key_file = os.environ.get("TRAINGUARD_LEDGER_KEY") or None
    try:
        key = SigningKey.load(Path(key_file), alg=ALG_ED25519) if key_file else None
        with Ledger.open(location, key=key) as ledger:
            return ledger.append(new_event(event_type, valid_text(payload)))
    # A ledger of any kind failing in any way must not stop the command; bugs still show in the message.
    except Exception as exc:
        message = exc.diagnostics() if isinstance(exc, TrainguardError) else f"{type(exc).__name__}: {exc}"
        if require:
            raise StoreError(
                f"could not record {event_type} in the ledger: {message}",
                hint="fix the ledger, or run without requiring it",
            ) from exc
        print(f"trainguard: warning: {event_type} not recorded in the ledger: {message}", file=sys.stderr)
        return None
