"""Manifests: digests match sha256 of the bytes, canonical JSON, the root, strict parsing, diffs."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.errors import UsageError, VerificationFailed
from trainguard.provenance import (
    FileEntry,
    LinkEntry,
    Manifest,
    UnsafeTree,
    build_manifest,
    diff_manifests,
)

MIB = 1 << 20


class MemoryCache:
    """A DigestCache in a dict, keyed like the real one on what stat says."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int, int, int, int, int], FileEntry] = {}
        self.hits = 0

    @staticmethod
    def _key(path: Path, st: os.stat_result) -> tuple[str, int, int, int, int, int]:
        return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def get(self, path: Path, st: os.stat_result) -> FileEntry | None:
        entry = self.rows.get(self._key(path, st))
        self.hits += entry is not None
        return entry

    def put(self, path: Path, st: os.stat_result, entry: FileEntry) -> None:
        self.rows[self._key(path, st)] = entry


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model(root: Path) -> tuple[Path, bytes]:
    model = root / "m"
    (model / "a" / "b").mkdir(parents=True)
    big = os.urandom(3 * MIB + 12345)
    (model / "big.bin").write_bytes(big)
    (model / "a" / "small.txt").write_bytes(b"hello")
    (model / "a" / "b" / "empty").write_bytes(b"")
    return model, big


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_digests_and_shards_are_sha256_of_the_bytes(tmp_path: Path, workers: int) -> None:
    model, big = _model(tmp_path)
    manifest = build_manifest(model, shard_size=MIB, workers=workers)
    entries = {e.path: e for e in manifest.files}
    assert list(entries) == ["a/b/empty", "a/small.txt", "big.bin"]
    assert entries["big.bin"].digest == _sha(big)
    assert entries["big.bin"].shards == tuple(_sha(big[i : i + MIB]) for i in range(0, len(big), MIB))
    assert len(entries["big.bin"].shards) == 4
    assert entries["a/small.txt"] == FileEntry("a/small.txt", 5, 0o644 & ~_umask(), _sha(b"hello"))
    assert entries["a/b/empty"].digest == _sha(b"")
    assert manifest.kind == "directory" and manifest.name == "m" and manifest.shard_size == MIB


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_file_exactly_one_shard_long_is_not_sharded(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * MIB)
    (entry,) = build_manifest(path, shard_size=MIB).files
    assert entry.shards == ()
    path.write_bytes(b"x" * (MIB + 1))
    (entry,) = build_manifest(path, shard_size=MIB).files
    assert len(entry.shards) == 2


