"""Scanning files and folders: the library entry point."""

from __future__ import annotations

import dataclasses
import mmap
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from trainguard.errors import UsageError
from trainguard.findings import Problem, Verdict
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.dispatch import analyse
from trainguard.scan.limits import ScanLimits
from trainguard.scan.policy import Policy, load_policy_file
from trainguard.scan.result import FileResult, ScanReport

Progress = Callable[[int, int, str], None]


@dataclasses.dataclass(frozen=True)
class ScanOptions:
    """How to scan. `allow` adds `module.name` (or `module.*`) entries to the built-in allowlist;
    `policy_file` is a TOML policy given explicitly (never one found next to an artifact)."""

    allow: tuple[str, ...] = ()
    policy_file: Path | None = None
    limits: ScanLimits = dataclasses.field(default_factory=ScanLimits)
    jobs: int | None = None  # worker processes; None uses every core
    progress: Progress | None = None

    def policy(self) -> Policy:
        policy = Policy.default()
        if self.policy_file is not None:
            policy = policy.extended(load_policy_file(Path(self.policy_file)))
        return policy.with_allowed(self.allow)


def scan_path(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], options: ScanOptions | None = None
) -> ScanReport:
    """Scan files and folders (recursively) and return a typed report. Never executes the artifacts."""
    options = options or ScanOptions()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    roots = [Path(p) for p in paths]
    for root in roots:
        if not root.exists() and not root.is_symlink():
            raise UsageError(f"{root}: no such file or directory")
    policy = options.policy()
    files, errors = _collect(roots)
    results = _run(files, policy, options)
    return ScanReport(tuple(sorted(results, key=lambda r: r.path)), tuple(errors))


def _collect(roots: list[Path]) -> tuple[list[str], list[str]]:
    files: list[str] = []
    errors: list[str] = []
    for root in roots:
        if root.is_dir() and not root.is_symlink():
            files.extend(_walk(str(root), errors))
        else:
            files.append(str(root))
    return sorted(set(files)), errors


def _walk(root: str, errors: list[str]) -> Iterator[str]:
    def onerror(exc: OSError) -> None:
        errors.append(f"{exc.filename}: {exc.strerror}")

    # Plain strings, not Path objects: a folder of thousands of checkpoints makes that cost visible.
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)  # noqa: PTH118 - see above


def _run(files: list[str], policy: Policy, options: ScanOptions) -> list[FileResult]:
    jobs = options.jobs or os.cpu_count() or 1
    total = len(files)
    results: list[FileResult] = []
    if jobs <= 1 or total < 8:
        for done, path in enumerate(files, 1):
            results.append(scan_file(path, policy, options.limits))
            if options.progress:
                options.progress(done, total, path)
        return results
    import multiprocessing  # only parallel scans pay for these imports
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    chunk = max(1, min(32, total // (jobs * 8)))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        work = pool.map(scan_file, files, [policy] * total, [options.limits] * total, chunksize=chunk)
        for done, result in enumerate(work, 1):
            results.append(result)
            if options.progress:
                options.progress(done, total, result.path)
    return results


_DEFAULT_LIMITS = ScanLimits()


def scan_file(path: str, policy: Policy | None = None, limits: ScanLimits | None = None) -> FileResult:
    """Scan one file on disk. Any failure becomes an "undecided" result, never an exception."""
    policy = policy or Policy.default()
    limits = limits or _DEFAULT_LIMITS
    try:
        # O_NONBLOCK: opening a FIFO planted in a checkpoint folder must not hang the scan.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return _unreadable(path, exc.strerror or str(exc))
    data: bytes | mmap.mmap = b""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return FileResult(path, (), Verdict.SKIPPED, note="not a regular file")
        data = _contents(fd, info.st_size)
    except (OSError, ValueError) as exc:
        os.close(fd)
        return _unreadable(path, getattr(exc, "strerror", None) or str(exc))
    try:
        return scan_bytes(data, path, policy, limits)
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
        os.close(fd)


def scan_bytes(
    data: bytes | mmap.mmap, name: str, policy: Policy | None = None, limits: ScanLimits | None = None
) -> FileResult:
    """Scan bytes already in memory (or mapped) as the file `name`: the load gate scans exactly what it
    loads. A failure becomes an "undecided" result, never an exception."""
    scan = Scan(name, policy or Policy.default(), limits or _DEFAULT_LIMITS)
    try:
        analyse(scan, Artifact(data, 0, len(data), name))
    finally:
        scan.close()
    return _result(scan, len(data))


# Files up to this size are read into memory: cheaper than mapping them, and most checkpoints of a
# folder scan are small. Larger ones are mapped, so a 100 GB file costs no memory.
_READ_LIMIT = 1 << 20


def _contents(fd: int, size: int) -> bytes | mmap.mmap:
    """The file's bytes as they are now: read if small, mapped if large (or if it grew while read)."""
    if size > _READ_LIMIT:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    chunks: list[bytes] = []
    total = 0
    while total <= _READ_LIMIT:
        chunk = os.read(fd, _READ_LIMIT + 1 - total)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)


def _unreadable(path: str, reason: str) -> FileResult:
    problem = Problem("Unreadable", f"{path}: cannot read ({reason})", path)
    return FileResult(path, (), Verdict.UNDECIDED, problems=(problem,))


def _result(scan: Scan, size: int) -> FileResult:
    findings = tuple(sorted(set(scan.findings), key=lambda f: f.sort_key()))
    problems = tuple(scan.problems)
    formats = tuple(scan.formats)
    if findings:
        verdict = Verdict.FINDINGS
    elif problems:
        verdict = Verdict.UNDECIDED
    elif set(formats) <= {"other", "empty"}:
        note = "empty file" if formats == ("empty",) else "not a format any model loader deserialises"
        return FileResult(scan.path, formats, Verdict.SKIPPED, size=size, note=note)
    else:
        verdict = Verdict.CLEAN
    return FileResult(scan.path, formats, verdict, findings, problems, size)
