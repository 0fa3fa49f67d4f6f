"""Key files on disk: read with the permission check a private key needs, created once and never overwritten.

Used by the ledger's note keys and by the checkpoint signing keys alike.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path

from trainguard._durable import sync_folder
from trainguard.errors import KeyFileError

__all__ = ["read_key_file", "write_new_key_file"]

# A signed-note verifier key: name, 8 hex digits of key id, base64 (which may itself hold "+").
_NOTE_VERIFIER = re.compile(rb"[^+\s]+\+[0-9a-f]{8}\+[A-Za-z0-9+/]+={0,2}")


def read_key_file(path: Path, *, private: bool, max_bytes: int) -> bytes:
    """The bytes of a key file; a private key file must not be accessible to group or others."""
    try:
        # O_NONBLOCK: a FIFO put in place of the key file must not hang us; regular files ignore it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist", hint="check the path or generate a key"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
    # fstat the opened file, not the path: the mode checked is the mode of what is read.
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise KeyFileError(f"key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise KeyFileError(f"key file {path} is too large to be a key file")
    if private and _is_public_key(data):
        # Said before the mode: a public key is 0644 on purpose, and chmod would not make it private.
        raise KeyFileError(
            f"{path} is a public key, but a private key is needed to sign",
            hint=f"pass the private key it was made from (keygen writes FILE and FILE.pub): "
            f"{_private_guess(path)}",
        )
    mode = stat.S_IMODE(info.st_mode)
    if private and mode & 0o077:
        raise KeyFileError(
            f"private key file {path} is accessible by other users (mode {mode:04o})",
            hint=f"chmod 600 {path}",
        )
    return data


def _is_public_key(data: bytes) -> bool:
    """A PEM public key, or a signed-note verifier key (``name+keyid+base64``: a private note key
    starts with ``PRIVATE+KEY+``)."""
    text = data.strip()
    if text.startswith((b"-----BEGIN PUBLIC KEY-----", b"-----BEGIN EC PUBLIC KEY-----")):
        return True
    return not text.startswith(b"PRIVATE+KEY+") and _NOTE_VERIFIER.fullmatch(text) is not None


def _private_guess(path: Path) -> str:
    return str(path.with_suffix("")) if path.suffix == ".pub" else "the file without .pub"


def write_new_key_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (never overwriting) with exactly `mode` and `data`, durably and all at once.

    The bytes go to a temporary file in the same folder, which is then hard-linked to `path`: the link
    fails if `path` exists, and no other process can see `path` empty or half-written (processes
    creating the same default key together read the winner's whole key). Where the file system has no
    hard links, `path` is created exclusively and written in place. A missing parent folder is
    created with mode 0700.
    """
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyFileError(f"cannot create directory {parent}: {exc.strerror}") from None
    if path.exists() or path.is_symlink():
        raise _exists(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=parent)
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        _write_durably(fd, data, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _exists(path) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
            _create_in_place(path, data, mode)
    finally:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
    sync_folder(parent)


def _exists(path: Path) -> KeyFileError:
    return KeyFileError(
        f"key file {path} already exists; refusing to overwrite it",
        hint="move the old key away first if you really mean to replace it",
    )


def _write_durably(fd: int, data: bytes, mode: int) -> None:
    with os.fdopen(fd, "wb") as handle:
        # The umask may have taken bits away from a public key's 0644; set exactly what was asked.
        os.fchmod(fd, mode)
        handle.write(data)
        handle.flush()
        os.fsync(fd)


def _create_in_place(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    _write_durably(fd, data, mode)
