"""Signings and verifications as ledger events.

Every `trainguard sign` and `trainguard verify` appends a ``provenance.sign`` or ``provenance.verify``
event to the default ledger ($TRAINGUARD_LEDGER, else $TRAINGUARD_HOME/ledger.db; signing key
$TRAINGUARD_LEDGER_KEY, else the ledger's default key). The payload::

    {"path": absolute path, "root": "sha256:...", "kind": "file" | "directory", "files": N, "bytes": N,
     "key_id": "sha256:..." | null, "ok": bool, "problems": [...], "signature": absolute path,
     "format": "trainguard" | "oms"}

`trainguard ckpt audit` reads the sign events back. A ledger that cannot be written is a warning: it never
stops a signing or a verification, unless the caller requires the ledger.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainguard.relay._record import record

__all__ = ["EVENT_SIGN", "EVENT_VERIFY", "provenance_payload", "record"]

EVENT_SIGN = "provenance.sign"
EVENT_VERIFY = "provenance.verify"
_MAX_PROBLEMS = 1000  # an event stays small; the count says how many were left out


def provenance_payload(
    path: Path,
    *,
    root: str | None,
    kind: str | None,
    files: int,
    size: int,
    key_id: str | None,
    ok: bool,
    problems: Sequence[str] = (),
    signature: Path | None = None,
    fmt: str = "trainguard",
) -> dict[str, Any]:
    """The payload of a sign or verify event; `path` is recorded resolved, as the audit compares it."""
    shown = list(problems[:_MAX_PROBLEMS])
    if len(problems) > _MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
    return {
        "path": os.path.realpath(path),
        "root": root,
        "kind": kind,
        "files": files,
        "bytes": size,
        "key_id": key_id,
        "ok": ok,
        "problems": shown,
        "signature": os.path.realpath(signature) if signature is not None else None,
        "format": fmt,
    }
