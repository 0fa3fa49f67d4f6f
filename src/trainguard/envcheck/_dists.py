"""The installed distributions of a site directory, read from their metadata and never imported.

`importlib.metadata` is not used: it reads the running interpreter's path, trusts what it finds and
raises on malformed files. Here every file is read with a size cap, every malformed line or unreadable
file becomes a problem string that names the file (the caller reports it: an unreadable RECORD means
the distribution cannot be verified, never that it is clean), and nothing an attacker writes into
metadata can make the reader raise. Entry points are parsed the way `importlib.metadata` parses them,
because that is how `import torch` and pytest find the plug-ins they load.
"""

from __future__ import annotations

import binascii
import csv
import dataclasses
import functools
import hashlib
import json
import os
import re
import stat
import urllib.parse
from typing import Any

from trainguard.errors import UsageError

__all__ = [
    "METADATA_CAP",
    "RECORD_CAP",
    "Distribution",
    "EntryPoint",
    "RecordRow",
    "normalize_name",
    "read_distributions",
]

RECORD_CAP = 64 << 20
METADATA_CAP = 1 << 20  # METADATA headers, entry_points.txt, direct_url.json, INSTALLER, installed-files.txt
_URLSAFE = str.maketrans("-_", "+/")
_SHOWN = 200  # characters of a bad line quoted in a problem


@dataclasses.dataclass(frozen=True)
class RecordRow:
    """One row of RECORD (or of an egg-info installed-files.txt, with no hash)."""

    path: str
    location: str
    algorithm: str | None
    digest: bytes | None
    size: int | None


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    group: str
    name: str
    value: str


@dataclasses.dataclass(frozen=True)
class Distribution:
    """One installed distribution; `problems` lists what could not be read, each naming its file."""

    name: str
    key: str
    version: str
    meta_dir: str
    site_dir: str
    records: tuple[RecordRow, ...]
    has_record: bool
    entry_points: tuple[EntryPoint, ...]
    editable: bool
    editable_location: str | None
    installer: str | None
    problems: tuple[str, ...]


