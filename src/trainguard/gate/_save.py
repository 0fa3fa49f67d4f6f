"""`trainguard.save`: torch.save that hashes the file as it is written, then signs it.

torch.save is handed a file object whose write() only writes: each buffer goes straight to the file and
write() returns. Hashing threads follow the file as it grows, reading back what was written (from the page
cache, into a reused page-aligned buffer) and hashing it, so torch never waits for a hash: on two cores
the whole-file SHA-256 runs beside torch's own serialization, and saving costs the hash's lag behind the
last write. The digests are those of the bytes in the file, not of torch's buffers, which may be freed
as soon as write() returns (a GPU tensor's copy on the host is). The file is written under a temporary
name, synced and renamed into place; the signature (FILE.trainguard.sig) follows, written by
`sign_manifest` as `trainguard sign` writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from trainguard._durable import sync_folder
from trainguard.errors import UsageError
from trainguard.provenance import DEFAULT_SHARD_SIZE, FileEntry, Manifest, PrivateKey, PublicKey, SignResult
from trainguard.provenance._hashing import read_buffer
from trainguard.provenance._signature import sign_manifest

__all__ = ["save"]


class _Follower:
    """A thread that reads a growing file from `start` as its writer reports progress, and hashes it:
    from 0, the whole file (noting the digest at the first shard boundary, which is the first shard's
    digest); from the shard size, one digest per shard."""

    def __init__(self, writer: _HashingWriter, start: int, name: str) -> None:
        self._writer = writer
        self._start = start
        self.position = start
        self.whole = hashlib.sha256()
        self.first_shard: str | None = None
        self.shards: list[str] = []
        self._shard: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        writer = self._writer
        buffer = read_buffer()
        try:
            while True:
                end = writer.wait_beyond(self.position)
                if end is None:
                    return
                while self.position < end:
                    want = min(len(buffer), end - self.position)
                    got = os.preadv(writer.fd, [buffer[:want]], self.position)
                    if got <= 0:
                        raise OSError(
                            f"the file being saved ends at {self.position} bytes; {end} were written"
                        )
                    self._hash(buffer[:got])
                    self.position += got
        except BaseException as exc:  # reported by finish(); the writer stops waiting for this thread
            self.error = exc
            writer.abandon()

    def _hash(self, view: memoryview) -> None:
        size = self._writer.shard_size
        if self._start == 0:
            boundary = size - self.position
            if self.first_shard is None and 0 <= boundary < len(view):
                self.whole.update(view[:boundary])
                self.first_shard = self.whole.copy().hexdigest()
                self.whole.update(view[boundary:])
            else:
                self.whole.update(view)
            return
        offset = 0
        while offset < len(view):
            if self._shard is None:
                self._shard = hashlib.sha256()
            take = min(size - (self.position + offset) % size, len(view) - offset)
            self._shard.update(view[offset : offset + take])
            offset += take
            if (self.position + offset) % size == 0:
                self.shards.append(self._shard.hexdigest())
                self._shard = None

    def last_shard(self) -> list[str]:
        return [self._shard.hexdigest()] if self._shard is not None else []


class _HashingWriter:
    """A write-only file object for torch.save: write() writes and returns, and followers hash the
    written bytes behind it (the second starts only if the file grows past the first shard)."""

    def __init__(self, fd: int, shard_size: int) -> None:
        self.fd = fd
        self.shard_size = shard_size
        self.written = 0
        self._done = False
        self._changed = threading.Condition()
        self._followers = [_Follower(self, 0, "tg-save-hash")]

    def write(self, data: Any) -> int:
        with memoryview(data) as view, view.cast("B") as octets:
            _write_all(self.fd, octets)
            count = len(octets)
        with self._changed:
            self.written += count
            self._changed.notify_all()
        if len(self._followers) == 1 and self.written > self.shard_size:
            self._followers.append(_Follower(self, self.shard_size, "tg-save-shards"))
        return count

    def flush(self) -> None:
        """Nothing is buffered: every write goes straight to the file descriptor."""

    def wait_beyond(self, position: int) -> int | None:
        """How far the file is written, once that is past `position`; None when writing is over and
        everything has been handed out."""
        with self._changed:
            while self.written <= position and not self._done:
                self._changed.wait()
            return self.written if self.written > position else None

    def abandon(self) -> None:
        """A follower failed: the others hash what is written and stop, and finish() reports it."""
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def close(self) -> None:
        """Writing is over: followers hash what is written and stop."""
        self.abandon()
        for follower in self._followers:
            follower.join()

    def finish(self) -> tuple[str, tuple[str, ...]]:
        """The whole-file digest and the shard digests (none when the file is not larger than one
        shard), once the followers have hashed every written byte."""
        self.close()
        for follower in self._followers:
            if follower.error is not None:
                raise follower.error
            if follower.position != self.written:
                raise OSError(f"only {follower.position} of {self.written} written bytes were hashed")
        whole = self._followers[0]
        if self.written <= self.shard_size:
            return whole.whole.hexdigest(), ()
        rest = self._followers[1]
        assert whole.first_shard is not None
        return whole.whole.hexdigest(), (whole.first_shard, *rest.shards, *rest.last_shard())


def save(
    obj: object,
    path: str | os.PathLike[str],
    *,
    key: PrivateKey | str | os.PathLike[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    fsync: bool = True,
    ledger: bool = True,
    **kwargs: Any,
) -> SignResult:
    """``torch.save(obj, path, **kwargs)``, then sign the file with `key` (PATH.trainguard.sig).

    `key` is a `trainguard.provenance.PrivateKey`, or the path of a private key file (PEM, mode 0600,
    as `trainguard keygen --pem FILE` writes it); None is the default signing key,
    $TRAINGUARD_HOME/keys/signing.pem, the one `trainguard sign` uses. The key and the arguments are
    checked before anything is written: a bad one leaves the old checkpoint as it was. The signing is
    recorded in the ledger as `trainguard sign` records it (`ledger=False` does not), so that
    `trainguard ckpt audit` notices the file altered or deleted later.

    The digests are taken while the file is written: a thread reads back and hashes what torch has
    written while torch goes on writing. The file is written under a temporary name, fsynced, and renamed
    into place before it is signed, so a crash leaves the old checkpoint or the new one, never half of one.
    `fsync=False` skips the syncs (as torch.save does): faster, but after a power loss the file may be
    incomplete; its signature then no longer matches and the load gate refuses it.
    """
    if isinstance(shard_size, bool) or shard_size <= 0:
        raise UsageError(f"trainguard.save: shard_size must be a positive integer, not {shard_size!r}")
    signing_key = _signing_key(key)
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{target} is a directory: trainguard.save writes one checkpoint file")
    if not target.parent.is_dir():
        raise UsageError(f"cannot save {target}: the folder {target.parent} does not exist")
    import torch

    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise UsageError(f"cannot save {target}: {exc.strerror or exc}") from None
    writer = None
    try:
        writer = _HashingWriter(fd, shard_size)
        torch.save(obj, writer, **kwargs)  # type: ignore[arg-type]  # any object with write() will do
        if fsync:
            os.fsync(fd)  # while the hash catches up
        digest, shards = writer.finish()
        info = os.fstat(fd)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(BaseException):
                writer.close()
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    temporary.replace(target)
    if fsync:
        sync_folder(target.parent)
    entry = FileEntry(target.name, info.st_size, info.st_mode & 0o7777, digest, shards)
    manifest = Manifest(kind="file", name=target.name, shard_size=shard_size, files=(entry,))
    signed = sign_manifest(target, manifest, signing_key)
    if ledger:
        _record(signed, manifest)
    return signed


def _record(signed: SignResult, manifest: Manifest) -> None:
    """The signing in the ledger, as `trainguard sign` records it: `ckpt audit` then knows the file, and
    notices when it is altered or deleted. A ledger that cannot be written is a warning."""
    from trainguard.gate._events import EVENT_SIGN, provenance_payload, record

    payload = provenance_payload(
        signed.path,
        root=signed.root,
        kind=manifest.kind,
        files=len(manifest.files),
        size=manifest.total_bytes,
        key_id=signed.key_id,
        ok=True,
        signature=signed.sig_path,
    )
    record(EVENT_SIGN, payload)


def _signing_key(key: object) -> PrivateKey:
    """The key `save` signs with, loaded and checked before the checkpoint is touched."""
    if isinstance(key, PrivateKey):
        return key
    if key is None:
        from trainguard._cli_common import default_signing_key

        default = default_signing_key()
        if not default.exists():
            raise UsageError(
                f"trainguard.save: no key given and no default signing key at {default}: create it with "
                f"`trainguard keygen --pem {default}`, or pass key=PATH or key=PrivateKey"
            )
        return PrivateKey.load(default)
    if isinstance(key, str | os.PathLike):
        return PrivateKey.load(Path(key))
    if isinstance(key, PublicKey):
        raise UsageError("trainguard.save: key is a PublicKey, which verifies; signing needs its PrivateKey")
    raise UsageError(
        f"trainguard.save: key must be a PrivateKey or the path of a private key file, not "
        f"{type(key).__name__}"
    )


def _write_all(fd: int, data: bytes | memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