def test_progress_reaches_the_total(tmp_path: Path) -> None:
    model, _ = _model(tmp_path)
    seen: list[tuple[int, int]] = []
    manifest = build_manifest(model, shard_size=MIB, workers=2, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (manifest.total_bytes, manifest.total_bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_digest_cache_skips_unchanged_files_and_notices_changes(tmp_path: Path) -> None:
    model, _ = _model(tmp_path)
    cache = MemoryCache()
    first = build_manifest(model, shard_size=MIB, digest_cache=cache)
    assert cache.hits == 0 and len(cache.rows) == 3
    again = build_manifest(model, shard_size=MIB, digest_cache=cache)
    assert again == first and cache.hits == 3
    (model / "a" / "small.txt").write_bytes(b"HELLO")
    changed = build_manifest(model, shard_size=MIB, digest_cache=cache)
    assert diff_manifests(first, changed).modified == ("a/small.txt",)
    # Another shard size cannot reuse the cached shard digests.
    other = build_manifest(model, shard_size=2 * MIB, digest_cache=cache)
    assert len({e.path: e for e in other.files}["big.bin"].shards) == 2


def test_bad_arguments(tmp_path: Path) -> None:
    model, _ = _model(tmp_path)
    with pytest.raises(UsageError):
        build_manifest(model, shard_size=0)
    with pytest.raises(UsageError):
        build_manifest(model, workers=0)


def test_canonical_json_and_root(tmp_path: Path) -> None:
    model, _ = _model(tmp_path)
    (model / "link").symlink_to("a/small.txt")
    manifest = build_manifest(model, shard_size=MIB)
    assert manifest.canonical() == rfc8785.dumps(manifest.to_json())
    assert manifest.root == "sha256:" + _sha(manifest.canonical())
    assert manifest.links == (LinkEntry("link", "a/small.txt"),)
    assert Manifest.from_json(manifest.to_json()) == manifest


def _doc(tmp_path: Path) -> dict[str, Any]:
    model, _ = _model(tmp_path)
    return build_manifest(model, shard_size=MIB).to_json()


def _break(doc: dict[str, Any], change: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    files = doc["files"]
    if change == "extra key":
        doc["extra"] = 1
    elif change == "missing key":
        del doc["links"]
    elif change == "version":
        doc["version"] = 2
    elif change == "kind":
        doc["kind"] = "tarball"
    elif change == "bool size":
        files[0]["size"] = True
    elif change == "float size":
        files[0]["size"] = 1.0
    elif change == "negative size":
        files[0]["size"] = -1
    elif change == "uppercase digest":
        files[0]["digest"] = files[0]["digest"].upper()
    elif change == "short digest":
        files[0]["digest"] = "00"
    elif change == "unsorted":
        files.reverse()
    elif change == "duplicate":
        files.append(copy.deepcopy(files[-1]))
    elif change == "dotdot":
        files[0]["path"] = "../escape"
    elif change == "absolute":
        files[0]["path"] = "/etc/passwd"
    elif change == "missing shard":
        files[-1]["shards"].pop()
    elif change == "shards on small file":
        files[0]["shards"] = [files[0]["digest"]]
    elif change == "mode bits":
        files[0]["mode"] = 0o100644
    elif change == "file under file":
        files.insert(2, dict(files[1], path="a/small.txt/x"))
    elif change == "link onto file":
        doc["links"] = [{"path": "big.bin", "target": "a/small.txt"}]
    elif change == "link to parent":
        doc["links"] = [{"path": "a/loop", "target": "a"}]
    elif change == "no files":
        doc["files"] = []
    elif change == "zero shard size":
        doc["shard_size"] = 0
    elif change == "files not a list":
        doc["files"] = {}
    elif change == "name with slash":
        doc["name"] = "a/b"
    return doc


CHANGES = [
    "extra key",
    "missing key",
    "version",
    "kind",
    "bool size",
    "float size",
    "negative size",
    "uppercase digest",
    "short digest",
    "unsorted",
    "duplicate",
    "dotdot",
    "absolute",
    "missing shard",
    "shards on small file",
    "mode bits",
    "file under file",
    "link onto file",
    "link to parent",
    "no files",
    "zero shard size",
    "files not a list",
    "name with slash",
]


@pytest.mark.parametrize("change", CHANGES)
def test_from_json_is_strict(tmp_path: Path, change: str) -> None:
    doc = _break(_doc(tmp_path), change)
    with pytest.raises(VerificationFailed, match="malformed manifest"):
        Manifest.from_json(doc)


def test_from_json_of_non_objects() -> None:
    junk: object
    for junk in [None, [], "x", 1]:
        with pytest.raises(VerificationFailed):
            Manifest.from_json(junk)


def test_unsafe_tree_is_a_verification_failure() -> None:
    assert issubclass(UnsafeTree, VerificationFailed)


def _entry(path: str, data: bytes, mode: int = 0o644) -> FileEntry:
    return FileEntry(path, len(data), mode, _sha(data))


def test_diff_names_every_kind_of_change() -> None:
    signed = Manifest(
        "directory",
        "m",
        MIB,
        (
            _entry("a", b"a"),
            _entry("b", b"b"),
            _entry("c", b"c"),
            _entry("d", b"d"),
            _entry("e", b"e"),
        ),
        (LinkEntry("l1", "a"), LinkEntry("l2", "b")),
    )
    actual = Manifest(
        "directory",
        "m",
        MIB,
        (
            _entry("a", b"a"),
            _entry("b", b"B"),
            _entry("c", b"c", 0o755),
            _entry("e2", b"e"),
            _entry("f", b"f"),
        ),
        (LinkEntry("l1", "b"), LinkEntry("l3", "a")),
    )
    diff = diff_manifests(signed, actual)
    assert not diff.ok
    assert diff.added == ("f",)
    assert diff.removed == ("d",)
    assert diff.renamed == (("e", "e2"),)
    assert diff.modified == ("b",)
    assert diff.mode_changed == ("c",)
    assert diff.links_changed == ("l1", "l2", "l3")
    lines = diff.describe()
    assert lines == [
        "added: f",
        "removed: d",
        "renamed: e -> e2",
        "modified: b (content differs)",
        "mode changed: c (0644 -> 0755)",
        "symlink changed: l1 (-> a is now -> b)",
        "symlink changed: l2 (removed, was -> b)",
        "symlink changed: l3 (added, -> a)",
    ]
    assert diff_manifests(signed, signed).ok
    assert diff_manifests(signed, signed).describe() == []


def test_diff_names_the_changed_shard() -> None:
    a = FileEntry("w", 3 * MIB, 0o644, "0" * 64, ("1" * 64, "2" * 64, "3" * 64))
    b = dataclasses.replace(a, digest="f" * 64, shards=("1" * 64, "e" * 64, "3" * 64))
    diff = diff_manifests(Manifest("directory", "m", MIB, (a,)), Manifest("directory", "m", MIB, (b,)))
    assert diff.describe() == ["modified: w (shard 1 of 3 differs)"]


_names = st.text(alphabet="abcxyz._-0", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
_entries = st.builds(
    FileEntry,
    path=_names,
    size=st.integers(0, 1 << 40),
    mode=st.integers(0, 0o7777),
    digest=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)


@settings(max_examples=60, deadline=None)
@given(
    entries=st.lists(_entries, min_size=1, max_size=5, unique_by=lambda e: e.path),
    which=st.integers(0, 4),
    field=st.sampled_from(["path", "size", "mode", "digest"]),
    data=st.data(),
)
def test_root_changes_whenever_a_name_size_mode_or_digest_changes(
    entries: list[FileEntry], which: int, field: str, data: st.DataObject
) -> None:
    files = tuple(sorted(entries, key=lambda e: e.path))
    manifest = Manifest("directory", "m", 1 << 50, files)
    index = which % len(files)
    old = files[index]
    if field == "path":
        new_value: Any = data.draw(_names.filter(lambda n: n not in {e.path for e in files}))
    elif field == "size":
        new_value = data.draw(st.integers(0, 1 << 40).filter(lambda v: v != old.size))
    elif field == "mode":
        new_value = data.draw(st.integers(0, 0o7777).filter(lambda v: v != old.mode))
    else:
        new_value = data.draw(
            st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).filter(lambda v: v != old.digest)
        )
    changed = list(files)
    changed[index] = dataclasses.replace(old, **{field: new_value})
    other = Manifest("directory", "m", 1 << 50, tuple(sorted(changed, key=lambda e: e.path)))
    assert other.root != manifest.root
    assert not diff_manifests(manifest, other).ok
