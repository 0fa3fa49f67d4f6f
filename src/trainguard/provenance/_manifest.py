"""The manifest of a checkpoint: every file's path, size, mode and SHA-256, its in-tree symlinks, and a root.

The root is ``"sha256:" + SHA-256`` of the manifest's RFC 8785 canonical JSON, so it changes whenever a
name, size, mode, digest, shard digest or link does; signing the canonical bytes signs all of them.
Manifests read back from signature files come through `Manifest.from_json`, which accepts exactly the
documents `to_json` writes: sorted unique safe paths, lowercase hex digests, the shard count the shard
size implies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import rfc8785

from trainguard.errors import UsageError, VerificationFailed
from trainguard.provenance._hashing import FileDigests, hash_files, shard_count
from trainguard.provenance._tree import Tree, TreeFile, path_problem, walk

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "DigestCache",
    "FileEntry",
    "LinkEntry",
    "Manifest",
    "TreeDiff",
    "build_manifest",
    "diff_manifests",
]

DEFAULT_SHARD_SIZE = 1 << 30
MANIFEST_VERSION = 1
_MAX_SIZE = (1 << 53) - 1  # RFC 8785 numbers are IEEE doubles; larger integers do not round-trip
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KINDS = ("file", "directory")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One regular file: relative POSIX path (NFC), size, permission bits, SHA-256 and shard SHA-256s."""

    path: str
    size: int
    mode: int
    digest: str
    shards: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "mode": self.mode,
            "digest": self.digest,
            "shards": list(self.shards),
        }


@dataclasses.dataclass(frozen=True)
class LinkEntry:
    """An in-tree symlink: its path and the path it resolves to, both relative to the tree root."""

    path: str
    target: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "target": self.target}


class DigestCache(Protocol):
    """Digests remembered from earlier hashing, keyed on what stat says about the file."""

    def get(self, path: Path, st: os.stat_result) -> FileEntry | None: ...

    def put(self, path: Path, st: os.stat_result, entry: FileEntry) -> None: ...


def _bad(what: str) -> VerificationFailed:
    return VerificationFailed(f"malformed manifest: {what}")


