"""A safe walk of a checkpoint file or directory: what gets hashed, and what is refused.

The walk holds an open descriptor for every directory on its way down and opens each subdirectory
relative to it with O_NOFOLLOW, so a directory swapped for a symlink mid-walk is never entered.
Symlinks are recorded, never followed: one whose target (resolved with realpath) lies outside the tree,
is missing, loops, or points at one of its own ancestors is refused. FIFOs, sockets and devices are
refused from their lstat, without being opened. Names must be UTF-8 without control characters; they
are recorded in NFC, and two names that are equal in NFC are refused. The signature file is excluded.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import unicodedata
from collections.abc import Collection
from pathlib import Path

from trainguard.errors import ExitCode, UsageError, VerificationFailed

__all__ = [
    "MAX_DEPTH",
    "SIGNATURE_NAME",
    "Tree",
    "TreeFile",
    "TreeLink",
    "UnsafeTree",
    "path_problem",
    "signature_path",
    "walk",
]

SIGNATURE_NAME = ".trainguard.sig"
# Deeper trees are not checkpoints; the limit also bounds the directory descriptors held open.
MAX_DEPTH = 128
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeTree(VerificationFailed):
    """A tree that cannot be signed or verified safely; the message names the path and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}", hint=hint)
        self.path = os.fspath(path)
        self.problem = problem


class UnreadableTree(UnsafeTree):
    """A file or folder of the tree could not be read: nothing is known about it, so exit 3, not 1."""

    exit_code = ExitCode.UNDECIDED


def signature_path(path: Path) -> Path:
    """Where the signature of `path` lives: inside a directory, next to a file."""
    path = Path(path)
    if path.is_dir():
        return path / SIGNATURE_NAME
    return path.with_name(path.name + SIGNATURE_NAME)


def name_problem(name: str) -> str | None:
    """Why a single path component cannot be in a manifest, or None."""
    if not name:
        return "empty name"
    if name in (".", ".."):
        return f"name {name!r} is not allowed"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # os.listdir hands undecodable bytes back as lone surrogates (PEP 383).
        return f"name {os.fsencode(name)!r} is not valid UTF-8"
    if "/" in name or "\\" in name:
        return f"name {name!r} contains a path separator"
    if any(ch < " " or ch == "\x7f" for ch in name):
        return f"name {name!r} contains a control character"
    return None


def path_problem(path: str) -> str | None:
    """Why a relative manifest path is unsafe (absolute, "..", not NFC, ...), or None if it is fine."""
    if not path:
        return "empty path"
    if path.startswith("/"):
        return f"absolute path {path!r}"
    for part in path.split("/"):
        problem = name_problem(part)
        if problem:
            return f"path {path!r}: {problem}"
    if unicodedata.normalize("NFC", path) != path:
        return f"path {path!r} is not in Unicode NFC"
    return None


@dataclasses.dataclass(frozen=True)
class TreeFile:
    """A regular file to hash: its manifest path, its path on disk and its lstat at walk time."""

    path: str
    location: str
    st: os.stat_result


@dataclasses.dataclass(frozen=True)
class TreeLink:
    """An in-tree symlink: its manifest path and its resolved target, relative to the tree root."""

    path: str
    target: str


@dataclasses.dataclass(frozen=True)
class Tree:
    """What a walk found: `kind` is "file" or "directory"; files and links are sorted by path."""

    kind: str
    root: Path
    name: str
    files: tuple[TreeFile, ...]
    links: tuple[TreeLink, ...]


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return f"a special file (mode {mode:o})"


def _nfc_name(name: str, where: str) -> str:
    problem = name_problem(name)
    if problem:
        raise UnsafeTree(where, problem)
    return unicodedata.normalize("NFC", name)


def _excluded_key(path: Path) -> str:
    path = Path(path).absolute()
    return os.path.join(os.path.realpath(path.parent), path.name)  # noqa: PTH118 - compared as strings


def walk(path: Path, *, exclude: Collection[Path] = ()) -> Tree:
    """Walk `path` (a file or a directory) safely; UnsafeTree for anything that cannot be signed.

    `exclude` lists files to leave out (signature files); `path`/.trainguard.sig always is. A symlink
    given as `path` itself is followed once: the user named it.
    """
    path = Path(path)
    try:
        real = os.path.realpath(path, strict=True)
        st = os.lstat(real)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeTree(path, "symlink cycle") from None
        raise UnreadableTree(path, f"cannot read: {exc.strerror}") from None
    name = path.name or Path(real).name
    if stat.S_ISREG(st.st_mode):
        nfc = _nfc_name(name, str(path))
        return Tree("file", Path(real), nfc, (TreeFile(nfc, real, st),), ())
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeTree(path, f"is {_special_kind(st.st_mode)}, not a file or directory")
    excluded = {_excluded_key(Path(real) / SIGNATURE_NAME)} | {_excluded_key(p) for p in exclude}
    walker = _Walker(real, str(path), excluded)
    try:
        fd = os.open(real, _DIR_FLAGS)
    except OSError as exc:
        raise UnreadableTree(path, f"cannot open directory: {exc.strerror}") from None
    try:
        walker.visit(fd, os.fstat(fd), "", real, 0)
    finally:
        os.close(fd)
    if not walker.files:
        raise UnsafeTree(
            path, "no regular files to sign (empty model)", hint="check that this is the checkpoint directory"
        )
    files = tuple(sorted(walker.files, key=lambda f: f.path))
    links = tuple(sorted(walker.links, key=lambda link: link.path))
    return Tree("directory", Path(real), _nfc_name(name, str(path)), files, links)


