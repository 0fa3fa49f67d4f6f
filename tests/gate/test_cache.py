"""The re-verification cache: hits skip hashing, any change to a file or to a row makes it a miss."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from trainguard.errors import KeyFileError, StoreError
from trainguard.gate._cache import CACHE_KEY_NAME, CACHE_NAME, VerifyCache
from trainguard.provenance import FileEntry, PrivateKey, TreeChanged, sign_path, verify_path

DIGEST = "ab" * 32


def _cache(home: Path, **kwargs: int) -> VerifyCache:
    # racy_ns=0: these files were all written a moment ago; the racy guard has its own test.
    return VerifyCache(home, racy_ns=kwargs.pop("racy_ns", 0), **kwargs)


def _tick() -> None:
    """Let the filesystem clock move on, so a rewrite gets a ctime of its own."""
    time.sleep(0.05)


def _rewrite_same_size_keep_mtime(path: Path) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    _tick()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


def test_put_then_get_hits_and_the_key_is_private(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    target.write_bytes(b"x" * 100)
    with _cache(tmp_path / "home") as cache:
        cache.put(target, target.stat(), FileEntry("w.bin", 100, 0o644, DIGEST))
        entry = cache.get(target, target.stat())
        assert entry is not None and entry.digest == DIGEST and entry.size == 100
        assert cache.stats()["hits"] == 1
    key = tmp_path / "home" / "keys" / CACHE_KEY_NAME
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 32
    assert (tmp_path / "home" / CACHE_NAME).stat().st_mode & 0o077 == 0


def test_content_change_with_mtime_restored_is_a_miss_because_ctime_moved(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    target.write_bytes(b"x" * 100)
    with _cache(tmp_path / "home") as cache:
        cache.put(target, target.stat(), FileEntry("w.bin", 100, 0o644, DIGEST))
        _rewrite_same_size_keep_mtime(target)
        assert cache.get(target, target.stat()) is None
        assert cache.stale == 1 and cache.hits == 0


def test_recently_changed_files_are_not_cached(tmp_path: Path) -> None:
    """Racily clean: a file changed within the clock tick of its stat could change again unseen."""
    target = tmp_path / "w.bin"
    target.write_bytes(b"x")
    with VerifyCache(tmp_path / "home") as cache:
        cache.put(target, target.stat(), FileEntry("w.bin", 1, 0o644, DIGEST))
        assert cache.skipped == 1
        assert cache.get(target, target.stat()) is None


def test_a_row_with_an_edited_digest_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    target.write_bytes(b"x" * 10)
    home = tmp_path / "home"
    with _cache(home) as cache:
        cache.put(target, target.stat(), FileEntry("w.bin", 10, 0o644, DIGEST))
    with sqlite3.connect(home / CACHE_NAME) as db:
        db.execute("UPDATE digests SET entry = replace(entry, ?, ?)", (DIGEST, "cd" * 32))
    db.close()
    with _cache(home) as cache:
        assert cache.get(target, target.stat()) is None
        assert cache.rejected == 1


def test_rows_from_another_key_are_rejected(tmp_path: Path) -> None:
    """A cache database copied in from elsewhere (or forged without the key) vouches for nothing."""
    target = tmp_path / "w.bin"
    target.write_bytes(b"x" * 10)
    with _cache(tmp_path / "a") as cache:
        cache.put(target, target.stat(), FileEntry("w.bin", 10, 0o644, DIGEST))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / CACHE_NAME).write_bytes((tmp_path / "a" / CACHE_NAME).read_bytes())
    with _cache(tmp_path / "b") as cache:
        assert cache.get(target, target.stat()) is None
        assert cache.rejected == 1


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _cache(home).close()
    (home / "keys" / CACHE_KEY_NAME).chmod(0o644)
    with pytest.raises(KeyFileError, match="accessible by other users"):
        _cache(home)


def test_a_corrupt_database_is_a_store_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / CACHE_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a database") as caught:
        _cache(home)
    assert "delete" in caught.value.diagnostics()


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    files = []
    for i in range(6):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        files.append(f)
    with _cache(home, max_rows=3) as cache:
        for f in files[:5]:
            cache.put(f, f.stat(), FileEntry(f.name, 1, 0o644, DIGEST))
    with _cache(home, max_rows=3) as cache:  # pruning runs on a cache's first write
        cache.put(files[5], files[5].stat(), FileEntry("f5", 1, 0o644, DIGEST))
        assert cache.get(files[0], files[0].stat()) is None  # the oldest went first
        assert cache.get(files[5], files[5].stat()) is not None
    with sqlite3.connect(home / CACHE_NAME) as db:
        assert db.execute("SELECT count(*) FROM digests").fetchone()[0] == 3
    db.close()


def test_concurrent_writers_share_one_cache(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _cache(home).close()
    files = []
    for i in range(200):
        f = tmp_path / f"f{i}"
        f.write_bytes(b"x")
        files.append(f)
    caches = [_cache(home) for _ in range(4)]

    def work(cache: VerifyCache, offset: int) -> None:
        for f in files[offset::4]:
            cache.put(f, f.stat(), FileEntry(f.name, 1, 0o644, DIGEST))

    threads = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(caches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c.errors == 0 for c in caches)
    for c in caches:
        c.close()
    with _cache(home) as cache:
        assert all(cache.get(f, f.stat()) is not None for f in files)


# --- with verify_path ---


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, PrivateKey]:
    key = PrivateKey.generate("ed25519")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (ckpt / "config.json").write_bytes(b'{"layers": 2}')
    sign_path(ckpt, key)
    return ckpt, key


def test_reverification_is_answered_from_the_cache(tmp_path: Path, signed: tuple[Path, PrivateKey]) -> None:
    ckpt, key = signed
    hashed: list[int] = []
    with _cache(tmp_path / "home") as cache:
        verify_path(ckpt, [key.public()], full=False, digest_cache=cache, workers=1)
        assert cache.misses == 2
    with _cache(tmp_path / "home") as cache:
        verify_path(
            ckpt,
            [key.public()],
            full=False,
            digest_cache=cache,
            workers=1,
            progress=lambda d, t: hashed.append(d),
        )
        assert cache.hits == 2 and cache.misses == 0
    # Every byte came from the cache: the progress never counted any hashing.
    assert not hashed or hashed[-1] == (1 << 20) + 13


def test_rewrite_with_restored_mtime_is_still_detected(
    tmp_path: Path, signed: tuple[Path, PrivateKey]
) -> None:
    ckpt, key = signed
    with _cache(tmp_path / "home") as cache:
        verify_path(ckpt, [key.public()], full=False, digest_cache=cache)
    _rewrite_same_size_keep_mtime(ckpt / "model.safetensors")
    with (
        _cache(tmp_path / "home") as cache,
        pytest.raises(TreeChanged, match=r"modified: model\.safetensors"),
    ):
        verify_path(ckpt, [key.public()], full=False, digest_cache=cache)


def test_a_row_forged_to_match_a_tampered_file_is_ignored(
    tmp_path: Path, signed: tuple[Path, PrivateKey]
) -> None:
    """The attack the MAC stops: rewrite the file, then point its cache row at the new stat."""
    ckpt, key = signed
    home = tmp_path / "home"
    with _cache(home) as cache:
        verify_path(ckpt, [key.public()], full=False, digest_cache=cache)
    target = ckpt / "model.safetensors"
    _rewrite_same_size_keep_mtime(target)
    st = target.stat()
    forged = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    with sqlite3.connect(home / CACHE_NAME) as db:
        changed = db.execute(
            "UPDATE digests SET stat = ? WHERE path = ?", (forged, os.fsencode(os.path.realpath(target)))
        ).rowcount
    db.close()
    assert changed == 1
    with _cache(home) as cache:
        with pytest.raises(TreeChanged, match=r"modified: model\.safetensors"):
            verify_path(ckpt, [key.public()], full=False, digest_cache=cache)
        assert cache.rejected == 1
