"""SHA-256 of many files at once: an installed environment is thousands of small files and a few big ones.

Threads share the work (hashlib and file reads release the GIL); small files are read whole with one
read, big ones in page-aligned chunks. Files are opened with O_NOFOLLOW, so a symlink is never hashed as
its target: the caller decides what a link means.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence

from trainguard.provenance._hashing import read_buffer

__all__ = ["sha256_files"]

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_SMALL = 1 << 20  # read whole in one call
_BATCH = 64  # small files per task: fewer futures, less scheduling per file


class _Buffer(threading.local):
    def __init__(self) -> None:
        self.view = read_buffer()


def sha256_files(
    paths: Sequence[str],
    *,
    sizes: Mapping[str, int] | None = None,
    workers: int | None = None,
    done: Callable[[int, int], None] | None = None,
) -> dict[str, bytes | OSError]:
    """The raw SHA-256 digest of every path, or the OSError that stopped it (missing, unreadable, a
    symlink, not a regular file). `sizes`, when the caller has them, orders the work without a stat.
    `done(files, bytes)`, when given, hears how much is hashed as batches finish (from this thread)."""
    workers = workers or min(8, (os.cpu_count() or 1) + 1)
    buffers = _Buffer()
    results: dict[str, bytes | OSError] = {}
    if sizes is None:
        sizes = {path: _size(path) for path in paths}
    sizes = {path: sizes[path] for path in paths}
    todo = sorted(sizes, key=lambda p: -sizes[p])  # the longest stream starts first
    big = [p for p in todo if sizes[p] >= _SMALL]
    small = [p for p in todo if sizes[p] < _SMALL]
    batches = [small[i : i + _BATCH] for i in range(0, len(small), _BATCH)]
    hashed_bytes = 0

    def add(found: Mapping[str, bytes | OSError]) -> None:
        nonlocal hashed_bytes
        results.update(found)
        hashed_bytes += sum(sizes[path] for path in found)
        if done is not None:
            done(len(results), hashed_bytes)

    if workers == 1:
        for path in big:
            add({path: _hash_one(path, buffers)})
        for batch in batches:
            add(_hash_batch(batch, buffers))
        return results
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tg-env-hash") as pool:
        big_futures = {path: pool.submit(_hash_one, path, buffers) for path in big}
        for batch_result in pool.map(_hash_batch, batches, [buffers] * len(batches)):
            add(batch_result)
        for path, future in big_futures.items():
            add({path: future.result()})
    return results


def _size(path: str) -> int:
    """For ordering only: a file that cannot be stat'ed sorts last and fails when opened."""
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _hash_batch(batch: Sequence[str], buffers: _Buffer) -> dict[str, bytes | OSError]:
    return {path: _hash_one(path, buffers) for path in batch}


def _hash_one(path: str, buffers: _Buffer) -> bytes | OSError:
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        return exc
    try:
        size = os.fstat(fd).st_size
        if size < _SMALL:
            data = os.read(fd, size + 1)
            if len(data) <= size:  # else it grew: hash it all below
                return hashlib.sha256(data).digest()
        hasher = hashlib.sha256()
        view = buffers.view
        offset = 0
        while True:
            got = os.preadv(fd, [view], offset)
            if not got:
                return hasher.digest()
            hasher.update(view[:got])
            offset += got
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
