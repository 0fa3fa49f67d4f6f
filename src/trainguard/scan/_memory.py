"""Scanning bytes already in memory: the load gate scans exactly the bytes it is about to load."""

from __future__ import annotations

from trainguard.scan.api import _result
from trainguard.scan.artifact import Artifact, Data, Scan
from trainguard.scan.dispatch import analyse
from trainguard.scan.limits import ScanLimits
from trainguard.scan.policy import Policy
from trainguard.scan.result import FileResult

__all__ = ["scan_bytes"]

_DEFAULT_LIMITS = ScanLimits()


def scan_bytes(
    data: Data, name: str, policy: Policy | None = None, limits: ScanLimits | None = None
) -> FileResult:
    """Scan `data` (bytes, or a read-only map) as if it were the file `name`. Never raises for the
    content: a failure becomes an "undecided" result, as with `scan_file`."""
    scan = Scan(name, policy or Policy.default(), limits or _DEFAULT_LIMITS)
    try:
        analyse(scan, Artifact(data, 0, len(data), name))
    finally:
        scan.close()
    return _result(scan, len(data))