def _take(obj: Any, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    if type(obj) is not dict:
        raise _bad(f"{what} is not an object")
    if set(obj) != set(keys):
        extra = sorted(set(obj) - set(keys))
        missing = sorted(set(keys) - set(obj))
        raise _bad(f"{what} has unexpected keys {extra} / lacks keys {missing}")
    return obj


def _int(value: Any, what: str, low: int = 0) -> int:
    if type(value) is not int or not low <= value <= _MAX_SIZE:
        raise _bad(f"{what} is not an integer in [{low}, 2**53)")
    return value


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise _bad(f"{what} is not a string")
    return value


def _hex(value: Any, what: str) -> str:
    if type(value) is not str or not _HEX64.fullmatch(value):
        raise _bad(f"{what} is not 64 lowercase hex digits")
    return value


def _safe_path(value: Any, what: str) -> str:
    path = _str(value, what)
    problem = path_problem(path)
    if problem:
        raise _bad(f"{what}: {problem}")
    return path


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What was signed: the kind and name of PATH, the shard size, and its files and links, by path."""

    kind: str
    name: str
    shard_size: int
    files: tuple[FileEntry, ...]
    links: tuple[LinkEntry, ...] = ()
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "name": self.name,
            "shard_size": self.shard_size,
            "files": [entry.to_json() for entry in self.files],
            "links": [link.to_json() for link in self.links],
        }

    def canonical(self) -> bytes:
        """The RFC 8785 bytes of `to_json()`: what is signed and what the root is computed over."""
        return rfc8785.dumps(self.to_json())

    @property
    def root(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        """The manifest `obj` describes; VerificationFailed for anything `to_json` would not write."""
        doc = _take(obj, ("version", "kind", "name", "shard_size", "files", "links"), "manifest")
        if type(doc["version"]) is not int or doc["version"] != MANIFEST_VERSION:
            raise _bad(f"unsupported version {doc['version']!r} (expected {MANIFEST_VERSION})")
        kind = _str(doc["kind"], "kind")
        if kind not in _KINDS:
            raise _bad(f"kind {kind!r} is not one of {list(_KINDS)}")
        name = _safe_path(doc["name"], "name")
        if "/" in name:
            raise _bad(f"name {name!r} is not a single path component")
        shard_size = _int(doc["shard_size"], "shard_size", 1)
        raw_files, raw_links = doc["files"], doc["links"]
        if type(raw_files) is not list or type(raw_links) is not list:
            raise _bad("files and links must be arrays")
        files = tuple(_file_entry(item, i, shard_size) for i, item in enumerate(raw_files))
        links = tuple(_link_entry(item, i) for i, item in enumerate(raw_links))
        if not files:
            raise _bad("no files")
        _check_sorted([entry.path for entry in files], "files")
        _check_sorted([link.path for link in links], "links")
        _check_layout(files, links)
        if kind == "file" and (len(files) != 1 or links or files[0].path != name):
            raise _bad("a file manifest holds exactly one file, named as the manifest")
        return cls(kind, name, shard_size, files, links)


def _file_entry(item: Any, index: int, shard_size: int) -> FileEntry:
    what = f"files[{index}]"
    doc = _take(item, ("path", "size", "mode", "digest", "shards"), what)
    path = _safe_path(doc["path"], f"{what}.path")
    size = _int(doc["size"], f"{what}.size")
    mode = _int(doc["mode"], f"{what}.mode")
    if mode > 0o7777:
        raise _bad(f"{what}.mode {mode:o} has bits beyond 0o7777")
    digest = _hex(doc["digest"], f"{what}.digest")
    raw_shards = doc["shards"]
    if type(raw_shards) is not list:
        raise _bad(f"{what}.shards is not an array")
    shards = tuple(_hex(s, f"{what}.shards[{k}]") for k, s in enumerate(raw_shards))
    if len(shards) != shard_count(size, shard_size):
        raise _bad(f"{what} has {len(shards)} shards, expected {shard_count(size, shard_size)}")
    return FileEntry(path, size, mode, digest, shards)


def _link_entry(item: Any, index: int) -> LinkEntry:
    what = f"links[{index}]"
    doc = _take(item, ("path", "target"), what)
    path = _safe_path(doc["path"], f"{what}.path")
    target = _safe_path(doc["target"], f"{what}.target")
    if path == target or path.startswith(target + "/"):
        raise _bad(f"{what}: symlink {path!r} points at itself or its own parent")
    return LinkEntry(path, target)


def _check_sorted(paths: list[str], what: str) -> None:
    for before, after in itertools.pairwise(paths):
        if not before < after:
            raise _bad(f"{what} are not sorted by path with no duplicates ({before!r}, {after!r})")


def _check_layout(files: tuple[FileEntry, ...], links: tuple[LinkEntry, ...]) -> None:
    """No path is both a file and a link, and no file or link lies under another file or link."""
    leaves = {entry.path for entry in files}
    for link in links:
        if link.path in leaves:
            raise _bad(f"{link.path!r} is both a file and a symlink")
        leaves.add(link.path)
    for path in leaves:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in leaves:
                raise _bad(f"{path!r} lies under the file or symlink {'/'.join(parts[:i])!r}")


def build_manifest(
    path: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    digest_cache: DigestCache | None = None,
    exclude: tuple[Path, ...] = (),
    refresh_cache: bool = False,
) -> Manifest:
    """Walk `path` safely and hash every file (see `walk` and `hash_files`).

    With a `digest_cache`, a file whose stat the cache recognises is not read again; `refresh_cache`
    hashes every file anyway and stores the fresh digests. `exclude` names signature files to leave out.
    """
    if type(shard_size) is not int or not 0 < shard_size <= _MAX_SIZE:
        raise UsageError(f"shard size {shard_size!r} must be a positive integer")
    if workers is not None and workers < 1:
        raise UsageError(f"workers {workers!r} must be at least 1")
    tree = walk(Path(path), exclude=exclude)
    return manifest_of_tree(
        tree,
        shard_size=shard_size,
        workers=workers,
        progress=progress,
        digest_cache=digest_cache,
        refresh_cache=refresh_cache,
    )


def manifest_of_tree(
    tree: Tree,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    digest_cache: DigestCache | None = None,
    refresh_cache: bool = False,
) -> Manifest:
    """Hash the files of a walked tree into a manifest."""
    entries: dict[str, FileEntry] = {}
    todo: list[TreeFile] = []
    for item in tree.files:
        cached = None
        if digest_cache is not None and not refresh_cache:
            cached = digest_cache.get(Path(item.location), item.st)
        if cached is not None and _usable(cached, item, shard_size):
            entries[item.path] = dataclasses.replace(cached, path=item.path, mode=item.st.st_mode & 0o7777)
        else:
            todo.append(item)
    shown = str(tree.root)

    def where(item: TreeFile) -> str:
        return item.path if tree.kind == "file" else os.path.join(shown, item.path)  # noqa: PTH118

    done = sum(entry.size for entry in entries.values())
    total = done + sum(item.st.st_size for item in todo)

    def report(hashed: int, _total: int) -> None:
        if progress is not None:
            progress(done + hashed, total)

    if progress is not None and done:
        progress(done, total)
    digests: list[FileDigests] = hash_files(
        todo, shard_size=shard_size, workers=workers, progress=report if progress else None, where=where
    )
    for item, found in zip(todo, digests, strict=True):
        entry = FileEntry(item.path, item.st.st_size, item.st.st_mode & 0o7777, found.digest, found.shards)
        entries[item.path] = entry
        if digest_cache is not None:
            digest_cache.put(Path(item.location), item.st, entry)
    files = tuple(entries[item.path] for item in tree.files)
    links = tuple(LinkEntry(link.path, link.target) for link in tree.links)
    return Manifest(tree.kind, tree.name, shard_size, files, links)


def _usable(entry: FileEntry, item: TreeFile, shard_size: int) -> bool:
    """A cached entry is used only if it matches the file's size and this shard size."""
    return (
        entry.size == item.st.st_size
        and len(entry.shards) == shard_count(entry.size, shard_size)
        and bool(_HEX64.fullmatch(entry.digest))
    )


@dataclasses.dataclass(frozen=True)
class TreeDiff:
    """How the files on disk differ from the signed manifest, by path; every tuple is sorted."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    modified: tuple[str, ...] = ()
    mode_changed: tuple[str, ...] = ()
    links_changed: tuple[str, ...] = ()
    # (signed, on disk) when a directory is checked under another name than the one it was signed as.
    name_changed: tuple[str, str] | None = None
    details: dict[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return not (
            self.name_changed
            or self.added
            or self.removed
            or self.renamed
            or self.modified
            or self.mode_changed
            or self.links_changed
        )

    def describe(self) -> list[str]:
        """One line per difference, naming the file."""
        lines: list[str] = []
        if self.name_changed:
            signed, found = self.name_changed
            lines.append(
                f"directory name: signed as {signed!r}, checked as {found!r} (a copy or a swap of another "
                "signed directory)"
            )
        lines += [f"added: {path}" for path in self.added]
        lines += [f"removed: {path}" for path in self.removed]
        lines += [f"renamed: {old} -> {new}" for old, new in self.renamed]
        lines += [f"modified: {path}{self._detail('modified', path)}" for path in self.modified]
        lines += [f"mode changed: {path}{self._detail('mode', path)}" for path in self.mode_changed]
        lines += [f"symlink changed: {path}{self._detail('link', path)}" for path in self.links_changed]
        return lines

    def _detail(self, kind: str, path: str) -> str:
        text = self.details.get(f"{kind}:{path}")
        return f" ({text})" if text else ""

    @property
    def count(self) -> int:
        return len(self.describe())


def _modified_detail(old: FileEntry, new: FileEntry) -> str:
    if old.size != new.size:
        return f"size {old.size} -> {new.size}"
    if old.shards and len(old.shards) == len(new.shards):
        changed = [str(k) for k, (a, b) in enumerate(zip(old.shards, new.shards, strict=True)) if a != b]
        if changed:
            return f"shard {', '.join(changed)} of {len(old.shards)} differs"
    return "content differs"


def diff_manifests(signed: Manifest, actual: Manifest) -> TreeDiff:
    """Compare what was signed with what is on disk; renamed = removed and added with the same content.

    A directory's own name is compared too: its files alone cannot tell step2000/ from a copy of a
    signed step1000/ put in its place. (A file's name is its one entry's path, compared already.)
    """
    old = {entry.path: entry for entry in signed.files}
    new = {entry.path: entry for entry in actual.files}
    details: dict[str, str] = {}
    modified: list[str] = []
    mode_changed: list[str] = []
    for path in sorted(old.keys() & new.keys()):
        a, b = old[path], new[path]
        if (a.size, a.digest, a.shards) != (b.size, b.digest, b.shards):
            modified.append(path)
            details[f"modified:{path}"] = _modified_detail(a, b)
        if a.mode != b.mode:
            mode_changed.append(path)
            details[f"mode:{path}"] = f"{a.mode:04o} -> {b.mode:04o}"
    removed = sorted(old.keys() - new.keys())
    added = sorted(new.keys() - old.keys())
    # Pair removed and added files with the same content, in path order, as renames.
    by_content: dict[tuple[int, str], list[str]] = {}
    for path in added:
        by_content.setdefault((new[path].size, new[path].digest), []).append(path)
    renamed: list[tuple[str, str]] = []
    for path in list(removed):
        candidates = by_content.get((old[path].size, old[path].digest))
        if candidates:
            target = candidates.pop(0)
            renamed.append((path, target))
            removed.remove(path)
            added.remove(target)
    old_links = {link.path: link.target for link in signed.links}
    new_links = {link.path: link.target for link in actual.links}
    links_changed = sorted(
        path for path in old_links.keys() | new_links.keys() if old_links.get(path) != new_links.get(path)
    )
    for path in links_changed:
        before, after = old_links.get(path), new_links.get(path)
        if before is None:
            details[f"link:{path}"] = f"added, -> {after}"
        elif after is None:
            details[f"link:{path}"] = f"removed, was -> {before}"
        else:
            details[f"link:{path}"] = f"-> {before} is now -> {after}"
    renamed_dir = signed.kind == "directory" and signed.name != actual.name
    return TreeDiff(
        name_changed=(signed.name, actual.name) if renamed_dir else None,
        added=tuple(added),
        removed=tuple(removed),
        renamed=tuple(sorted(renamed)),
        modified=tuple(modified),
        mode_changed=tuple(mode_changed),
        links_changed=tuple(links_changed),
        details=details,
    )
