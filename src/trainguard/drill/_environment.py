"""A copy of the job's Python environment for the drill to tamper with, so the real one never is.

The copy is a venv in the workspace (`python -m venv --without-pip`, on the base interpreter of the one
running the drill) whose site-packages is a tree of hard links to the running environment's
site-packages (purelib and platlib, where torch and trainguard are), and whose bin/, include/ and share/
get links to the files the distributions' RECORDs installed there, so that every RECORD checks out in
the copy as it does in the original. An editable install keeps working: its .pth file and its
direct_url.json are linked like any file and still name the source tree. Console scripts keep their
`#!` line, which names the real environment's interpreter: the job is started as `python -m
torch.distributed.run` on the copy's interpreter, never through them.

A link shares the real file's bytes, so nothing is ever written through one: a tampered file is written
beside it and renamed over the link (`EnvironmentCopy.replace`), which leaves the real file's bytes and
inode as they were. What linking does change in the real environment is metadata: each real file's link
count, and with it its ctime, so the user's own quick-check cache hashes those files once more after a
drill. Where a file cannot be linked (the workspace on another file system), it is copied, and the copy
counts how many were.

Then a baseline of the copy is taken with `trainguard env snapshot` into the workspace, as a team takes
one at setup, signed with the workspace's key and cached in the workspace's TRAINGUARD_HOME.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path
from typing import Any

from trainguard.drill._workspace import Workspace

__all__ = ["EnvironmentCopy", "prepare_environment"]

# The snapshot compares no cached bytecode with its source: compiling the 16,000 .pyc files of torch and
# the test tools takes minutes on 2 cores, against 10 s for hashing every file. The baseline then takes
# the .pyc files as they are, as it takes the standard library (they are the real environment's own).
_SNAPSHOT_FLAGS = ("--no-bytecode",)
_SNAPSHOT_TIMEOUT_S = 600
_STATE = "copy.json"


class CopyFailed(Exception):
    """The copy or its baseline could not be made: the message says why."""


@dataclasses.dataclass
class EnvironmentCopy:
    """The copy (`prefix`, its interpreter `python`, its `site` directory), the running environment's
    site directory it links to (`source_site`), its signed `baseline`, and what building it cost.
    `replace` and `add` tamper with it; `restore` undoes them."""

    prefix: Path
    python: Path
    site: Path
    source_site: Path
    baseline: Path
    linked: int
    copied: int
    link_error: str
    build_seconds: float
    baseline_seconds: float
    _replaced: list[Path] = dataclasses.field(default_factory=list, init=False, repr=False)
    _added: list[Path] = dataclasses.field(default_factory=list, init=False, repr=False)

    def source_of(self, path: Path) -> Path:
        """The real file a file of the copy's site-packages links to."""
        return self.source_site / path.relative_to(self.site)

    def replace(self, path: Path, data: bytes) -> None:
        """Put `data` at `path` in the copy by a rename over the link: never a write through it."""
        _write_beside(path, data)
        self._replaced.append(path)

    def add(self, path: Path, data: bytes) -> None:
        """A new file in the copy."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise CopyFailed(f"{path} is already in the copy: an attack only adds new files")
        _write_beside(path, data)
        self._added.append(path)

    def restore(self) -> None:
        """The copy as it was built: replaced files linked to the real ones again, added files gone."""
        for path in reversed(self._added):
            path.unlink(missing_ok=True)
            if path.parent != self.site and not any(path.parent.iterdir()):
                path.parent.rmdir()
        for path in reversed(self._replaced):
            _link_beside(self.source_of(path), path)
        self._added.clear()
        self._replaced.clear()

    def describe(self) -> str:
        copied = f", {self.copied} copied ({self.link_error})" if self.copied else ""
        return (
            f"the job's environment copied to {self.prefix} as {self.linked} hard links{copied} in "
            f"{self.build_seconds:.1f} s; baseline taken in {self.baseline_seconds:.1f} s"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": str(self.prefix),
            "python": str(self.python),
            "site": str(self.site),
            "source_site": str(self.source_site),
            "baseline": str(self.baseline),
            "linked": self.linked,
            "copied": self.copied,
            "link_error": self.link_error,
            "build_seconds": self.build_seconds,
            "baseline_seconds": self.baseline_seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EnvironmentCopy:
        return cls(
            prefix=Path(data["prefix"]),
            python=Path(data["python"]),
            site=Path(data["site"]),
            source_site=Path(data["source_site"]),
            baseline=Path(data["baseline"]),
            linked=int(data["linked"]),
            copied=int(data["copied"]),
            link_error=str(data["link_error"]),
            build_seconds=float(data["build_seconds"]),
            baseline_seconds=float(data["baseline_seconds"]),
        )


def prepare_environment(workspace: Workspace) -> EnvironmentCopy:
    """The workspace's copy of the job's environment with its baseline, built on first use (a later
    attack finds it restored by the one before). CopyFailed says why it could not be built."""
    folder = workspace.root / "environment"
    state = folder / _STATE
    if state.exists():
        return EnvironmentCopy.from_json(json.loads(state.read_text()))
    copy = _build(folder / "venv", folder / "baseline.json")
    copy.baseline_seconds = _snapshot(workspace, copy)
    state.write_text(json.dumps(copy.to_json(), indent=2) + "\n")
    return copy


def _source_site() -> Path:
    """The running environment's site directory: purelib and platlib are one directory in a venv."""
    paths = sysconfig.get_paths()
    sites = {os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])}
    if len(sites) != 1:
        raise CopyFailed(f"purelib and platlib differ ({', '.join(sorted(sites))}): the drill copies one")
    site = Path(sites.pop())
    if not (site / "torch").is_dir():
        raise CopyFailed(f"torch is not installed in {site}, the site-packages of {sys.executable}")
    return site


