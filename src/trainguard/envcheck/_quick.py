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
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainguard._secretkey import load_or_create_secret
from trainguard.envcheck._walk import StatKey

__all__ = ["QuickCache"]

_DOMAIN = b"trainguard/env-cache/v1\n"
_RACY_NS = 2_000_000_000
_MAX_BYTES = 256 << 20


class QuickCache:
    """Digests of files known clean, for one environment and one baseline (or none)."""

    def __init__(self, home: Path, prefix: str, baseline: str | None) -> None:
        self._secret = load_or_create_secret(home / "keys" / "cache.key")
        self._binding = f"{prefix}\n{baseline or '-'}"
        # One file per environment and reference, so checks against a baseline and against RECORDs
        # do not evict each other.
        name = hashlib.sha256(os.fsencode(self._binding)).hexdigest()[:32]
        self.path = home / "env-cache" / f"{name}.json"
        self.entries: dict[str, list[Any]] = {}  # path -> [dev, inode, size, mtime_ns, ctime_ns, digest]
        self.rejected = False
        self._started_ns = time.time_ns()
        self._load()

    def get(self, path: str, key: StatKey) -> str | None:
        """The digest of a file (by environment path) still as it was when found clean, else None."""
        row = self.entries.get(path)
        if row is None or row[4] != key[4] or row[3] != key[3] or row[2] != key[2]:
            return None
        return row[5] if row[1] == key[1] and row[0] == key[0] else None

    def save(self, clean: Mapping[str, tuple[StatKey, str]]) -> None:
        """Replace the cache with `clean` (path -> stat key and digest), leaving out racy files."""
        limit = self._started_ns - _RACY_NS
        rows = {path: [*key, digest] for path, (key, digest) in clean.items() if key[4] < limit}
        body = json.dumps({"binding": self._binding, "entries": rows}, separators=(",", ":")).encode()
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
                data = handle.read(_MAX_BYTES + 1)
        except OSError:
            return
        mac, _, body = data.partition(b"\n")
        expected = hmac.new(self._secret, _DOMAIN + body, hashlib.sha256).hexdigest().encode()
        if len(data) > _MAX_BYTES or not hmac.compare_digest(mac, expected):
            self.rejected = True
            return
        try:
            doc = json.loads(body)
            if doc["binding"] != self._binding:
                return
            entries = doc["entries"]
            if not isinstance(entries, dict):
                raise TypeError("entries")
            self.entries = entries  # authenticated: written by this code under this secret
        except (ValueError, KeyError, TypeError):
            self.rejected = True