class _Walker:
    def __init__(self, root: str, shown: str, excluded: set[str]) -> None:
        self.root = root
        self.shown = shown  # the root as the user wrote it, for messages
        self.excluded = excluded
        self.files: list[TreeFile] = []
        self.links: list[TreeLink] = []
        self.seen_dirs: set[tuple[int, int]] = set()

    def where(self, rel: str) -> str:
        return os.path.join(self.shown, rel) if rel else self.shown  # noqa: PTH118

    def visit(self, dir_fd: int, dir_st: os.stat_result, rel_dir: str, real_dir: str, depth: int) -> None:
        ident = (dir_st.st_dev, dir_st.st_ino)
        if ident in self.seen_dirs:
            # Only bind mounts can do this: symlinks are never entered.
            raise UnsafeTree(self.where(rel_dir), "directory cycle (the same directory twice)")
        self.seen_dirs.add(ident)
        if depth > MAX_DEPTH:
            raise UnsafeTree(self.where(rel_dir), f"more than {MAX_DEPTH} directory levels")
        try:
            with os.scandir(dir_fd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise UnreadableTree(self.where(rel_dir), f"cannot list directory: {exc.strerror}") from None
        seen_names: dict[str, str] = {}
        for entry in entries:
            raw_rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            nfc = _nfc_name(entry.name, self.where(raw_rel))
            if nfc in seen_names:
                raise UnsafeTree(
                    self.where(raw_rel), f"name equals {seen_names[nfc]!r} in Unicode NFC (ambiguous)"
                )
            seen_names[nfc] = entry.name
            rel = f"{rel_dir}/{nfc}" if rel_dir else nfc
            # Plain strings: realpath results are compared as strings, and this runs per file.
            location = os.path.join(real_dir, entry.name)  # noqa: PTH118
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise UnreadableTree(self.where(raw_rel), f"cannot stat: {exc.strerror}") from None
            mode = st.st_mode
            if stat.S_ISREG(mode):
                if location not in self.excluded:
                    self.files.append(TreeFile(rel, location, st))
            elif stat.S_ISLNK(mode):
                self.links.append(self.link(rel, raw_rel, location))
            elif stat.S_ISDIR(mode):
                self.subdir(dir_fd, entry.name, st, rel, location, depth)
            else:
                raise UnsafeTree(self.where(raw_rel), f"is {_special_kind(mode)}; refusing special files")

    def subdir(self, dir_fd: int, name: str, st: os.stat_result, rel: str, location: str, depth: int) -> None:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeTree(self.where(rel), "was replaced while being walked") from None
            raise UnreadableTree(self.where(rel), f"cannot open directory: {exc.strerror}") from None
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                raise UnsafeTree(self.where(rel), "was replaced while being walked")
            self.visit(fd, opened, rel, location, depth + 1)
        finally:
            os.close(fd)

    def link(self, rel: str, raw_rel: str, location: str) -> TreeLink:
        where = self.where(raw_rel)
        try:
            target = os.path.realpath(location, strict=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeTree(where, "symlink cycle") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                shown = str(Path(location).readlink())
                raise UnsafeTree(where, f"symlink to a missing target ({shown!r})") from None
            raise UnreadableTree(where, f"cannot resolve symlink: {exc.strerror}") from None
        if target != self.root and not target.startswith(self.root + os.sep):
            raise UnsafeTree(
                where,
                f"symlink leaves the tree (to {target})",
                hint="copy the file into the checkpoint instead of linking to it",
            )
        if target == self.root:
            raise UnsafeTree(where, "symlink cycle (it points at the tree root)")
        if target in self.excluded:
            raise UnsafeTree(where, "symlink to the signature file")
        target_rel = unicodedata.normalize("NFC", os.path.relpath(target, self.root).replace(os.sep, "/"))
        problem = path_problem(target_rel)
        if problem:
            raise UnsafeTree(where, f"symlink target is unsafe: {problem}")
        if rel.startswith(target_rel + "/"):
            raise UnsafeTree(where, f"symlink cycle (it points at its own parent directory {target_rel!r})")
        return TreeLink(rel, target_rel)