def normalize_name(name: str) -> str:
    """The PEP 503 normalised form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_distributions(site_dir: str, *, records: bool = True) -> list[Distribution]:
    """Every `*.dist-info` and `*.egg-info` distribution in `site_dir`, sorted by key.

    With `records=False` the RECORD of a wheel install is checked to exist but not parsed (an
    environment's RECORDs are tens of thousands of rows), except for editable installs, whose RECORD
    says which .pth file is theirs.

    Malformed, oversized, unreadable or non-UTF-8 metadata never raises: it becomes a problem string,
    also for a metadata directory that cannot even be followed (a symlink loop). Only a site directory
    that cannot be listed at all raises (UsageError naming it).
    """
    root = os.path.abspath(site_dir)
    try:
        with os.scandir(root) as entries:
            found = [
                (entry.name, _is_dir(entry)) for entry in entries if entry.name.endswith(_METADATA_SUFFIXES)
            ]
    except OSError as exc:
        raise UsageError(f"cannot list site directory {site_dir}: {exc.strerror or exc}") from exc
    dists: list[Distribution] = []
    for name, is_dir in found:
        if name.endswith(".dist-info") and is_dir:
            dists.append(_read_dist_info(root, name, records))
        elif name.endswith(".egg-info"):
            dists.append(_read_egg_info(root, name, is_dir))
    dists.sort(key=lambda d: (d.key, d.meta_dir))
    return dists


_METADATA_SUFFIXES = (".dist-info", ".egg-info")


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether `entry` is a directory; one that cannot be followed counts as one, so that reading its
    metadata fails there, as a problem of that distribution, instead of hiding the whole site."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return True


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, what: str) -> None:
        self.items.append(f"{path}: {what}")


def _read_dist_info(root: str, dirname: str, parse_records: bool = True) -> Distribution:
    meta_dir = os.path.join(root, dirname)
    problems = _Problems()
    headers = _read_headers(os.path.join(meta_dir, "METADATA"), problems, required=True)
    name, version = _name_version(
        headers, dirname, ".dist-info", os.path.join(meta_dir, "METADATA"), problems
    )
    record_path = os.path.join(meta_dir, "RECORD")
    editable, location = _read_direct_url(os.path.join(meta_dir, "direct_url.json"), problems)
    records: tuple[RecordRow, ...] = ()
    if parse_records or editable:
        record_data = _read_file(record_path, RECORD_CAP, problems, required=True)
        has_record = record_data is not None
        if record_data is not None:
            records = _parse_record(record_data, record_path, root, problems)
    else:
        has_record = os.path.isfile(record_path)
        if not has_record:
            problems.add(record_path, "missing")
    installer_data = _read_file(os.path.join(meta_dir, "INSTALLER"), METADATA_CAP, problems)
    installer = None
    if installer_data is not None:
        text = _decode(installer_data, os.path.join(meta_dir, "INSTALLER"), problems)
        installer = text.strip().splitlines()[0].strip() if text.strip() else None
    return Distribution(
        name=name,
        key=normalize_name(name),
        version=version,
        meta_dir=meta_dir,
        site_dir=root,
        records=records,
        has_record=has_record,
        entry_points=_read_entry_points(os.path.join(meta_dir, "entry_points.txt"), problems),
        editable=editable,
        editable_location=location,
        installer=installer,
        problems=tuple(problems.items),
    )


def _read_egg_info(root: str, dirname: str, is_dir: bool) -> Distribution:
    """An egg-info directory (setup.py install, old setuptools) or file (distutils): no RECORD; the
    files listed in installed-files.txt become rows without a hash, relative to the egg-info directory."""
    meta_dir = os.path.join(root, dirname)
    problems = _Problems()
    pkg_info = os.path.join(meta_dir, "PKG-INFO") if is_dir else meta_dir
    headers = _read_headers(pkg_info, problems, required=True)
    name, version = _name_version(headers, dirname, ".egg-info", pkg_info, problems)
    records: tuple[RecordRow, ...] = ()
    entry_points: tuple[EntryPoint, ...] = ()
    if is_dir:
        listing = os.path.join(meta_dir, "installed-files.txt")
        data = _read_file(listing, METADATA_CAP, problems)
        if data is not None:
            lines = _decode(data, listing, problems).splitlines()
            records = tuple(
                RecordRow(line, os.path.normpath(os.path.join(meta_dir, line)), None, None, None)
                for line in lines
                if line.strip()
            )
        entry_points = _read_entry_points(os.path.join(meta_dir, "entry_points.txt"), problems)
    return Distribution(
        name=name,
        key=normalize_name(name),
        version=version,
        meta_dir=meta_dir,
        site_dir=root,
        records=records,
        has_record=False,
        entry_points=entry_points,
        editable=False,
        editable_location=None,
        installer=None,
        problems=tuple(problems.items),
    )


def _read_file(path: str, cap: int, problems: _Problems, *, required: bool = False) -> bytes | None:
    """The bytes of a metadata file, or None with a problem (a missing optional file is no problem)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        if required:
            problems.add(path, "missing")
        return None
    except OSError as exc:
        problems.add(path, f"cannot be opened: {exc.strerror or exc}")
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            problems.add(path, "not a regular file")
            return None
        if st.st_size > cap:
            problems.add(path, f"{st.st_size} bytes, over the {cap}-byte limit: not read")
            return None
        chunks: list[bytes] = []
        total = 0
        while total <= cap:
            # Ask for what fstat said (plus one to notice growth), not the cap: os.read allocates it.
            chunk = os.read(fd, min(cap + 1 - total, max(st.st_size - total, 0) + 1 + (1 << 16)))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            problems.add(path, f"grew past the {cap}-byte limit while being read: not read")
            return None
        return b"".join(chunks)
    except OSError as exc:
        problems.add(path, f"cannot be read: {exc.strerror or exc}")
        return None
    finally:
        os.close(fd)


def _decode(data: bytes, path: str, problems: _Problems) -> str:
    """UTF-8 text; bytes that are not UTF-8 are a problem and decode as the file system would name them."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add(path, f"not valid UTF-8 (byte {exc.start})")
        return data.decode("utf-8", "surrogateescape")


def _read_headers(path: str, problems: _Problems, *, required: bool) -> dict[str, str]:
    """The first value of each header of a METADATA/PKG-INFO file (RFC 822 style; the body is ignored,
    so a long description past the size cap does not matter as long as the headers end before it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        if required:
            problems.add(path, "missing")
        return {}
    except OSError as exc:
        problems.add(path, f"cannot be opened: {exc.strerror or exc}")
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            problems.add(path, "not a regular file")
            return {}
        head = b""
        while len(head) <= METADATA_CAP:
            chunk = os.read(fd, METADATA_CAP + 1 - len(head))
            if not chunk:
                break
            head += chunk
    except OSError as exc:
        problems.add(path, f"cannot be read: {exc.strerror or exc}")
        return {}
    finally:
        os.close(fd)
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None and len(head) > METADATA_CAP:
        problems.add(path, f"headers longer than the {METADATA_CAP}-byte limit: not read")
        return {}
    text = _decode(head[: end.start()] if end else head, path, problems)
    headers: dict[str, str] = {}
    last: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line[:1] in (" ", "\t") and last is not None:
            continue  # a folded continuation of the previous header
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            problems.add(path, f"line {number}: not a header: {line[:_SHOWN]!r}")
            last = None
            continue
        last = key.strip().lower()
        headers.setdefault(last, value.strip())
    return headers


def _name_version(
    headers: dict[str, str], dirname: str, suffix: str, path: str, problems: _Problems
) -> tuple[str, str]:
    stem = dirname[: -len(suffix)]
    guess_name, _, rest = stem.partition("-")
    guess_version = rest.split("-")[0]
    name = headers.get("name", "")
    version = headers.get("version", "")
    if not name:
        problems.add(path, f"no Name header: named {guess_name!r} from the directory name")
        name = guess_name
    if not version:
        problems.add(path, f"no Version header: version {guess_version!r} from the directory name")
        version = guess_version
    return name, version


def _parse_record(data: bytes, path: str, root: str, problems: _Problems) -> tuple[RecordRow, ...]:
    """RECORD rows (`path,algorithm=urlsafe-b64-digest,size`); a bad row is a problem and skipped, or
    kept without a hash when only its hash or size is bad (the file is still the distribution's)."""
    text = _decode(data, path, problems)
    rows: list[RecordRow] = []
    seen: dict[str, tuple[str | None, bytes | None]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        shown = line[:_SHOWN]
        if '"' in line:
            try:
                fields = next(csv.reader([line]))
            except (csv.Error, StopIteration) as exc:
                problems.add(path, f"line {number}: not a CSV row ({exc}): {shown!r}")
                continue
        else:
            fields = line.split(",")  # what csv makes of a line without quotes, much faster
        if len(fields) != 3:
            problems.add(path, f"line {number}: {len(fields)} fields, expected 3: {shown!r}")
            fields = [fields[0] if fields else "", "", ""]  # the file is still listed, its hash unknown
        rel, hash_field, size_field = fields
        if not rel or "\x00" in rel:
            problems.add(path, f"line {number}: no usable file path: {shown!r}")
            continue
        algorithm, digest = _parse_hash(hash_field, number, path, problems)
        size: int | None = None
        if size_field:
            if size_field.isdigit():
                size = int(size_field)
            else:
                problems.add(path, f"line {number}: size {size_field[:_SHOWN]!r} is not a number")
        location = os.path.normpath(rel if rel.startswith("/") else f"{root}/{rel}")  # os.path.join, faster
        previous = seen.get(location)
        if previous is not None:
            if previous != (algorithm, digest):
                problems.add(path, f"line {number}: {rel!r} is listed again with a different hash")
            continue
        seen[location] = (algorithm, digest)
        rows.append(RecordRow(rel, location, algorithm, digest, size))
    return tuple(rows)


def _parse_hash(field: str, number: int, path: str, problems: _Problems) -> tuple[str | None, bytes | None]:
    if not field:
        return None, None
    algorithm, sep, encoded = field.partition("=")
    if not sep or not algorithm or not encoded:
        problems.add(path, f"line {number}: hash {field[:_SHOWN]!r} is not algorithm=digest")
        return None, None
    expected = _digest_size(algorithm)
    if expected is None:
        problems.add(path, f"line {number}: unknown hash algorithm {algorithm[:_SHOWN]!r}")
        return None, None
    if expected and len(encoded) == 2 * expected and re.fullmatch(r"[0-9a-f]+", encoded):
        return algorithm, bytes.fromhex(encoded)  # Debian's dh-python writes hex digests; unambiguous
    if not re.fullmatch(r"[A-Za-z0-9_-]+=*", encoded):
        problems.add(path, f"line {number}: digest {encoded[:_SHOWN]!r} is not urlsafe base64")
        return None, None
    bare = encoded.rstrip("=")
    try:
        digest = binascii.a2b_base64(bare.translate(_URLSAFE) + "=" * (-len(bare) % 4))
    except (binascii.Error, ValueError):
        problems.add(path, f"line {number}: digest {encoded[:_SHOWN]!r} is not urlsafe base64")
        return None, None
    if expected and len(digest) != expected:
        problems.add(
            path, f"line {number}: {algorithm} digest of {len(digest)} bytes, expected {expected} bytes"
        )
        return None, None
    return algorithm, digest


@functools.lru_cache(maxsize=64)
def _digest_size(algorithm: str) -> int | None:
    if not re.fullmatch(r"[a-z0-9_]{1,32}", algorithm):
        return None
    try:
        return hashlib.new(algorithm).digest_size
    except (ValueError, TypeError):
        return None


def _read_entry_points(path: str, problems: _Problems) -> tuple[EntryPoint, ...]:
    """entry_points.txt as importlib.metadata reads it: lines stripped, `#` comments and blank lines
    skipped, `[group]` headers, `name = value` split at the first `=`; names and values are kept exactly
    (no case folding, no interpolation). A line importlib.metadata could not parse is a problem."""
    data = _read_file(path, METADATA_CAP, problems)
    if data is None:
        return ()
    text = _decode(data, path, problems)
    group: str | None = None
    points: list[EntryPoint] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line.strip("[]")
            continue
        if group is None:
            problems.add(path, f"line {number}: entry outside any [group]: {line[:_SHOWN]!r}")
            continue
        name, sep, value = line.partition("=")
        if not sep:
            problems.add(path, f"line {number}: not 'name = value': {line[:_SHOWN]!r}")
            continue
        points.append(EntryPoint(group, name.strip(), value.strip()))
    return tuple(points)


def _read_direct_url(path: str, problems: _Problems) -> tuple[bool, str | None]:
    """PEP 610 direct_url.json: whether the install is editable, and where its code lives."""
    data = _read_file(path, METADATA_CAP, problems)
    if data is None:
        return False, None
    try:
        doc: Any = json.loads(_decode(data, path, problems))
    except (ValueError, RecursionError) as exc:
        problems.add(path, f"not valid JSON: {str(exc)[:_SHOWN]}")
        return False, None
    if not isinstance(doc, dict):
        problems.add(path, "not a JSON object")
        return False, None
    dir_info = doc.get("dir_info")
    editable = isinstance(dir_info, dict) and dir_info.get("editable") is True
    if not editable:
        return False, None
    url = doc.get("url")
    if not isinstance(url, str):
        problems.add(path, "editable install without a url")
        return True, None
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "file":
        return True, url
    return True, urllib.parse.unquote(parsed.path)
