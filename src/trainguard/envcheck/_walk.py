"""What an environment is made of on disk: its roots, and every file and link under them, with stat.

An environment is named by roots, each a label and a directory or file: `env` (the venv, or the
install's lib/pythonX.Y), `stdlib` (the base interpreter's standard library, when it lies outside the
environment), `python` (the interpreter binary the environment runs) and `libpython`. Paths are
recorded as `label/relative/path`, so two copies of one environment at the same place on two hosts
list the same paths. The walk never follows a symlink: a link is recorded with its target, and a
directory reached through a link is not walked (a venv's `lib64 -> lib` is one link, not a second tree).
"""

from __future__ import annotations

import dataclasses
import os
import stat

from trainguard.envcheck._layout import Layout

__all__ = [
    "Entry",
    "Root",
    "StatKey",
    "entry_of",
    "environment_roots",
    "inventory",
    "is_cached_bytecode",
    "stat_key",
]

StatKey = tuple[int, int, int, int, int]  # dev, inode, size, mtime_ns, ctime_ns


def stat_key(st: os.stat_result) -> StatKey:
    """What must stay the same for a file to be taken as unchanged (the ctime moves on any write)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclasses.dataclass(frozen=True)
class Root:
    label: str
    path: str
    skip: tuple[str, ...] = ()  # absolute directories under `path` that belong to another root or none


@dataclasses.dataclass(slots=True)  # not frozen: tens of thousands are made per check, and frozen is slower
class Entry:
    """A file ('file'), symlink ('link') or anything else ('other': fifo, socket, device) in a root."""

    path: str  # label/relative
    location: str  # absolute
    kind: str
    size: int
    key: StatKey
    executable: bool
    uid: int
    target: str | None = None  # a link's target, as stored


def is_cached_bytecode(path: str) -> bool:
    """A PEP 3147 cache file: rewritten by Python itself, judged against its source, never by digest."""
    return path.endswith(".pyc") and "/__pycache__/" in path


def environment_roots(layout: Layout) -> list[Root]:
    """The roots that make up `layout`'s environment."""
    roots: list[Root] = []
    if layout.is_venv:
        roots.append(Root("env", layout.prefix))
    else:
        # An install prefix such as /usr holds far more than Python: take its lib/pythonX.Y only.
        roots.append(Root("env", layout.stdlib))
    stdlib_inside = _inside(layout.stdlib, layout.prefix) if layout.is_venv else True
    if not stdlib_inside:
        skip = tuple(d for d in (os.path.join(layout.stdlib, "site-packages"),) if d not in layout.site_dirs)
        roots.append(Root("stdlib", layout.stdlib, skip))
    for number, site in enumerate(layout.site_dirs):
        if not any(
            _inside(site, root.path) for root in roots
        ):  # e.g. Debian's /usr/lib/python3/dist-packages
            roots.append(Root(f"site{number}", site))
    if layout.executable is not None:
        real = os.path.realpath(layout.executable)
        if os.path.isfile(real) and not _inside(real, roots[0].path):
            roots.append(Root("python", real))
    major, minor = layout.version
    for name in (f"libpython{major}.{minor}.so.1.0", f"libpython{major}.{minor}.so"):
        lib = os.path.join(layout.base_prefix, "lib", name)
        if os.path.isfile(lib) and not os.path.islink(lib):
            roots.append(Root("libpython", lib))
            break
    return roots


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def inventory(roots: list[Root]) -> tuple[dict[str, Entry], list[tuple[str, str]]]:
    """Every entry under `roots` by path, and what could not be listed or stat'ed: (location, why)."""
    entries: dict[str, Entry] = {}
    problems: list[tuple[str, str]] = []
    for root in roots:
        try:
            st = os.lstat(root.path)
        except OSError as exc:
            problems.append((root.path, str(exc.strerror)))
            continue
        if not stat.S_ISDIR(st.st_mode):
            entry = entry_of(root.label, root.path, st)
            entries[entry.path] = entry
            continue
        _walk(root, problems, entries)
    return entries, problems


def _walk(root: Root, problems: list[tuple[str, str]], entries: dict[str, Entry]) -> None:
    """Add every entry under `root` to `entries`. The loop is the cost of a quick check (one lstat per
    file, tens of thousands of files), so regular files take the shortest path."""
    skip = set(root.skip)
    pending = [(root.path, root.label)]
    is_regular = stat.S_ISREG
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                items = list(listing)
        except OSError as exc:
            problems.append((directory, str(exc.strerror)))
            continue
        for item in items:
            path = f"{prefix}/{item.name}"
            try:
                if item.is_dir(follow_symlinks=False):
                    if item.path not in skip:
                        pending.append((item.path, path))
                    continue
                st = item.stat(follow_symlinks=False)
            except OSError as exc:
                problems.append((item.path, str(exc.strerror)))
                continue
            mode = st.st_mode
            if is_regular(mode):
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                entries[path] = Entry(path, item.path, "file", st.st_size, key, bool(mode & 0o111), st.st_uid)
            else:
                entries[path] = entry_of(path, item.path, st)


def entry_of(path: str, location: str, st: os.stat_result) -> Entry:
    """The entry for what `st` describes (a link keeps its target)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
        target = None
    elif stat.S_ISLNK(mode):
        kind = "link"
        try:
            target = os.readlink(location)
        except OSError:
            target = None
    else:
        kind, target = "other", None
    return Entry(path, location, kind, st.st_size, stat_key(st), bool(mode & 0o111), st.st_uid, target)