def _build(prefix: Path, baseline: Path) -> EnvironmentCopy:
    began = time.monotonic()
    source = _source_site()
    venv.EnvBuilder(symlinks=True, with_pip=False, system_site_packages=False).create(prefix)
    site = prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    linker = _Linker()
    linker.tree(source, site)
    linker.outside(source, site, prefix)
    return EnvironmentCopy(
        prefix=prefix,
        python=prefix / "bin" / "python",
        site=site,
        source_site=source,
        baseline=baseline,
        linked=linker.linked,
        copied=linker.copied,
        link_error=linker.error,
        build_seconds=time.monotonic() - began,
        baseline_seconds=0.0,
    )


def _inside(path: Path | str, directory: Path | str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(directory)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class _Linker:
    """Hard-links files into the copy, copying a file only when linking it fails."""

    def __init__(self) -> None:
        self.linked = 0
        self.copied = 0
        self.error = ""

    def file(self, source: Path, target: Path) -> None:
        try:
            os.link(source, target, follow_symlinks=False)
            self.linked += 1
        except OSError as exc:
            shutil.copy2(source, target, follow_symlinks=False)
            self.copied += 1
            self.error = self.error or f"linking failed: {exc.strerror or exc}"

    def tree(self, source: Path, target: Path) -> None:
        """Every directory of `source` made in `target`, every file linked, every symlink made again."""
        for directory, dirs, files in os.walk(source):
            here = target / Path(directory).relative_to(source)
            here.mkdir(parents=True, exist_ok=True)
            for name in dirs + files:
                path = Path(directory, name)
                if path.is_symlink():
                    (here / name).symlink_to(path.readlink())
                elif name in files and path.is_file():
                    self.file(path, here / name)

    def outside(self, source: Path, site: Path, prefix: Path) -> None:
        """The files RECORDs installed outside site-packages (console scripts, headers, man pages), at
        the same place relative to the copy's site-packages, when that lies inside the copy."""
        from trainguard.envcheck._dists import read_distributions

        for dist in read_distributions(str(source)):
            for row in dist.records:
                # Rows are relative to site-packages: only those that climb out of it, or absolute
                # ones, name a file outside (resolving every row's path would cost seconds).
                if not row.path.startswith(("..", "/")):
                    continue
                location = Path(row.location)
                if _inside(location, source) or not location.is_file():
                    continue
                target = Path(os.path.normpath(site / os.path.relpath(row.location, source)))
                if not _inside(target, prefix) or target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                self.file(location, target)


def _write_beside(path: Path, data: bytes) -> None:
    """`data` in a new file beside `path`, renamed over it: a link at `path` is replaced, not followed."""
    tmp = path.with_name(f".{path.name}.drill-tmp")
    tmp.unlink(missing_ok=True)  # a leftover could be a link: the new file must be a new inode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def _link_beside(source: Path, path: Path) -> None:
    """`path` made a link to `source` again (a copy where linking fails), by a rename over it."""
    tmp = path.with_name(f".{path.name}.drill-tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    tmp.replace(path)


def _snapshot(workspace: Workspace, copy: EnvironmentCopy) -> float:
    """Take the copy's signed baseline with the workspace's key, home and ledger; its duration."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "env", "snapshot", "--prefix", str(copy.prefix),
         "--out", str(copy.baseline), *_SNAPSHOT_FLAGS],
        capture_output=True,
        text=True,
        env=workspace.environ(),
        timeout=_SNAPSHOT_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    if done.returncode != 0 or not copy.baseline.exists():
        shown = (done.stdout + done.stderr).strip().splitlines()[-12:]
        raise CopyFailed(
            f"`trainguard env snapshot` of the copy exited {done.returncode}: " + " | ".join(shown)
        )
    return time.monotonic() - began
