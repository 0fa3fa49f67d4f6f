"""The quick-mode cache: what a verification found clean, keyed on each file's stat.

One file per environment and baseline ($TRAINGUARD_HOME/env-cache/<sha256 of both>.json): for every
file a clean verification hashed, by its environment path (`env/...`, `stdlib/...`), its (dev, inode,
size, mtime_ns, ctime_ns) and digest. The next verification hashes only the files whose stat differs.
The ctime makes this safe: the kernel moves it on any write or metadata change and no call sets it
back, so a rewrite that restores size and mtime is still seen (where that does not hold, a root
attacker or raw device writes, use --full). A file whose ctime is within two seconds of the
verification is never cached (it could change again within one clock tick).

The whole file is authenticated with HMAC-SHA256 under the local secret ($TRAINGUARD_HOME/keys/cache.key,
mode 0600) and bound to the baseline it was verified against: a cache copied from elsewhere, edited, or
made for another baseline is ignored, and everything is hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import struct
import time
from collections.abc import Mapping
from pathlib import Path

from trainguard._secretkey import load_or_create_secret
from trainguard.envcheck._walk import StatKey

__all__ = ["QuickCache"]

_DOMAIN = b"trainguard/env-cache/v2\n"
_MAGIC = b"trainguard-env-cache 2\n"
_HEAD = struct.Struct("<II")
_ROW = struct.Struct("<QQQqq32s")
_RACY_NS = 2_000_000_000
_MAX_BYTES = 256 << 20


class QuickCache:
    """Digests of files known clean, for one environment and one baseline (or none).

    The file is binary, since reading it is part of every quick check: the binding line, the row count
    and the length of the paths, the paths (NUL-separated UTF-8), then one fixed-size row per path
    (dev, inode, size, mtime_ns, ctime_ns, raw SHA-256).
    """

    def __init__(self, home: Path, prefix: str, baseline: str | None) -> None:
        self._secret = load_or_create_secret(home / "keys" / "cache.key")
        self._binding = f"{prefix}\n{baseline or '-'}".encode("utf-8", "surrogateescape")
        # One file per environment and reference, so checks against a baseline and against RECORDs
        # do not evict each other.
        name = hashlib.sha256(self._binding).hexdigest()[:32]
        self.path = home / "env-cache" / f"{name}.bin"
        self.entries: dict[str, tuple[int, int, int, int, int, bytes]] = {}
        self.rejected = False
        self._started_ns = time.time_ns()
        self._load()

    def save(self, clean: Mapping[str, tuple[StatKey, str]]) -> None:
        """Replace the cache with `clean` (path -> stat key and digest), leaving out racy files."""
        limit = self._started_ns - _RACY_NS
        kept = [(path, key, digest) for path, (key, digest) in clean.items() if key[4] < limit]
        paths = "\0".join(path for path, _, _ in kept).encode("utf-8", "surrogateescape")
        rows = b"".join(_ROW.pack(*key, bytes.fromhex(digest)) for _, key, digest in kept)
        body = b"".join((_MAGIC, self._binding, b"\n", _HEAD.pack(len(kept), len(paths)), paths, rows))
        mac = hmac.new(self._secret, _DOMAIN + body, hashlib.sha256).hexdigest().encode()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        try:
            with tmp.open("wb") as handle:
                handle.write(mac + b"\n" + body)
            tmp.replace(self.path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _load(self) -> None:
        try:
            with self.path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > _MAX_BYTES:
                    self.rejected = True
                    return
                data = handle.read(size + 1)
        except OSError:
            return
        mac, _, body = data.partition(b"\n")
        expected = hmac.new(self._secret, _DOMAIN + body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(mac, expected):
            self.rejected = True
            return
        # Authenticated: written by this code under this secret. Still checked, so a bug cannot crash.
        head = _MAGIC + self._binding + b"\n"
        if not body.startswith(head):
            return  # made for another environment or baseline
        start = len(head)
        try:
            count, paths_size = _HEAD.unpack_from(body, start)
        except struct.error:
            self.rejected = True
            return
        start += _HEAD.size
        rows = memoryview(body)[start + paths_size :]
        paths = (
            body[start : start + paths_size].decode("utf-8", "surrogateescape").split("\0") if count else []
        )
        if len(paths) != count or len(rows) != count * _ROW.size:
            self.rejected = True
            return
        self.entries = dict(zip(paths, _ROW.iter_unpack(rows), strict=True))
