"""The re-verification cache: digests of files already hashed, so an unchanged checkpoint re-verifies fast.

A row maps a file's absolute path to its digests, together with what ``stat`` said when it was hashed:
``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``. A row is used only when all five still match.
The ctime is the part that makes this safe: the kernel sets it to "now" whenever the file's content or
metadata changes, and no system call lets a user set it, so a rewrite that restores size and mtime
(``os.utime``) still moves it. The cache therefore trusts the filesystem's ctime; where that trust does not
hold (a root attacker, raw block-device writes, a clock set backwards, a network filesystem whose server
clock or ctime is unreliable), verify with ``--full``, which re-hashes everything.

Every row is authenticated with HMAC-SHA256 under a 32-byte secret in ``keys/cache.key`` (mode 0600), so
rows written by anything that cannot read the key (a copied or restored database, a tool with write access
to the cache only) are ignored and counted in `rejected`. The key does not protect against code running as
the same user: that code can read the key too.

A file changed within the clock tick of its last stat could keep its ctime (the "racily clean" problem
git has with its index): a file whose ctime is less than `racy_ns` before this cache was opened is hashed
but never cached. The database is SQLite in WAL mode shared by concurrent processes; it is pruned to
`max_rows` rows, oldest written first. Failures of the database never fail a verification: a row that
cannot be read is a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sqlite3
import stat
import struct
import threading
import time
from pathlib import Path
from types import TracebackType

from trainguard._secretkey import load_or_create_secret
from trainguard.errors import StoreError
from trainguard.provenance import FileEntry

__all__ = ["CACHE_KEY_NAME", "CACHE_NAME", "CacheWriter", "VerifyCache"]

CACHE_NAME = "verify-cache.db"
CACHE_KEY_NAME = "cache.key"
_MAC_DOMAIN = b"trainguard/verify-cache/v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_SHARDS = 1 << 20
_PRUNE_EVERY = 1024
_SCHEMA = """
CREATE TABLE IF NOT EXISTS digests (
    path BLOB PRIMARY KEY,
    stat TEXT NOT NULL,
    entry TEXT NOT NULL,
    mac BLOB NOT NULL,
    written INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS digests_written ON digests (written);
"""


def _stat_key(st: os.stat_result) -> str:
    # Text, not SQLite integers: st_dev and st_ino are unsigned 64-bit and may not fit a signed column.
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _path_key(path: Path) -> bytes:
    return os.fsencode(os.path.abspath(path))  # noqa: PTH100 - bytes of the lexical absolute path


def _encode_entry(entry: FileEntry) -> str:
    doc = {"size": entry.size, "digest": entry.digest, "shards": list(entry.shards)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _decode_entry(text: str, path: Path, st: os.stat_result) -> FileEntry | None:
    """The entry a row holds, or None if it is not exactly what `_encode_entry` writes for this size."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if type(doc) is not dict or set(doc) != {"size", "digest", "shards"}:
        return None
    size, digest, shards = doc["size"], doc["digest"], doc["shards"]
    if type(size) is not int or size != st.st_size:
        return None
    if type(digest) is not str or not _HEX64.fullmatch(digest):
        return None
    if type(shards) is not list or len(shards) > _MAX_SHARDS:
        return None
    if not all(type(s) is str and _HEX64.fullmatch(s) for s in shards):
        return None
    return FileEntry(path.name, size, stat.S_IMODE(st.st_mode), digest, tuple(shards))


class VerifyCache:
    """Digests of files hashed before, authenticated and keyed on stat; implements `DigestCache`.

    `hits`, `misses`, `rejected` (rows whose MAC failed or whose content is malformed), `stale` (rows
    for a file that has changed since), `skipped` (files too recently changed to cache) and `errors`
    (database failures) count what happened in this process.
    """

    def __init__(
        self,
        home: Path,
        *,
        max_rows: int = 1_000_000,
        racy_ns: int = 2_000_000_000,
        timeout: float = 30.0,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.home = Path(home)
        self.location = self.home / CACHE_NAME
        self.max_rows = max_rows
        self.racy_ns = racy_ns
        self.hits = self.misses = self.rejected = self.stale = self.skipped = self.errors = 0
        # Files hashed after this moment were stat'ed after it; see the module docstring.
        self._opened_ns = time.time_ns()
        self._secret = load_or_create_secret(self.home / "keys" / CACHE_KEY_NAME)
        self._lock = threading.Lock()
        self._puts = 0
        self._db = self._connect(timeout)

    def _connect(self, timeout: float) -> sqlite3.Connection:
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the same mode.
            fd = os.open(self.location, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot open the verification cache {self.location}: {exc.strerror}") from None
        try:
            db = sqlite3.connect(
                self.location, timeout=timeout, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the verification cache {self.location}: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            # Losing the last rows in a power cut only costs a re-hash.
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(
                f"the verification cache {self.location} cannot be used: {exc}",
                hint=f"delete {self.location}; it is rebuilt on the next verification",
            ) from None
        return db

    def _mac(self, path: bytes, stat_key: str, entry: str) -> bytes:
        message = bytearray(_MAC_DOMAIN)
        for field in (path, stat_key.encode("ascii"), entry.encode("utf-8")):
            message += struct.pack(">Q", len(field)) + field
        return hmac.new(self._secret, bytes(message), hashlib.sha256).digest()

    def get(self, path: Path, st: os.stat_result) -> FileEntry | None:
        """The cached entry for `path` if its row is authentic and `st` is what was hashed, else None."""
        key = _path_key(path)
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT stat, entry, mac FROM digests WHERE path = ?", (key,)
                ).fetchone()
            except sqlite3.Error:
                self.errors += 1
                row = None
            if row is None:
                self.misses += 1
                return None
            stat_key, entry_text, mac = row
            valid = (
                isinstance(stat_key, str)
                and isinstance(entry_text, str)
                and isinstance(mac, bytes)
                and hmac.compare_digest(mac, self._mac(key, stat_key, entry_text))
            )
            if not valid:
                self.rejected += 1
                self.misses += 1
                return None
            if stat_key != _stat_key(st):
                self.stale += 1
                self.misses += 1
                return None
            entry = _decode_entry(entry_text, Path(path), st)
            if entry is None:
                self.rejected += 1
                self.misses += 1
                return None
            self.hits += 1
            return entry

    def put(self, path: Path, st: os.stat_result, entry: FileEntry) -> None:
        """Remember `entry` as the digests of `path` while it has this stat."""
        if st.st_ctime_ns > self._opened_ns - self.racy_ns or entry.size != st.st_size:
            self.skipped += 1
            return
        key = _path_key(path)
        stat_key, entry_text = _stat_key(st), _encode_entry(entry)
        mac = self._mac(key, stat_key, entry_text)
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO digests (path, stat, entry, mac, written) VALUES (?, ?, ?, ?, ?)",
                    (key, stat_key, entry_text, mac, time.time_ns()),
                )
                if self._puts % _PRUNE_EVERY == 0:
                    self._prune()
                self._puts += 1
            except sqlite3.Error:
                self.errors += 1

    def _prune(self) -> None:
        (count,) = self._db.execute("SELECT count(*) FROM digests").fetchone()
        if count > self.max_rows:
            self._db.execute(
                "DELETE FROM digests WHERE rowid IN (SELECT rowid FROM digests ORDER BY written LIMIT ?)",
                (count - self.max_rows,),
            )

    def writer(self) -> CacheWriter:
        """A view that stores fresh digests but never answers from the cache (for signing)."""
        return CacheWriter(self)

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "rejected": self.rejected,
            "stale": self.stale,
            "skipped": self.skipped,
            "errors": self.errors,
        }

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                self.errors += 1

    def __enter__(self) -> VerifyCache:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VerifyCache({str(self.location)!r})"


class CacheWriter:
    """Stores digests into a `VerifyCache` and answers no lookups: what is signed is always hashed fresh."""

    def __init__(self, cache: VerifyCache) -> None:
        self.cache = cache

    def get(self, path: Path, st: os.stat_result) -> FileEntry | None:
        return None

    def put(self, path: Path, st: os.stat_result, entry: FileEntry) -> None:
        self.cache.put(path, st, entry)
