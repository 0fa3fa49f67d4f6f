"""Anchor a baseline in the wheels a lock file pins, not in the RECORDs found installed.

A snapshot of an environment that was already tampered with bakes the tamper in: a file edited
together with its installed RECORD row looks genuine to every RECORD check. A lock file in pip's
hash-checking format (`name==version --hash=sha256:...`) names the exact wheels that should have been
installed; the RECORD inside each of those wheels says what every file it installs must hash to, and
nobody who can write to the environment can rewrite it. So each installed distribution is matched to
its wheel in a directory, the wheel's own SHA-256 must be one the lock allows, and the wheel's RECORD
(read from the zip with a size cap; nothing else is extracted) becomes the expected digest of each
installed file.

What pip writes or relocates on its own is not anchored: RECORD, INSTALLER, REQUESTED and
direct_url.json, cached bytecode, and the `.data/scripts|headers|data` trees (pip rewrites script
shebangs and puts the rest outside site-packages).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import stat
import zipfile
import zlib
from collections.abc import Mapping, Sequence

from trainguard.envcheck._dists import (
    RECORD_CAP,
    Distribution,
    RecordRow,
    _parse_record,
    _Problems,
    normalize_name,
)
from trainguard.envcheck._findings import EnvFinding
from trainguard.envcheck._walk import is_cached_bytecode
from trainguard.errors import UsageError
from trainguard.findings import Severity

__all__ = ["LOCK_CAP", "Anchoring", "Lock", "anchor", "read_lock"]

LOCK_CAP = 64 << 20
_MAX_INCLUDES = 64  # -r/-c files followed from one lock
_SHOWN = 200
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_COMMENT = re.compile(r"(^|\s+)#.*$")
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REQUIREMENT = re.compile(
    rf"(?P<name>{_NAME})\s*(?:\[(?P<extras>[^\]]*)\])?\s*(?P<spec>[^;]*?)\s*(?:;(?P<marker>.*))?",
    re.DOTALL,
)
_PIN = re.compile(r"\(?\s*===?\s*(?P<version>[A-Za-z0-9_.!+-]+)\s*\)?")
_VERSION = re.compile(
    r"""v?(?:(?P<epoch>\d+)!)?(?P<release>\d+(?:\.\d+)*)
    (?:[-_.]?(?P<pre_l>alpha|beta|preview|pre|rc|a|b|c)[-_.]?(?P<pre_n>\d+)?)?
    (?:-(?P<post_n1>\d+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>\d+)?)?
    (?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>\d+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?""",
    re.VERBOSE,
)
_PRE = {"alpha": "a", "a": "a", "beta": "b", "b": "b", "c": "rc", "rc": "rc", "pre": "rc", "preview": "rc"}
# Options pip accepts on a line of their own; they do not change which files a wheel installs.
_GLOBAL_FLAGS = {"--no-index", "--pre", "--prefer-binary", "--require-hashes"}
_GLOBAL_VALUED = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "--trusted-host",
    "--only-binary",
    "--no-binary",
    "--use-feature",
}
_INCLUDES = {"-r", "--requirement", "-c", "--constraint"}
_PER_REQUIREMENT = {"--config-settings", "--global-option", "--install-option"}
# Files pip writes into an installed dist-info itself: never in a wheel.
_PIP_WRITTEN = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
_UNHASHED_OK = {"RECORD", "RECORD.jws", "RECORD.p7s"}  # wheel RECORD rows that carry no hash, by spec
_RELOCATED = {"scripts", "headers", "data"}


@dataclasses.dataclass(frozen=True)
class Lock:
    """What a hash-checking lock file allows: "name==version" (PEP 503 name, version as written) to the
    SHA-256 hex digests of the wheels it accepts."""

    hashes: Mapping[str, frozenset[str]]


@dataclasses.dataclass(frozen=True)
class Anchoring:
    """`expected`: absolute installed location -> raw SHA-256 the wheel's RECORD gives for it;
    `anchors`: distribution key -> "sha256:<wheel digest>" for every distribution anchored in a wheel."""

    expected: Mapping[str, bytes]
    anchors: Mapping[str, str]
    findings: list[EnvFinding]


# The lock file.


def read_lock(path: str) -> Lock:
    """The lock file at `path` in pip's requirements format, every requirement pinned with `==` and
    carrying at least one `--hash=sha256:`; `-r`/`-c` files are followed. Anything else is a
    UsageError naming the file and line."""
    hashes: dict[str, set[str]] = {}
    _read_lock_file(os.path.abspath(path), hashes, [])
    return Lock({key: frozenset(values) for key, values in sorted(hashes.items())})


def _read_lock_file(path: str, hashes: dict[str, set[str]], stack: list[str]) -> None:
    if path in stack:
        raise UsageError(f"lock file {path} includes itself (through {' -> '.join(stack)})")
    if len(stack) >= _MAX_INCLUDES:
        raise UsageError(f"lock file {path}: more than {_MAX_INCLUDES} nested -r/-c files")
    text = _read_text(path)
    stack = [*stack, path]
    for number, line in _logical_lines(text):
        where = f"{path}:{number}"
        tokens = line.split()
        cut = next((i for i, token in enumerate(tokens) if token.startswith("-")), len(tokens))
        requirement = " ".join(tokens[:cut])
        try:
            options = shlex.split(" ".join(tokens[cut:]))
        except ValueError as exc:
            raise UsageError(f"{where}: cannot split the options: {exc}") from None
        if not requirement:
            included = _global_options(options, where)
            if included is not None:
                if "://" in included:
                    raise UsageError(f"{where}: a lock file cannot include a URL ({included[:_SHOWN]})")
                _read_lock_file(os.path.join(os.path.dirname(path), included), hashes, stack)
            continue
        key = _pinned(requirement, where)
        digests = _hash_options(options, where)
        hashes.setdefault(key, set()).update(digests)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"lock file {path} is not a regular file")
            chunks: list[bytes] = []
            total = 0
            while total <= LOCK_CAP:  # read(n) would allocate n bytes up front
                chunk = handle.read(min(1 << 20, LOCK_CAP + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            data = b"".join(chunks)
    except OSError as exc:
        raise UsageError(f"cannot read lock file {path}: {exc.strerror or exc}") from None
    if len(data) > LOCK_CAP:
        raise UsageError(f"lock file {path} is larger than {LOCK_CAP >> 20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not valid UTF-8") from None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines joined at trailing backslashes, comments removed, blank lines dropped, each numbered by
    its first physical line (pip's join_lines and ignore_comments)."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    first = 0
    for number, line in enumerate(text.splitlines(), 1):
        comment = _COMMENT.match(line) is not None
        if line.endswith("\\") and not comment:
            if not pending:
                first = number
            pending.append(line[:-1])
            continue
        if pending:
            pending.append(" " + line if comment else line)
            lines.append((first, "".join(pending)))
            pending = []
        else:
            lines.append((number, line))
    if pending:
        lines.append((first, "".join(pending)))
    cleaned = [(number, _COMMENT.sub("", line).strip()) for number, line in lines]
    return [(number, line) for number, line in cleaned if line]


def _global_options(options: list[str], where: str) -> str | None:
    """Check a line of options only; the file it includes with -r/-c, if any."""
    included: str | None = None
    i = 0
    while i < len(options):
        option, sep, value = options[i].partition("=")
        if not option.startswith("--") and len(option) > 2:  # -rfile, -ihttps://...
            option, value, sep = option[:2], option[2:], "="
        if option in _GLOBAL_FLAGS and not sep:
            i += 1
            continue
        if option in _GLOBAL_VALUED or option in _INCLUDES:
            if not sep:
                if i + 1 >= len(options):
                    raise UsageError(f"{where}: {option} needs a value")
                value = options[i + 1]
                i += 1
            if option in _INCLUDES:
                included = value
            i += 1
            continue
        if option in {"-e", "--editable"}:
            raise UsageError(f"{where}: an editable requirement cannot be checked against a hash")
        raise UsageError(f"{where}: option {options[i][:_SHOWN]!r} is not one a lock file may use here")
    return included


def _pinned(requirement: str, where: str) -> str:
    """ "name==version" of a requirement pinned to one version; markers are not evaluated (a lock for
    several platforms pins each version it may install)."""
    match = _REQUIREMENT.fullmatch(requirement)
    if match is None or "@" in match["spec"] or "/" in requirement.split(";")[0]:
        raise UsageError(f"{where}: {requirement[:_SHOWN]!r} is not a name==version requirement")
    extras = match["extras"]
    if extras is not None and not all(
        re.fullmatch(_NAME, extra.strip()) for extra in extras.split(",") if extra.strip()
    ):
        raise UsageError(f"{where}: extras [{extras[:_SHOWN]}] are malformed")
    if match["marker"] is not None and not match["marker"].strip():
        raise UsageError(f"{where}: an empty environment marker after ';'")
    pin = _PIN.fullmatch(match["spec"])
    if pin is None:
        what = f"pinned as {match['spec'][:_SHOWN]!r}" if match["spec"] else "not pinned"
        raise UsageError(
            f"{where}: {match['name']} is {what}; hash-checking needs exactly one ==version",
        )
    return f"{normalize_name(match['name'])}=={pin['version']}"


def _hash_options(options: list[str], where: str) -> set[str]:
    digests: set[str] = set()
    others = False
    i = 0
    while i < len(options):
        option, sep, value = options[i].partition("=")
        if option in _PER_REQUIREMENT or option == "--hash":
            if not sep:
                if i + 1 >= len(options):
                    raise UsageError(f"{where}: {option} needs a value")
                value = options[i + 1]
                i += 1
            if option == "--hash":
                algorithm, colon, digest = value.partition(":")
                if not colon or not digest:
                    raise UsageError(f"{where}: --hash {value[:_SHOWN]!r} is not algorithm:digest")
                if algorithm != "sha256":
                    others = True  # sha384/sha512 are valid for pip; only sha256 is checked here
                elif not _HEX64.fullmatch(digest):
                    raise UsageError(f"{where}: --hash sha256:{digest[:_SHOWN]} is not 64 hex digits")
                else:
                    digests.add(digest.lower())
            i += 1
            continue
        raise UsageError(f"{where}: option {options[i][:_SHOWN]!r} is not one a requirement may carry")
    if not digests:
        what = "only hashes other than sha256" if others else "no --hash"
        raise UsageError(f"{where}: the requirement has {what}; hash-checking needs --hash=sha256:...")
    return digests


def canonical_version(version: str) -> str:
    """A PEP 440 version in a form equal for equal versions ("1.0" == "1.0.0", "1.0RC1" == "1.0rc1");
    anything that is not PEP 440 is compared as written, lower-cased."""
    text = version.strip().lower()
    match = _VERSION.fullmatch(text)
    if match is None:
        return text
    release = [int(part) for part in match["release"].split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    out = f"{int(match['epoch'])}!" if match["epoch"] and int(match["epoch"]) else ""
    out += ".".join(map(str, release))
    if match["pre_l"]:
        out += f"{_PRE[match['pre_l']]}{int(match['pre_n'] or 0)}"
    if match["post_n1"] or match["post_l"]:
        out += f".post{int(match['post_n1'] or match['post_n2'] or 0)}"
    if match["dev_l"]:
        out += f".dev{int(match['dev_n'] or 0)}"
    if match["local"]:
        parts = re.split(r"[-_.]", match["local"])
        out += "+" + ".".join(str(int(p)) if p.isdigit() else p for p in parts)
    return out


# Anchoring.


def anchor(
    distributions: Sequence[Distribution], wheels_dir: str, lock: Lock, digests: Mapping[str, bytes]
) -> Anchoring:
    """Match each distribution to its wheel in `wheels_dir`, check the wheel against `lock`, and
    compare what is installed now (`digests`: absolute location -> raw SHA-256) with the wheel's
    RECORD. Only a wheels directory that cannot be listed raises (UsageError naming it)."""
    allowed: dict[tuple[str, str], set[str]] = {}
    for pin, values in lock.hashes.items():
        name, _, version = pin.partition("==")
        allowed.setdefault((normalize_name(name), canonical_version(version)), set()).update(values)
    wheels = _wheels_by_dist(wheels_dir)
    wheel_digests: dict[str, str | OSError] = {}
    expected: dict[str, bytes] = {}
    anchors: dict[str, str] = {}
    findings: list[EnvFinding] = []
    for dist in distributions:
        ident = (dist.key, canonical_version(dist.version))
        label = f"{dist.name} {dist.version}"
        if ident not in allowed:
            findings.append(
                _finding(
                    "anchor-missing-wheel",
                    Severity.HIGH,
                    dist.meta_dir,
                    f"{label} is installed but the lock file does not pin it, so its files cannot be "
                    "anchored in a wheel and only its installed RECORD vouches for them",
                    f"add {dist.key}=={dist.version} with its --hash to the lock, or uninstall it",
                    dist,
                )
            )
            continue
        candidates = wheels.get(ident, [])
        if not candidates:
            findings.append(
                _finding(
                    "anchor-missing-wheel",
                    Severity.HIGH,
                    dist.meta_dir,
                    f"no wheel of {label} is in {wheels_dir}, so its files cannot be anchored and only its "
                    "installed RECORD vouches for them",
                    f"download the locked wheel into {wheels_dir} (pip download --require-hashes "
                    "--no-deps) and snapshot again",
                    dist,
                )
            )
            continue
        accepted: list[tuple[str, str]] = []
        for wheel in candidates:
            if wheel not in wheel_digests:
                wheel_digests[wheel] = _sha256_file(wheel)
            digest = wheel_digests[wheel]
            if isinstance(digest, OSError):
                findings.append(
                    _finding(
                        "anchor-wheel-unreadable",
                        Severity.HIGH,
                        wheel,
                        f"the wheel of {label} cannot be read ({digest.strerror or digest}), so the "
                        "distribution is not anchored",
                        "make the wheel readable, or download it again, and snapshot again",
                        dist,
                    )
                )
            elif digest in allowed[ident]:
                accepted.append((wheel, digest))
            else:
                findings.append(
                    _finding(
                        "anchor-wheel-hash",
                        Severity.CRITICAL,
                        wheel,
                        f"this wheel of {label} has SHA-256 {digest}, which the lock file does not allow: "
                        "it is not the build that was locked (swapped or corrupted)",
                        "find out where this wheel came from, delete it, download the locked one with "
                        "pip download --require-hashes, and snapshot again",
                        dist,
                    )
                )
        if not accepted:
            continue
        best: tuple[int, str, str, dict[str, bytes], list[EnvFinding]] | None = None
        record_findings: list[EnvFinding] = []
        for wheel, digest in accepted:
            rows = _wheel_record(wheel, dist, record_findings)
            if rows is None:
                continue
            wanted, found = _compare(dist, wheel, rows, digests)
            bad = sum(f.severity is Severity.CRITICAL for f in found)
            if best is None or bad < best[0]:
                best = (bad, wheel, digest, wanted, found)
        if best is None:
            findings += record_findings
            continue
        _, wheel, digest, wanted, found = best
        findings += [f for f in record_findings if f.path == wheel]
        expected.update(wanted)
        anchors[dist.key] = f"sha256:{digest}"
        findings += found
    findings.sort(key=EnvFinding.sort_key)
    return Anchoring(expected=expected, anchors=anchors, findings=findings)


def _finding(
    kind: str, severity: Severity, path: str, message: str, advice: str, dist: Distribution
) -> EnvFinding:
    return EnvFinding(kind, severity, path, message, advice, dist.name)


def _wheels_by_dist(wheels_dir: str) -> dict[tuple[str, str], list[str]]:
    """Wheel files by (normalised name, canonical version), from `{name}-{version}(-{build})?-{python}-
    {abi}-{platform}.whl` (PEP 427/491); other files are ignored."""
    root = os.path.abspath(wheels_dir)
    try:
        with os.scandir(root) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(".whl") and e.is_file())
    except OSError as exc:
        raise UsageError(f"cannot list wheel directory {wheels_dir}: {exc.strerror or exc}") from None
    found: dict[tuple[str, str], list[str]] = {}
    for name in names:
        parts = name[: -len(".whl")].split("-")
        if len(parts) not in (5, 6) or not all(parts):
            continue
        key = (normalize_name(parts[0]), canonical_version(parts[1]))
        found.setdefault(key, []).append(os.path.join(root, name))
    return found


def _sha256_file(path: str) -> str | OSError:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        return exc
    return digest.hexdigest()


def _wheel_record(wheel: str, dist: Distribution, findings: list[EnvFinding]) -> tuple[RecordRow, ...] | None:
    """The rows of the wheel's `*.dist-info/RECORD`, located relative to the distribution's site
    directory (not yet mapped from `.data/`), or None with a finding naming the wheel."""

    def unusable(what: str) -> None:
        findings.append(
            _finding(
                "anchor-wheel-unreadable",
                Severity.HIGH,
                wheel,
                f"the locked wheel of {dist.name} {dist.version} cannot be used: {what}; the distribution "
                "is not anchored",
                "download the locked wheel again and snapshot again; if it still fails, report the wheel",
                dist,
            )
        )

    try:
        with zipfile.ZipFile(wheel) as archive:
            records = [
                info
                for info in archive.infolist()
                if info.filename.count("/") == 1 and info.filename.endswith(".dist-info/RECORD")
            ]
            mine = [i for i in records if normalize_name(i.filename.split("-")[0]) == dist.key]
            if len(mine) != 1:
                unusable(f"it holds {len(mine) or 'no'} {dist.key} .dist-info/RECORD")
                return None
            info = mine[0]
            if info.file_size > RECORD_CAP:
                unusable(f"its RECORD declares {info.file_size} bytes, over the {RECORD_CAP}-byte limit")
                return None
            with archive.open(info) as member:
                data = member.read(RECORD_CAP + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        unusable(f"it is not a valid zip ({exc})")
        return None
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zlib.error) as exc:
        # Unsupported compression or encryption, a truncated member, a stream zlib rejects.
        unusable(f"it cannot be read ({type(exc).__name__}: {exc})")
        return None
    if len(data) > RECORD_CAP:
        unusable(f"its RECORD is larger than the {RECORD_CAP}-byte limit")
        return None
    problems = _Problems()
    rows = _parse_record(data, f"{wheel}:{info.filename}", dist.site_dir, problems)
    if problems.items:
        shown = "; ".join(problems.items[:3]) + (" ..." if len(problems.items) > 3 else "")
        unusable(f"its RECORD is malformed ({shown})")
        return None
    return rows


def _compare(
    dist: Distribution, wheel: str, rows: tuple[RecordRow, ...], digests: Mapping[str, bytes]
) -> tuple[dict[str, bytes], list[EnvFinding]]:
    """The digests the wheel expects, and how the installed files and RECORD differ from them."""
    label = f"{dist.name} {dist.version}"
    site = dist.site_dir
    installed = {row.location: row for row in dist.records}
    wanted: dict[str, bytes] = {}
    findings: list[EnvFinding] = []
    unusable: list[str] = []
    reinstall = f"reinstall {dist.key}=={dist.version} from the locked wheel (pip install --force-reinstall "
    reinstall += "--no-deps), find out who changed it, and snapshot again"
    for row in rows:
        parts = row.path.split("/")
        if parts[0].endswith(".data") and len(parts) >= 3:
            if parts[1] in _RELOCATED:
                continue
            if parts[1] not in ("purelib", "platlib"):
                unusable.append(f"{row.path} (unknown scheme {parts[1]!r})")
                continue
            location = os.path.normpath(os.path.join(site, *parts[2:]))
        else:
            location = row.location
        if parts[0].endswith(".dist-info") and len(parts) == 2 and parts[1] in _UNHASHED_OK | _PIP_WRITTEN:
            continue
        if is_cached_bytecode(location):
            continue
        if row.path.startswith("/") or not location.startswith(site.rstrip(os.sep) + os.sep):
            unusable.append(f"{row.path} (outside site-packages)")
            continue
        if row.algorithm != "sha256" or row.digest is None:
            unusable.append(f"{row.path} (no sha256 digest)")
            continue
        wanted[location] = row.digest
        now = digests.get(location)
        if now is None:
            findings.append(
                _finding(
                    "anchor-missing",
                    Severity.HIGH,
                    location,
                    f"the locked wheel of {label} installs this file, but it is not there (deleted) or "
                    "could not be read",
                    reinstall,
                    dist,
                )
            )
        elif now != row.digest:
            findings.append(
                _finding(
                    "anchor-mismatch",
                    Severity.CRITICAL,
                    location,
                    f"differs from the file in the locked wheel of {label}: it was changed after "
                    "installation",
                    reinstall,
                    dist,
                )
            )
        mine = installed.get(location)
        if mine is None:
            findings.append(
                _finding(
                    "anchor-record-rewritten",
                    Severity.CRITICAL,
                    location,
                    f"the locked wheel of {label} installs this file, but the installed RECORD does not "
                    "list it: the RECORD was edited to hide the file from RECORD checks",
                    reinstall,
                    dist,
                )
            )
        elif mine.algorithm == "sha256" and mine.digest is not None and mine.digest != row.digest:
            matches_now = now is not None and mine.digest == now
            findings.append(
                _finding(
                    "anchor-record-rewritten",
                    Severity.CRITICAL,
                    location,
                    f"the installed RECORD of {label} gives this file a different digest than the locked "
                    "wheel does"
                    + (
                        ", rewritten to match the changed file so that RECORD checks see nothing"
                        if matches_now
                        else ": the RECORD was edited"
                    ),
                    reinstall,
                    dist,
                )
            )
    meta = os.path.basename(dist.meta_dir)
    for location in installed:
        if location in wanted or is_cached_bytecode(location):  # a row without a hash hides a file too
            continue
        if not location.startswith(site.rstrip(os.sep) + os.sep):
            continue  # console scripts, headers, data: written or relocated by pip
        rel = os.path.relpath(location, site).split(os.sep)
        if len(rel) == 2 and rel[0] == meta and rel[1] in _PIP_WRITTEN:
            continue
        findings.append(
            _finding(
                "anchor-record-rewritten",
                Severity.CRITICAL,
                location,
                f"the installed RECORD of {label} lists this file but the locked wheel does not install "
                "it: it was added to the RECORD after installation",
                f"remove it, reinstall {dist.key}=={dist.version} from the locked wheel, and find out who "
                "added it",
                dist,
            )
        )
    if unusable:
        shown = ", ".join(unusable[:3]) + (f" and {len(unusable) - 3} more" if len(unusable) > 3 else "")
        findings.append(
            _finding(
                "anchor-wheel-unreadable",
                Severity.MEDIUM,
                wheel,
                f"{len(unusable)} RECORD rows of the locked wheel of {label} cannot anchor a file: {shown}; "
                "those files are vouched for by the installed RECORD only",
                "check the wheel's RECORD; if the wheel is the locked one, report it to its maintainers",
                dist,
            )
        )
    return wanted, findings
