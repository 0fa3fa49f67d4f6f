"""What the commands that sign and verify share: the default signing key, trusted keys from flags,
atomic writes and a progress line."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

from trainguard.errors import UsageError
from trainguard.provenance import PrivateKey, PublicKey, load_trust_policy

__all__ = [
    "default_signing_key",
    "human_size",
    "load_signing_key",
    "progress_line",
    "trusted_keys",
    "write_atomic",
]

_PROGRESS_AFTER_S = 1.0


def default_signing_key() -> Path:
    """$TRAINGUARD_HOME/keys/signing.pem."""
    from trainguard.ledger._ledger import default_home

    return default_home() / "keys" / "signing.pem"


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class _ProgressLine:
    """One self-overwriting line on stderr, shown once hashing has taken a second, at most 10 a second."""

    def __init__(self, verb: str) -> None:
        self._verb = verb
        self._start = time.monotonic()
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._start < _PROGRESS_AFTER_S or (done != total and now - self._last < 0.1):
            return
        self._last = now
        percent = 100 * done // total if total else 100
        sys.stderr.write(f"\r\033[K{self._verb} {human_size(done)} of {human_size(total)} ({percent}%)")
        self._shown = True
        sys.stderr.flush()

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def progress_line(verb: str) -> _ProgressLine | None:
    return _ProgressLine(verb) if sys.stderr.isatty() else None


def trusted_keys(args: argparse.Namespace, *, required: bool) -> list[PublicKey]:
    keys = [PublicKey.load(Path(value)) for value in args.trust or ()]
    if args.trust_policy is not None:
        keys.extend(load_trust_policy(Path(args.trust_policy)))
    if required and not keys:
        public = f"{default_signing_key()}.pub"
        raise UsageError(
            "no trusted keys: pass --trust KEY or a policy file",
            hint=f"--trust {public} for your own default key, or --trust-policy FILE "
            "(env TRAINGUARD_TRUST_POLICY)",
        )
    return keys


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file beside it, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(fd)
        tmp.replace(path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_signing_key(args: argparse.Namespace) -> PrivateKey:
    """The key of --key, else the default one; a missing default says how to make it."""
    path = Path(args.key) if args.key is not None else default_signing_key()
    if args.key is None and not path.exists():
        raise UsageError(
            f"no signing key: {path} does not exist",
            hint=f"create one with: trainguard keygen --pem {path} (or pass --key FILE)",
        )
    return PrivateKey.load(path)
