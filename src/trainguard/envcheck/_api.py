"""The library entry points: take a baseline of an environment, verify one.

from trainguard.envcheck import snapshot_environment, verify_environment
baseline, report = snapshot_environment(prefix="/opt/venvs/train")
report = verify_environment(prefix="/opt/venvs/train", baseline=baseline)
assert report.ok, report.findings
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path

from trainguard.envcheck._anchor import anchor, read_lock
from trainguard.envcheck._baseline import Baseline
from trainguard.envcheck._findings import EnvFinding
from trainguard.envcheck._layout import Layout, resolve_layout
from trainguard.envcheck._quick import QuickCache
from trainguard.envcheck._verify import (
    EnvReport,
    Progress,
    baseline_from,
    clean_stat,
    survey,
    verify_against_baseline,
    verify_against_records,
)
from trainguard.errors import TrainguardError, UsageError

__all__ = ["snapshot_environment", "verify_environment"]


def _layout(python: str | None, prefix: str | None, environ: Mapping[str, str]) -> Layout:
    return resolve_layout(python=python, prefix=prefix, environ=environ)


def snapshot_environment(
    *,
    python: str | None = None,
    prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
    check_bytecode: bool = True,
    lock: str | None = None,
    wheels: str | None = None,
    home: Path | None = None,
    progress: Progress | None = None,
    full: bool = False,
) -> tuple[Baseline, EnvReport]:
    """A baseline of the environment as it is now, and the RECORD check made on the way (the caller
    decides whether an environment with findings may be baselined).

    With a hash-pinned `lock` file and the `wheels` it pins, each distribution's files are checked
    against the RECORD inside its wheel, whose own hash the lock fixes, and the baseline takes those
    digests: a file altered together with its installed RECORD before the snapshot is still caught.
    Unless `full`, files unchanged since the last clean check against the RECORDs (the signed cache,
    as `verify_environment` uses it) are not hashed again.
    """
    from trainguard.ledger._ledger import default_home

    if (lock is None) != (wheels is None):
        raise UsageError(
            "a lock file and a wheel directory go together", hint="pass both --lock and --wheels"
        )
    start = time.perf_counter()
    environ = os.environ if environ is None else environ
    layout = _layout(python, prefix, environ)
    records_cache = QuickCache(home or default_home(), layout.prefix, None)
    found = survey(layout, environ, cache=None if full else records_cache, progress=progress)
    report, clean = verify_against_records(
        found, mode="full" if full else "quick", check_bytecode=check_bytecode, progress=progress
    )
    if found.hashed or records_cache.rejected:
        with contextlib.suppress(TrainguardError, OSError):
            records_cache.save(clean_stat(found, clean))
    anchored: Mapping[str, bytes] | None = None
    anchors: Mapping[str, str] | None = None
    if lock is not None and wheels is not None:
        installed = {found.entries[path].location: bytes.fromhex(d) for path, d in found.digests.items()}
        anchoring = anchor(found.distributions, wheels, read_lock(lock), installed)
        anchored, anchors = anchoring.expected, anchoring.anchors
        report.findings = sorted(report.findings + anchoring.findings, key=EnvFinding.sort_key)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    baseline = baseline_from(found, report, created, anchored=anchored, anchors=anchors)
    # Everything the baseline holds was just hashed: the first verification against it can be quick.
    recorded = {path for path, (_, digest) in baseline.files.items() if found.digests.get(path) == digest}
    recorded |= {path for path, digest in baseline.bytecode.items() if found.digests.get(path) == digest}
    with contextlib.suppress(TrainguardError, OSError):  # a cache that cannot be written costs speed only
        QuickCache(home or default_home(), layout.prefix, baseline.digest).save(clean_stat(found, recorded))
    report.seconds = time.perf_counter() - start
    return baseline, report


def verify_environment(
    *,
    baseline: Baseline | None = None,
    python: str | None = None,
    prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
    full: bool = False,
    home: Path | None = None,
    check_bytecode: bool = True,
    progress: Progress | None = None,
) -> EnvReport:
    """Verify the environment against `baseline` (or its RECORDs when None).

    Unless `full`, files whose stat is unchanged since the last clean verification (the signed cache in
    `home`, default $TRAINGUARD_HOME) are not hashed again; the cache is kept per environment and
    baseline (by its environment digest).
    """
    from trainguard.ledger._ledger import default_home

    start = time.perf_counter()
    environ = os.environ if environ is None else environ
    layout = _layout(python, prefix, environ)
    binding = baseline.digest if baseline is not None else None
    cache = QuickCache(home or default_home(), layout.prefix, binding)
    expected = (
        {path: digest for path, (_, digest) in baseline.files.items()} if baseline is not None else None
    )
    # Against a baseline, RECORD rows only explain findings: they are read when there are some.
    found = survey(
        layout,
        environ,
        cache=None if full else cache,
        expected=expected,
        records=baseline is None,
        progress=progress,
    )
    mode = "full" if full else "quick"
    if baseline is None:
        report, clean = verify_against_records(
            found, mode=mode, check_bytecode=check_bytecode, progress=progress
        )
    else:
        report, clean = verify_against_baseline(
            found, baseline, mode=mode, check_bytecode=check_bytecode, progress=progress
        )
    if found.hashed or cache.rejected:
        cache.save(clean_stat(found, clean))
    report.seconds = time.perf_counter() - start
    return report
