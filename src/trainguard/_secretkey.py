"""A local 32-byte secret (mode 0600) that authenticates caches with HMAC: made on first use, shared by
concurrent processes, refused when other users can read it."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from trainguard.errors import KeyFileError

__all__ = ["load_or_create_secret"]

_KEY_BYTES = 32


def _read_key(path: Path) -> bytes:
    """The secret; KeyFileError if it is not a private 32-byte regular file of this user."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"secret key {path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != os.geteuid():
            raise KeyFileError(
                f"secret key {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o})",
                hint=f"delete {path}; a new one is made and what it authenticated is rebuilt",
            )
        data = handle.read(_KEY_BYTES + 1)
    if len(data) != _KEY_BYTES:
        raise KeyFileError(
            f"secret key {path} is not {_KEY_BYTES} bytes",
            hint=f"delete {path}; a new one is made and what it authenticated is rebuilt",
        )
    return data


def load_or_create_secret(path: Path) -> bytes:
    """Read the secret, creating it on first use.

    A new key is written to a temporary file (O_EXCL, 0600) and linked into place: a concurrent process
    either sees no key or the whole key, never a partial one, and exactly one key wins.
    """
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KeyFileError(f"cannot read secret key {path}: {exc.strerror}") from None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(_KEY_BYTES))
            handle.flush()
            os.fsync(fd)
        with contextlib.suppress(FileExistsError):  # another process made the key first; use theirs
            os.link(tmp, path)
    except OSError as exc:
        raise KeyFileError(f"cannot create secret key {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    try:
        return _read_key(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read secret key {path}: {exc.strerror}") from None
