"""`trainguard.save`: torch.save that hashes the bytes as they are written, then signs them.

The checkpoint is hashed while torch writes it: a thread follows the writer, reading each record back from
the page cache right after it was written and hashing it on another core, so the hashing overlaps torch's
own serialisation instead of following it, and the digests are those of the bytes in the file. The file is
written under a temporary name, synced and renamed into place; the signature (FILE.trainguard.sig) follows,
written by `sign_manifest` as `trainguard sign` writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainguard.errors import UsageError
from trainguard.provenance import DEFAULT_SHARD_SIZE, FileEntry, Manifest, PrivateKey, SignResult
from trainguard.provenance._signature import sign_manifest

__all__ = ["save"]
_BUFFER = 8 << 20


class _Trail(threading.Thread):
    """Hashes the file from `start` on, right behind the writer: it reads back what was just written,
    from the page cache, on its own core, while torch produces the next record."""

    def __init__(
        self, fd: int, start: int, consume: Callable[[int, memoryview], None], writer: _HashingWriter
    ):
        super().__init__(name="tg-save-hash", daemon=True)
        self._fd = fd
        self._pos = start
        self._consume = consume
        self._writer = writer
        self.error: BaseException | None = None

    def run(self) -> None:
        buffer = memoryview(bytearray(_BUFFER))
        writer = self._writer
        try:
            while True:
                with writer.progress:
                    while writer.written <= self._pos and not writer.closed:
                        writer.progress.wait()
                    limit, closed = writer.written, writer.closed
                while self._pos < limit:
                    got = os.preadv(self._fd, [buffer[: min(_BUFFER, limit - self._pos)]], self._pos)
                    if got == 0:
                        raise OSError(f"the checkpoint shrank while it was written (at byte {self._pos})")
                    self._consume(self._pos, buffer[:got])
                    self._pos += got
                if closed:
                    return
        except BaseException as exc:
            self.error = exc


class _HashingWriter:
    """A write-only file object for torch.save that hashes the file while it is written: the whole-file
    SHA-256 and, past the first shard, one SHA-256 per shard, each on its own thread."""

    def __init__(self, fd: int, shard_size: int) -> None:
        self._fd = fd
        self._shard_size = shard_size
        self._whole = hashlib.sha256()
        self._first_shard: str | None = None  # the whole-file hash at the first shard boundary
        self._shards: list[str] = []  # digests of the finished shards after the first
        self._shard: Any = None  # the hasher of the current shard after the first
        self.progress = threading.Condition()
        self.written = 0
        self.closed = False
        self._trails = [_Trail(fd, 0, self._hash_whole, self)]
        for trail in self._trails:
            trail.start()

    def write(self, data: Any) -> int:
        with memoryview(data) as view, view.cast("B") as octets:
            _write_all(self._fd, octets)
            count = len(octets)
        with self.progress:
            if self.written <= self._shard_size < self.written + count:
                # The file outgrows its first shard: the shards after it get their own thread.
                trail = _Trail(self._fd, self._shard_size, self._hash_shards, self)
                self._trails.append(trail)
                trail.start()
            self.written += count
            self.progress.notify_all()
        return count

    def flush(self) -> None:
        """Nothing is buffered: every write goes straight to the file descriptor."""

    def finish(self) -> tuple[str, tuple[str, ...]]:
        """Wait for the hashing to catch up; return the whole-file digest and the shard digests (none
        when the file is not larger than one shard)."""
        with self.progress:
            self.closed = True
            self.progress.notify_all()
        for trail in self._trails:
            trail.join()
            if trail.error is not None:
                raise trail.error
        if self.written <= self._shard_size:
            return self._whole.hexdigest(), ()
        shards = list(self._shards)
        if self._shard is not None:
            shards.append(self._shard.hexdigest())
        assert self._first_shard is not None
        return self._whole.hexdigest(), (self._first_shard, *shards)

    def _hash_whole(self, pos: int, view: memoryview) -> None:
        boundary = self._shard_size - pos
        if self._first_shard is None and 0 <= boundary < len(view):
            # The first shard is a prefix of the file: its digest is the whole-file hash at the boundary.
            self._whole.update(view[:boundary])
            self._first_shard = self._whole.copy().hexdigest()
            self._whole.update(view[boundary:])
        else:
            self._whole.update(view)

    def _hash_shards(self, pos: int, view: memoryview) -> None:
        """Hash bytes from the second shard on (`pos` >= shard size) into one hasher per shard."""
        size = self._shard_size
        offset = 0
        while offset < len(view):
            if self._shard is None:
                self._shard = hashlib.sha256()
            take = min(size - (pos + offset) % size, len(view) - offset)
            self._shard.update(view[offset : offset + take])
            offset += take
            if (pos + offset) % size == 0:
                self._shards.append(self._shard.hexdigest())
                self._shard = None


def save(
    obj: object,
    path: str | os.PathLike[str],
    *,
    key: PrivateKey,
    shard_size: int = DEFAULT_SHARD_SIZE,
    fsync: bool = True,
    **kwargs: Any,
) -> SignResult:
    """``torch.save(obj, path, **kwargs)``, then sign the file with `key` (PATH.trainguard.sig).

    The digests are taken while the file is written, by threads that hash each record right after it
    reaches the page cache. The file is written under a temporary name, fsynced, and renamed into place
    before it is signed, so a crash leaves the old checkpoint or the new one, never half of one.
    `fsync=False` skips the syncs (as torch.save does): faster, but after a power loss the file may be
    incomplete; its signature then no longer matches and the load gate refuses it.
    """
    import torch

    if shard_size <= 0:
        raise UsageError("shard_size must be positive")
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{target} is a directory: trainguard.save writes one checkpoint file")
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    # Read and write: the hashing threads read back what was written.
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    writer = None
    try:
        writer = _HashingWriter(fd, shard_size)
        torch.save(obj, writer, **kwargs)  # type: ignore[arg-type]  # any object with write() will do
        digest, shards = writer.finish()
        if fsync:
            os.fsync(fd)
        info = os.fstat(fd)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(BaseException):
                writer.finish()
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    temporary.replace(target)
    if fsync:
        _sync_directory(target.parent)
    entry = FileEntry(target.name, info.st_size, info.st_mode & 0o7777, digest, shards)
    manifest = Manifest(kind="file", name=target.name, shard_size=shard_size, files=(entry,))
    return sign_manifest(target, manifest, key)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return  # some filesystems do not open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
