"""Verify an environment from outside it: read its files, never import or run them.

Against a signed baseline, every file of the environment (the venv, the base interpreter's standard
library and binary) must have the digest the baseline recorded; files the baseline does not know, files
it knows that are gone, changed links, new or changed distributions and entry points, and injection
points that were not there are findings. Without a baseline, each distribution's RECORD is the
reference: that finds an edited file whose RECORD row was left alone, deleted files and unrecorded files
in site-packages, but not a file edited together with its RECORD row, nor changes to the standard
library; the report says so.

Cached bytecode (`__pycache__/*.pyc`) is not judged by digest, since Python and pip write it whenever they
like: a .pyc is checked against its verified source by compiling that source here and comparing code
(`_pyc`). One whose header matches its source but whose code does not is a replaced .pyc.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pwd
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from trainguard.envcheck._baseline import Baseline, DistInfo, environment_digest
from trainguard.envcheck._dists import Distribution, read_distributions
from trainguard.envcheck._findings import EnvFinding
from trainguard.envcheck._hashing import sha256_files
from trainguard.envcheck._injection import find_injections
from trainguard.envcheck._layout import Layout
from trainguard.envcheck._pyc import check_pyc, pyc_source
from trainguard.envcheck._quick import QuickCache
from trainguard.envcheck._walk import (
    Entry,
    StatKey,
    entry_of,
    environment_roots,
    inventory,
    is_cached_bytecode,
)
from trainguard.findings import Severity

__all__ = ["EnvReport", "Survey", "survey", "verify_against_baseline", "verify_against_records"]

Progress = Callable[[str], None]

# Files `python -m venv` writes to bin/ that no distribution records; a baseline checks their content.
_VENV_BIN_FILE = re.compile(r"python(3(\.\d+)?)?|activate(\.(csh|fish|nu|bat|ps1))?|Activate\.ps1")
# Files a RECORD lists without a hash by design: itself, and its signatures.
_UNHASHED_OK = (".dist-info/RECORD", ".dist-info/RECORD.jws", ".dist-info/RECORD.p7s")
_CODE_SUFFIXES = (".py", ".pyc", ".so", ".pth", ".pyd", ".dylib")


@dataclasses.dataclass
class Survey:
    """What is on disk: entries, digests of regular files, distributions and injection points."""

    layout: Layout
    entries: dict[str, Entry]
    by_location: dict[str, Entry]
    digests: dict[str, str]  # path -> sha256 hex, regular files (cached bytecode included)
    unreadable: dict[str, tuple[str, str]]  # path -> (location, why)
    distributions: list[Distribution]
    injections: list[EnvFinding]
    roots: dict[str, str]
    hashed: int = 0
    cached: int = 0
    hashed_bytes: int = 0
    from_cache: set[str] = dataclasses.field(default_factory=set)  # files the cache vouched for
    records_read: bool = True  # whether `distributions` carry their RECORD rows

    def with_records(self) -> list[Distribution]:
        """The distributions with their RECORD rows, read now if the survey skipped them."""
        if not self.records_read:
            sites = [site for site in self.layout.site_dirs if os.path.isdir(site)]
            self.distributions = [d for site in sites for d in read_distributions(site)]
            self.records_read = True
        return self.distributions


@dataclasses.dataclass
class EnvReport:
    """The outcome of one verification."""

    prefix: str
    mode: str  # "full" or "quick"
    reference: str  # "baseline" or "records"
    digest: str  # of the environment as found
    baseline_digest: str | None
    findings: list[EnvFinding]
    undecided: list[EnvFinding]
    accepted: list[EnvFinding]
    limitations: list[str]
    files: int
    hashed: int
    cached: int
    bytecode_checked: int
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.findings and not self.undecided

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "mode": self.mode,
            "reference": self.reference,
            "ok": self.ok,
            "digest": self.digest,
            "baseline_digest": self.baseline_digest,
            "findings": [f.to_json() for f in self.findings],
            "undecided": [f.to_json() for f in self.undecided],
            "accepted": [f.to_json() for f in self.accepted],
            "limitations": self.limitations,
            "files": self.files,
            "hashed": self.hashed,
            "cached": self.cached,
            "bytecode_checked": self.bytecode_checked,
            "seconds": round(self.seconds, 3),
        }


def survey(
    layout: Layout,
    environ: Mapping[str, str],
    *,
    cache: QuickCache | None = None,
    expected: Mapping[str, str] | None = None,
    records: bool = True,
    progress: Progress | None = None,
) -> Survey:
    """Walk and hash the environment. With a cache, a file whose stat is unchanged since it was found
    clean keeps its cached digest (if `expected` is given, only when that digest is the expected one)."""
    roots = environment_roots(layout)
    entries, problems = inventory(roots)
    by_location = {entry.location: entry for entry in entries.values()}
    digests: dict[str, str] = {}
    todo: list[Entry] = []
    from_cache: set[str] = set()
    rows = cache.entries if cache is not None else {}
    wanted = expected if expected is not None else {}
    # The hot loop of a quick check: one pass, no calls for files the cache vouches for.
    for path, entry in entries.items():
        if entry.kind != "file":
            continue
        row = rows.get(path)
        key = entry.key
        if row is not None and row[4] == key[4] and row[3] == key[3] and row[:3] == key[:3]:
            known = row[5].hex()
            if expected is None or wanted.get(path) == known or is_cached_bytecode(path):
                digests[path] = known
                from_cache.add(path)
                continue
        todo.append(entry)
    sizes = {e.location: e.size for e in todo}
    found = sha256_files(
        [entry.location for entry in todo],
        sizes=sizes,
        done=_hash_progress(progress, len(todo), sum(sizes.values()))
        if progress is not None and todo
        else None,
    )
    unreadable = {location: (location, why) for location, why in problems}
    for entry in todo:
        result = found[entry.location]
        if isinstance(result, OSError):
            unreadable[entry.path] = (entry.location, str(result.strerror or result))
        else:
            digests[entry.path] = result.hex()
    sites = [site for site in layout.site_dirs if os.path.isdir(site)]
    distributions = [d for site in sites for d in read_distributions(site, records=records)]
    injections = find_injections(layout, distributions, environ)
    return Survey(
        layout=layout,
        entries=entries,
        by_location=by_location,
        digests=digests,
        unreadable=unreadable,
        distributions=distributions,
        injections=injections,
        roots={root.label: root.path for root in roots},
        hashed=len(todo),
        cached=len(from_cache),
        hashed_bytes=sum(entry.size for entry in todo),
        from_cache=from_cache,
        records_read=records,
    )


_PROGRESS_EVERY_S = 2.0


def _hash_progress(progress: Progress, files: int, size: int) -> Callable[[int, int], None]:
    """Says what is being hashed, then how far it got and how fast, every couple of seconds."""
    progress(f"hashing {files} files ({size / 2**20:.0f} MiB) not seen unchanged since the last clean check")
    start = last = time.monotonic()

    def done(count: int, hashed: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < _PROGRESS_EVERY_S and count < files:
            return
        last = now
        rate = hashed / 2**20 / max(now - start, 1e-6)
        progress(f"hashed {count} of {files} files, {hashed / 2**20:.0f} MiB, {rate:.0f} MiB/s")

    return done


def _owner(entry: Entry) -> str:
    try:
        user = pwd.getpwuid(entry.uid).pw_name
    except KeyError:
        user = f"uid {entry.uid}"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.key[3] / 1e9))
    return f"owner {user}, modified {when}"


def _dist_of(survey_: Survey) -> dict[str, Distribution]:
    """Which distribution records each file, by path."""
    owners: dict[str, Distribution] = {}
    for dist in survey_.with_records():
        for row in dist.records:
            entry = survey_.by_location.get(row.location)
            if entry is not None:
                owners[entry.path] = dist
    return owners


def _reinstall(dist: Distribution | None) -> str:
    if dist is None:
        return "restore it from a trusted copy"
    pin = f"{dist.name}=={dist.version}"
    return f"reinstall it from a trusted index (pip install --force-reinstall --no-deps '{pin}')"


def _bytecode_findings(
    survey_: Survey,
    verified_sources: Callable[[str], bool],
    known: Mapping[str, str],
    progress: Progress | None,
) -> tuple[list[EnvFinding], list[EnvFinding], int, set[str]]:
    """Check each cached .pyc whose source is verified: equal to its known digest, or compiled from the
    source. Returns findings, undecided, how many were compiled, and the paths found good."""
    findings: list[EnvFinding] = []
    undecided: list[EnvFinding] = []
    good: set[str] = set()
    todo = []
    for path, entry in survey_.entries.items():
        if entry.kind != "file" or not is_cached_bytecode(path):
            continue
        digest = survey_.digests.get(path)
        if path in survey_.from_cache or (digest is not None and known.get(path) == digest):
            good.add(path)  # found good before, unchanged since
            continue
        source = pyc_source(entry.location)
        if source is None:
            continue  # another interpreter's cache tag: this interpreter never loads it
        source_path, optimize = source
        source_entry = survey_.by_location.get(source_path)
        if source_entry is None or not verified_sources(source_entry.path):
            continue  # no source (Python ignores the .pyc) or the source itself is already a finding
        todo.append((path, entry, source_path, optimize))
    if progress is not None and todo:
        progress(f"comparing {len(todo)} cached bytecode files with their sources")
    if tuple(survey_.layout.version) != sys.version_info[:2]:
        major, minor = survey_.layout.version
        undecided.append(
            EnvFinding(
                "bytecode-unchecked",
                Severity.LOW,
                survey_.layout.prefix,
                f"the environment runs Python {major}.{minor}; this Python {sys.version_info[0]}."
                f"{sys.version_info[1]} cannot compile its sources the same way, so its cached bytecode "
                "was not compared with them",
                f"verify with a trusted Python {major}.{minor} interpreter, or pass --no-bytecode",
            )
        )
    for path, entry, source_path, optimize in todo:
        verdict = check_pyc(entry.location, source_path, optimize)
        if verdict.status in ("ok", "stale"):
            good.add(path)
        elif verdict.status == "mismatch":
            findings.append(
                EnvFinding(
                    "pyc-mismatch",
                    Severity.CRITICAL,
                    entry.location,
                    f"cached bytecode that Python will run instead of {os.path.basename(source_path)}, but "
                    f"compiled from other code ({verdict.detail}; {_owner(entry)})",
                    "delete it (Python recompiles it from the verified source) and find who replaced it",
                )
            )
        elif verdict.status == "foreign":
            good.add(path)  # another Python version's magic: this interpreter does not load it
        else:
            undecided.append(
                EnvFinding(
                    "pyc-undecided",
                    Severity.MEDIUM,
                    entry.location,
                    f"cached bytecode that could not be compared with its source: {verdict.detail}",
                    "delete it (Python recompiles it) and verify again",
                )
            )
    return findings, undecided, len(todo), good


def _unreadable_findings(survey_: Survey) -> list[EnvFinding]:
    return [
        EnvFinding(
            "unreadable",
            Severity.HIGH,
            location,
            f"could not be read, so it could not be verified: {why}",
            "make it readable to this user and verify again",
        )
        for location, why in survey_.unreadable.values()
    ]


def _report(
    survey_: Survey,
    *,
    mode: str,
    reference: str,
    baseline_digest: str | None,
    findings: list[EnvFinding],
    undecided: list[EnvFinding],
    accepted: list[EnvFinding],
    limitations: list[str],
    compiled: int,
    digest: str | None = None,
) -> EnvReport:
    return EnvReport(
        prefix=survey_.layout.prefix,
        mode=mode,
        reference=reference,
        digest=digest or current_digest(survey_),
        baseline_digest=baseline_digest,
        findings=sorted(findings, key=EnvFinding.sort_key),
        undecided=sorted(undecided, key=EnvFinding.sort_key),
        accepted=sorted(accepted, key=EnvFinding.sort_key),
        limitations=limitations,
        files=sum(1 for e in survey_.entries.values() if e.kind == "file"),
        hashed=survey_.hashed,
        cached=survey_.cached,
        bytecode_checked=compiled,
    )


def current_digest(survey_: Survey) -> str:
    files, links = _content(survey_)
    return environment_digest(files, links, dist_infos(survey_.distributions))


def _content(survey_: Survey) -> tuple[dict[str, tuple[int, str]], dict[str, str]]:
    files = {
        path: (entry.size, survey_.digests[path])
        for path, entry in survey_.entries.items()
        if entry.kind == "file" and path in survey_.digests and not is_cached_bytecode(path)
    }
    links = {path: entry.target or "" for path, entry in survey_.entries.items() if entry.kind == "link"}
    return files, links


def dist_infos(distributions: Iterable[Distribution]) -> dict[str, DistInfo]:
    return {
        dist.key: DistInfo(
            dist.version,
            tuple(sorted((ep.group, ep.name, ep.value) for ep in dist.entry_points)),
            dist.editable,
        )
        for dist in distributions
    }


def baseline_from(
    survey_: Survey,
    report: EnvReport,
    created: str,
    *,
    anchored: Mapping[str, bytes] | None = None,
    anchors: Mapping[str, str] | None = None,
) -> Baseline:
    """A baseline of what the survey found. Cached bytecode is recorded as found, except files the
    report names: bytecode of RECORD-verified sources was compared with them; the rest (the standard
    library's) is taken on trust, as the standard library's sources are. `anchored` (location -> digest
    from the wheels' own RECORDs) replaces what is installed, so a file already altered is still one."""
    files, links = _content(survey_)
    for location, digest in (anchored or {}).items():
        entry = survey_.by_location.get(location)
        if entry is not None and entry.path in files:
            files[entry.path] = (files[entry.path][0], digest.hex())
    layout = survey_.layout
    named = {f.path for f in (*report.findings, *report.undecided)}
    bytecode = {
        path: survey_.digests[path]
        for path, entry in survey_.entries.items()
        if is_cached_bytecode(path) and path in survey_.digests and entry.location not in named
    }
    return Baseline(
        layout={
            "prefix": layout.prefix,
            "base_prefix": layout.base_prefix,
            "version": list(layout.version),
            "is_venv": layout.is_venv,
            "system_site": layout.system_site,
        },
        roots=survey_.roots,
        files=files,
        links=links,
        bytecode=bytecode,
        distributions={
            key: dataclasses.replace(info, anchor=(anchors or {}).get(key))
            for key, info in dist_infos(survey_.distributions).items()
        },
        injections=tuple(sorted({(f.kind, f.path) for f in survey_.injections if f.kind != "env-var"})),
        created=created,
    )


# Against RECORD files.


def verify_against_records(
    survey_: Survey, *, mode: str, check_bytecode: bool = True, progress: Progress | None = None
) -> tuple[EnvReport, set[str]]:
    """Check every distribution's RECORD; inventory unrecorded files in site-packages and bin/."""
    findings: list[EnvFinding] = []
    undecided = _unreadable_findings(survey_)
    recorded: set[str] = set()
    bad: set[str] = set()
    layout = survey_.layout
    for dist in survey_.distributions:
        for problem in dist.problems:
            undecided.append(
                EnvFinding(
                    "record-problem",
                    Severity.MEDIUM,
                    dist.meta_dir,
                    f"the metadata of {dist.name} cannot be fully read: {problem}",
                    _reinstall(dist),
                    dist.name,
                )
            )
        for row in dist.records:
            entry = survey_.by_location.get(row.location)
            # In a wheel's RECORD a row without a hash vouches for nothing (the file stays unrecorded);
            # an egg-info's file list has no hashes at all: its files are owned, and unverifiable.
            hashless_ok = (
                not dist.has_record or is_cached_bytecode(row.location) or row.location.endswith(_UNHASHED_OK)
            )
            if row.digest is None and not hashless_ok:
                continue
            if entry is not None:
                recorded.add(entry.path)
            if row.digest is None:
                continue
            if entry is None:
                outside = _outside(row.location, survey_)
                if outside is None:
                    findings.append(
                        EnvFinding(
                            "missing",
                            Severity.HIGH,
                            row.location,
                            f"installed by {dist.name} {dist.version} and listed in its RECORD, but deleted",
                            _reinstall(dist),
                            dist.name,
                        )
                    )
                    continue
                entry = outside
            digest = survey_.digests.get(entry.path)
            if digest is None:
                continue  # unreadable: already undecided
            if row.algorithm == "sha256":
                matches = bytes.fromhex(digest) == row.digest
            else:
                matches = _other_digest(entry.location, row.algorithm) == row.digest
            if not matches:
                bad.add(entry.path)
                findings.append(
                    EnvFinding(
                        "modified",
                        Severity.CRITICAL,
                        entry.location,
                        f"differs from what {dist.name} {dist.version} installed (its RECORD digest); "
                        f"{_owner(entry)}",
                        _reinstall(dist),
                        dist.name,
                    )
                )
    site_dirs = tuple(d.rstrip(os.sep) + os.sep for d in layout.site_dirs)
    bin_dir = layout.bin_dir.rstrip(os.sep) + os.sep
    for path, entry in survey_.entries.items():
        if path in recorded or is_cached_bytecode(path):
            continue
        location = entry.location
        if location.startswith(site_dirs):
            findings.append(_unexpected(entry, "in site-packages but recorded by no installed distribution"))
        elif layout.is_venv and location.startswith(bin_dir):
            name = os.path.basename(location)
            if not _VENV_BIN_FILE.fullmatch(name):
                findings.append(
                    _unexpected(entry, "in the environment's bin/ but installed by no distribution")
                )
    verified = {path for path in recorded if path not in bad}
    compiled = 0
    good: set[str] = set()
    limitations = [
        "without a baseline, a file edited together with its RECORD row looks genuine (take a baseline "
        "with `trainguard env snapshot`)",
        "without a baseline, the standard library, the interpreter and files outside site-packages and "
        "bin/ are not verified",
    ]
    if check_bytecode:
        extra, more_undecided, compiled, good = _bytecode_findings(
            survey_, verified.__contains__, {}, progress
        )
        findings += extra
        undecided += more_undecided
    else:
        limitations.append("cached bytecode was not compared with its sources (--no-bytecode)")
    egg = [d.name for d in survey_.distributions if not d.has_record]
    if egg:
        limitations.append(f"distributions without a RECORD cannot be checked: {', '.join(egg)}")
    findings += survey_.injections
    report = _report(
        survey_,
        mode=mode,
        reference="records",
        baseline_digest=None,
        findings=findings,
        undecided=undecided,
        accepted=[],
        limitations=limitations,
        compiled=compiled,
    )
    clean = verified | good
    return report, clean


def _outside(location: str, survey_: Survey) -> Entry | None:
    """A file a RECORD installed outside the environment's roots (a console script in /usr/bin, say),
    hashed now and added to the survey; None if it does not exist."""
    if any(
        location == root or location.startswith(root.rstrip(os.sep) + os.sep)
        for root in survey_.roots.values()
    ):
        return None  # inside a root: the walk would have seen it
    try:
        st = os.lstat(location)
    except OSError:
        return None
    entry = entry_of(location, location, st)
    survey_.entries[entry.path] = entry
    survey_.by_location[location] = entry
    if entry.kind == "file":
        found = sha256_files([location])[location]
        if isinstance(found, OSError):
            survey_.unreadable[location] = (location, str(found.strerror or found))
        else:
            survey_.digests[location] = found.hex()
    return entry


def _other_digest(location: str, algorithm: str | None) -> bytes | None:
    if algorithm not in {"sha384", "sha512", "sha3_256", "blake2b"}:
        return None
    try:
        with open(location, "rb") as handle:
            return hashlib.file_digest(handle, algorithm).digest()
    except OSError:
        return None


def _unexpected(entry: Entry, where: str) -> EnvFinding:
    code = entry.location.endswith(_CODE_SUFFIXES) or (entry.executable and entry.kind == "file")
    kind = {"file": "unexpected", "link": "unexpected-link"}.get(entry.kind, "unexpected-special")
    what = f"a link to {entry.target}" if entry.kind == "link" else "a file"
    return EnvFinding(
        kind,
        Severity.HIGH if code or entry.kind != "file" else Severity.MEDIUM,
        entry.location,
        f"{what} {where}; {_owner(entry)}",
        "find out who put it there and remove it, or install it as a package",
    )


# Against a baseline.


def verify_against_baseline(
    survey_: Survey,
    baseline: Baseline,
    *,
    mode: str,
    check_bytecode: bool = True,
    progress: Progress | None = None,
) -> tuple[EnvReport, set[str]]:
    """Compare what is on disk with the signed baseline."""
    findings: list[EnvFinding] = []
    undecided = _unreadable_findings(survey_)
    files_before, links_before, digests = baseline.files, baseline.links, survey_.digests
    suspects: list[str] = []
    for path, entry in survey_.entries.items():  # the fast pass: tens of thousands of equal entries
        if entry.kind == "file":
            before = files_before.get(path)
            if before is not None:
                digest = digests.get(path)
                if digest is None or digest == before[1]:
                    continue  # equal, or unreadable (undecided already)
            elif is_cached_bytecode(path):
                continue
        elif entry.kind == "link" and links_before.get(path, "\0") == entry.target:
            continue
        suspects.append(path)
    missing = [p for p in files_before if p not in survey_.entries]
    missing += [p for p in links_before if p not in survey_.entries]
    bad = set(suspects)
    owners = _dist_of(survey_) if suspects else {}
    records = (
        {
            survey_.by_location[row.location].path: row
            for dist in survey_.distributions
            for row in dist.records
            if row.location in survey_.by_location and row.digest is not None
        }
        if suspects
        else {}
    )
    for path in suspects:
        entry = survey_.entries[path]
        dist = owners.get(path)
        name = dist.name if dist is not None else None
        if entry.kind == "file" and path in files_before:
            digest = digests[path]
            row = records.get(path)
            rewritten = row is not None and row.algorithm == "sha256" and row.digest == bytes.fromhex(digest)
            how = (
                "its RECORD row was rewritten to match, so pip and RECORD checks see nothing"
                if rewritten
                else "RECORD disagrees too"
                if row is not None
                else "no RECORD lists it"
            )
            findings.append(
                EnvFinding(
                    "modified",
                    Severity.CRITICAL,
                    entry.location,
                    f"differs from the baseline ({how}); {_owner(entry)}",
                    _reinstall(dist),
                    name,
                )
            )
        elif entry.kind == "link" and path in links_before:
            findings.append(
                EnvFinding(
                    "link-changed",
                    Severity.HIGH,
                    entry.location,
                    f"now points to {entry.target}, the baseline says {links_before[path]}",
                    "restore the link, or take a new baseline if the change was intended",
                    name,
                )
            )
        elif path in files_before or path in links_before:
            findings.append(
                EnvFinding(
                    "type-changed",
                    Severity.HIGH,
                    entry.location,
                    f"was a {'file' if path in files_before else 'link'}, is now a {entry.kind}",
                    _reinstall(dist),
                    name,
                )
            )
        else:
            findings.append(_unexpected(entry, "not in the baseline"))
    roots = survey_.roots
    for path in missing:
        label, _, rel = path.partition("/")
        root = roots.get(label, baseline.roots.get(label, label))
        location = os.path.join(root, rel) if rel else root
        findings.append(
            EnvFinding(
                "missing",
                Severity.HIGH,
                location,
                "in the baseline but deleted",
                "restore it (reinstall the distribution it belongs to), and find out who deleted it",
            )
        )
    changed_distributions = _distribution_changes(survey_, baseline)
    findings += changed_distributions
    unchanged = not suspects and not missing and not changed_distributions
    accepted_keys = set(baseline.injections)
    accepted: list[EnvFinding] = []
    for finding in survey_.injections:
        if (finding.kind, finding.path) in accepted_keys and not _is_bad_location(finding.path, survey_, bad):
            accepted.append(finding)
        else:
            findings.append(finding)
    compiled = 0
    good: set[str] = set()
    limitations: list[str] = []
    if check_bytecode:
        verified = {p for p in baseline.files if p not in bad}
        extra, more_undecided, compiled, good = _bytecode_findings(
            survey_, verified.__contains__, baseline.bytecode, progress
        )
        findings += extra
        undecided += more_undecided
    else:
        limitations.append("cached bytecode was not compared with its sources (--no-bytecode)")
    report = _report(
        survey_,
        mode=mode,
        reference="baseline",
        baseline_digest=baseline.digest,
        digest=baseline.digest if unchanged else None,  # every file, link and version as recorded
        findings=findings,
        undecided=undecided,
        accepted=accepted,
        limitations=limitations,
        compiled=compiled,
    )
    clean = {p for p in baseline.files if p in survey_.digests and p not in bad} | good
    return report, clean


def _is_bad_location(location: str, survey_: Survey, bad: set[str]) -> bool:
    entry = survey_.by_location.get(location)
    return entry is not None and entry.path in bad


def _distribution_changes(survey_: Survey, baseline: Baseline) -> list[EnvFinding]:
    findings: list[EnvFinding] = []
    now = {dist.key: dist for dist in survey_.distributions}
    for key, dist in now.items():
        before = baseline.distributions.get(key)
        points = tuple(sorted((ep.group, ep.name, ep.value) for ep in dist.entry_points))
        if before is None:
            findings.append(
                EnvFinding(
                    "distribution-added",
                    Severity.HIGH,
                    dist.meta_dir,
                    f"{dist.name} {dist.version}".rstrip() + " was installed after the baseline",
                    "uninstall it, or take a new baseline if it was installed on purpose",
                    dist.name,
                )
            )
        elif before.version != dist.version:
            findings.append(
                EnvFinding(
                    "distribution-changed",
                    Severity.HIGH,
                    dist.meta_dir,
                    f"{dist.name} is {dist.version} now, {before.version} in the baseline",
                    f"reinstall {dist.name}=={before.version}, or take a new baseline",
                    dist.name,
                )
            )
        elif before.entry_points != points:
            added = sorted(set(points) - set(before.entry_points))
            shown = ", ".join(f"{g}: {n} = {v}" for g, n, v in added) or "some were removed"
            findings.append(
                EnvFinding(
                    "entry-points-changed",
                    Severity.HIGH,
                    dist.meta_dir,
                    f"{dist.name}'s entry points changed since the baseline ({shown})",
                    _reinstall(dist),
                    dist.name,
                )
            )
    for key, before in baseline.distributions.items():
        if key not in now:
            findings.append(
                EnvFinding(
                    "distribution-removed",
                    Severity.MEDIUM,
                    key,
                    f"{key} {before.version} is in the baseline but no longer installed",
                    f"reinstall {key}=={before.version}, or take a new baseline",
                    key,
                )
            )
    return findings


def clean_stat(survey_: Survey, clean: set[str]) -> dict[str, tuple[StatKey, str]]:
    """What the quick cache keeps: the stat and digest of every file found clean."""
    return {
        path: (survey_.entries[path].key, survey_.digests[path]) for path in clean if path in survey_.digests
    }
