"""`trainguard.save`: torch.save that hashes the bytes as they are written, then signs them.

torch.save is handed a file object whose write() hashes each buffer on another thread while the calling
thread writes it to the file, so hashing overlaps writing and the digests are those of the bytes written.
The buffers are torch's own memory (tensor storages, headers), valid only during the call, so write()
waits for the hash before it returns and nothing is copied; small buffers are hashed in place. The file
is written under a temporary name, synced and renamed into place; the signature (FILE.trainguard.sig)
follows, written by `sign_manifest` as `trainguard sign` writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trainguard.errors import UsageError
from trainguard.provenance import DEFAULT_SHARD_SIZE, FileEntry, Manifest, PrivateKey, SignResult
from trainguard.provenance._signature import sign_manifest

__all__ = ["save"]
_INLINE = 1 << 20  # smaller buffers are hashed on the calling thread


class _HashingWriter:
    """A write-only file object for torch.save that hashes the file while it is written: the whole-file
    SHA-256 on one thread and, past the first shard, one SHA-256 per shard on another."""

    def __init__(self, fd: int, shard_size: int) -> None:
        self._fd = fd
        self._shard_size = shard_size
        self._whole = hashlib.sha256()
        self._first_shard: str | None = None  # the whole-file hash at the first shard boundary
        self._shards: list[str] = []  # digests of the finished shards after the first
        self._shard: Any = None  # the hasher of the current shard after the first
        self._whole_thread = ThreadPoolExecutor(1, thread_name_prefix="tg-save-hash")
        self._shard_thread = ThreadPoolExecutor(1, thread_name_prefix="tg-save-shards")
        self.written = 0

    def write(self, data: Any) -> int:
        with memoryview(data) as view, view.cast("B") as octets:
            count = len(octets)
            pos = self.written
            beyond = self._shard_size - pos  # where the bytes past the first shard start in this buffer
            if count < _INLINE:
                _write_all(self._fd, octets)
                self._hash_whole(pos, octets)
                if beyond < count:
                    self._hash_shards(max(pos, self._shard_size), octets[max(beyond, 0) :])
            else:
                pending = [self._whole_thread.submit(self._hash_whole, pos, octets)]
                if beyond < count:
                    start = max(beyond, 0)
                    pending.append(self._shard_thread.submit(self._hash_shards, pos + start, octets[start:]))
                try:
                    _write_all(self._fd, octets)
                finally:
                    # torch may free or reuse the buffer once write() returns: wait for the hashes.
                    for future in pending:
                        future.result()
            self.written = pos + count
        return count

    def flush(self) -> None:
        """Nothing is buffered: every write goes straight to the file descriptor."""

    def close(self) -> None:
        self._whole_thread.shutdown(wait=True)
        self._shard_thread.shutdown(wait=True)

    def finish(self) -> tuple[str, tuple[str, ...]]:
        """The whole-file digest and the shard digests (none when the file is not larger than one
        shard)."""
        self.close()
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

    The digests are taken while the file is written: each buffer torch writes is hashed on another
    thread while this one writes it. The file is written under a temporary name, fsynced, and renamed
    into place before it is signed, so a crash leaves the old checkpoint or the new one, never half of one.
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
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
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
                writer.close()
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
