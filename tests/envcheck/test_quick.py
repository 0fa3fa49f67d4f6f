"""The quick-mode cache: used only when authentic and made for this environment and baseline."""

from __future__ import annotations

from pathlib import Path

from trainguard.envcheck._quick import QuickCache

KEY = (1, 2, 3, 4, 5)
DIGEST = "ab" * 32


def _fresh(home: Path, baseline: str | None = "sha256:x") -> QuickCache:
    return QuickCache(home, "/env", baseline)


def test_rows_round_trip_and_racy_files_are_left_out(tmp_path: Path) -> None:
    cache = _fresh(tmp_path)
    racy = (1, 3, 3, 4, cache._started_ns)  # changed just now: could change again within the tick
    cache.save({"env/a.py": (KEY, DIGEST), "env/b.py": (racy, DIGEST), "env/ü\udcff.py": (KEY, "00" * 32)})
    again = _fresh(tmp_path)
    assert not again.rejected
    assert set(again.entries) == {"env/a.py", "env/ü\udcff.py"}
    assert again.entries["env/a.py"] == (*KEY, bytes.fromhex(DIGEST))


def test_an_edited_cache_is_rejected(tmp_path: Path) -> None:
    cache = _fresh(tmp_path)
    cache.save({"env/a.py": (KEY, DIGEST)})
    data = bytearray(cache.path.read_bytes())
    data[-1] ^= 1  # one bit of the digest: the HMAC no longer matches
    cache.path.write_bytes(bytes(data))
    again = _fresh(tmp_path)
    assert again.rejected and again.entries == {}


def test_a_cache_for_another_baseline_or_environment_is_not_used(tmp_path: Path) -> None:
    _fresh(tmp_path, "sha256:x").save({"env/a.py": (KEY, DIGEST)})
    assert _fresh(tmp_path, "sha256:y").entries == {}
    assert QuickCache(tmp_path, "/other", "sha256:x").entries == {}
    assert _fresh(tmp_path, "sha256:x").entries  # still there for its own


def test_a_cache_copied_from_another_home_is_rejected(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    cache = _fresh(first)
    cache.save({"env/a.py": (KEY, DIGEST)})
    copy = _fresh(second).path
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(cache.path.read_bytes())  # another secret signed it
    assert _fresh(second).rejected
    assert (second / "keys" / "cache.key").stat().st_mode & 0o077 == 0
