"""Is a cached `.pyc` really the compiled form of its source?

Python runs `__pycache__/mod.cpython-311.pyc` instead of `mod.py` whenever the pyc's header matches
the source (same mtime and size, or the same source hash), and runs an *unchecked* hash-based pyc
without looking at the source at all. So a saboteur can replace the pyc, keep the header, and leave
`mod.py` and its RECORD row untouched. Nothing about the pyc's bytes alone says whether it is genuine:
pip does not record pyc hashes, and `marshal.dumps` output varies between processes.

The check compiles the (separately verified) source with the running, trusted interpreter, exactly as
the import system and `py_compile` do, and compares. Equal bytes settle it at once; otherwise both
bodies are read by the bounded `_marshal` reader into canonical digests (refs resolved, ref flags and
string interning ignored, set order ignored) and those are compared. The target's bytes are never
given to `marshal.loads`.

co_filename is the one field that legitimately depends on where the environment was when it was
compiled; when only a relocation separates the two, the source is compiled again under the pyc's own
co_filename and a match is reported as ok with a note.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import marshal
import os
import stat
import sys
import warnings

from trainguard.envcheck._marshal import MarshalCode, MarshalLimits, canonical_digest, decode
from trainguard.errors import UndecidableError

__all__ = ["PycVerdict", "check_pyc", "pyc_source"]

MAX_PYC_BYTES = 64 << 20
MAX_SOURCE_BYTES = 64 << 20
_HEADER = 16
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FLAG_HASH = 0b01
_FLAG_CHECK_SOURCE = 0b10
_STATUSES = frozenset({"ok", "stale", "mismatch", "foreign", "undecided"})


@dataclasses.dataclass(frozen=True)
class PycVerdict:
    """What a cached pyc is, compared with its source.

    status: "ok" (the compiled source), "stale" (the header does not match the source: Python ignores
    the pyc and rewrites it), "mismatch" (Python would run it and it is not the compiled source:
    tampering), "foreign" (another Python version's magic number: not checkable here) or "undecided"
    (unreadable, too big, or not decodable). `detail` says why, for a person.
    """

    status: str
    detail: str

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"unknown pyc status {self.status!r}")


def pyc_source(pyc_path: str) -> tuple[str, int] | None:
    """The source a PEP 3147 cache file belongs to and its optimization level:
    ".../pkg/__pycache__/mod.cpython-311.opt-1.pyc" -> (".../pkg/mod.py", 1). None when the name is
    not a cache name this interpreter writes (another cache tag, a legacy pyc, an odd level)."""
    tag: str | None = getattr(sys.implementation, "cache_tag", None)  # None: this Python writes no pycs
    if tag is None:
        return None
    head, name = os.path.split(pyc_path)
    pkg_dir, cache_dir = os.path.split(head)
    if cache_dir != "__pycache__" or not name.endswith(".pyc"):
        return None
    parts = name[: -len(".pyc")].split(".")
    optimize = 0
    if len(parts) == 3:
        level = {"opt-1": 1, "opt-2": 2}.get(parts[2])
        if level is None:
            return None
        optimize = level
    elif len(parts) != 2:
        return None
    if not parts[0] or parts[1] != tag:
        return None
    return os.path.join(pkg_dir, parts[0] + ".py"), optimize


def check_pyc(
    pyc_path: str, source_path: str, optimize: int, *, limits: MarshalLimits | None = None
) -> PycVerdict:
    """Compare the pyc at `pyc_path` with `source_path` compiled at `optimize` (0, 1 or 2, as
    `pyc_source` gives it). Never raises for anything about the files; a ValueError means a bad
    `optimize`."""
    if optimize not in (0, 1, 2):
        raise ValueError(f"optimize must be 0, 1 or 2, not {optimize!r}")
    try:
        return _check(pyc_path, source_path, optimize, limits or MarshalLimits())
    except Exception as exc:  # a verdict for every file: nothing about it may escape as an exception
        return PycVerdict("undecided", f"could not check {pyc_path}: {type(exc).__name__}: {exc}")


def _check(pyc_path: str, source_path: str, optimize: int, limits: MarshalLimits) -> PycVerdict:
    pyc = _read(pyc_path, min(MAX_PYC_BYTES, limits.max_bytes + _HEADER))
    if isinstance(pyc, str):
        return PycVerdict("undecided", pyc)
    magic = importlib.util.MAGIC_NUMBER
    if pyc[:4] != magic:
        if len(pyc) >= 4 and pyc[2:4] == b"\r\n":
            number = int.from_bytes(pyc[:2], "little")
            here = f"{sys.version_info[0]}.{sys.version_info[1]}"
            return PycVerdict("foreign", f"magic number {number} is another Python version's, not {here}'s")
        return PycVerdict("undecided", "not a pyc file: no Python magic number")
    if len(pyc) < _HEADER:
        return PycVerdict("undecided", f"truncated header: {len(pyc)} bytes")
    flags = int.from_bytes(pyc[4:8], "little")
    if flags & ~(_FLAG_HASH | _FLAG_CHECK_SOURCE):
        return PycVerdict("stale", f"invalid header flags {flags:#x}: Python ignores this pyc")
    source = _read(source_path, MAX_SOURCE_BYTES)
    if isinstance(source, str):
        return PycVerdict("undecided", source)
    how = ""
    if flags & _FLAG_HASH:
        matches = pyc[8:16] == importlib.util.source_hash(source)
        if flags & _FLAG_CHECK_SOURCE:
            if not matches:
                return PycVerdict("stale", "checked hash-based pyc whose hash does not match the source")
            how = "checked hash-based pyc"
        else:
            # Python runs an unchecked pyc without reading the source: its content is all that counts.
            how = "unchecked hash-based pyc" + ("" if matches else " (its hash is not the source's)")
    else:
        st = os.stat(source_path)
        mtime = int.from_bytes(pyc[8:12], "little")
        size = int.from_bytes(pyc[12:16], "little")
        if mtime != int(st.st_mtime) & 0xFFFFFFFF or size != st.st_size & 0xFFFFFFFF:
            return PycVerdict("stale", "timestamp pyc whose mtime/size do not match the source")
        how = "timestamp pyc"
    body = pyc[_HEADER:]
    compiled = _compile(source, source_path, optimize)
    if isinstance(compiled, str):
        return PycVerdict("undecided", compiled)
    if body == compiled:
        return PycVerdict("ok", f"{how}: identical to the compiled source")
    try:
        theirs, end = canonical_digest(body, limits=limits)
    except UndecidableError as exc:
        return PycVerdict("undecided", f"{how}: its code cannot be read: {exc.message}")
    ours, _ = canonical_digest(compiled, limits=_trusted_limits(compiled))
    trailing = f"; {len(body) - end} trailing bytes that Python ignores" if end != len(body) else ""
    if theirs == ours:
        return PycVerdict("ok", f"{how}: same code as the compiled source{trailing}")
    relocated = _relocated(body, source, source_path, optimize, limits, theirs)
    if relocated is not None:
        return PycVerdict("ok", f"{how}: same code as the source compiled at {relocated!r}{trailing}")
    return PycVerdict("mismatch", f"{how}: its code differs from the compiled source{trailing}")


def _relocated(
    body: bytes, source: bytes, source_path: str, optimize: int, limits: MarshalLimits, theirs: bytes
) -> str | None:
    """The pyc's co_filename when compiling the source under it gives the pyc's code exactly."""
    try:
        top, _ = decode(body, limits=limits)
    except UndecidableError:
        return None
    if not isinstance(top, MarshalCode) or not isinstance(top.filename, str):
        return None
    filename = top.filename
    if filename == source_path:
        return None
    compiled = _compile(source, filename, optimize)
    if isinstance(compiled, str):
        return None
    if compiled == body:
        return filename
    ours, _ = canonical_digest(compiled, limits=_trusted_limits(compiled))
    return filename if ours == theirs else None


def _trusted_limits(compiled: bytes) -> MarshalLimits:
    """Our own compiler's output is bounded by its size alone: it has at most one object per byte."""
    size = max(len(compiled), 1)
    return MarshalLimits(max_bytes=size, max_objects=size)


def _compile(source: bytes, filename: str, optimize: int) -> bytes | str:
    """The marshalled code `py_compile` and the import system would write, or why there is none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings must not turn into errors here
            code = compile(source, filename, "exec", dont_inherit=True, optimize=optimize)
        return marshal.dumps(code)
    except (SyntaxError, RecursionError, ValueError, MemoryError, OverflowError) as exc:
        return f"the source does not compile: {type(exc).__name__}: {exc}"


def _read(path: str, cap: int) -> bytes | str:
    """The file's bytes, or why they cannot be had (missing, not a regular file, over `cap`)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror or exc}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file"
        if st.st_size > cap:
            return f"{path} is {st.st_size} bytes, over the limit of {cap}"
        chunks = []
        total = 0
        while total <= cap:
            chunk = os.read(fd, min(cap + 1 - total, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            return f"{path} grew over the limit of {cap} bytes while being read"
        return b"".join(chunks)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    finally:
        os.close(fd)
