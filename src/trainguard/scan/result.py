"""The typed result of a scan."""

from __future__ import annotations

import dataclasses

from trainguard.errors import ExitCode
from trainguard.findings import Finding, Problem, Verdict

SCHEMA_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class FileResult:
    """What one file on disk turned out to be and hold."""

    path: str
    formats: tuple[str, ...]  # e.g. ("zip", "pytorch") or ("gzip", "pickle")
    verdict: Verdict
    findings: tuple[Finding, ...] = ()
    problems: tuple[Problem, ...] = ()
    size: int = 0
    note: str = ""  # why a file was skipped


@dataclasses.dataclass(frozen=True)
class ScanReport:
    """Results for every file, in a stable order."""

    results: tuple[FileResult, ...]
    errors: tuple[str, ...] = ()  # paths that could not be opened at all, with the reason

    @property
    def exit_code(self) -> int:
        if any(r.verdict is Verdict.FINDINGS for r in self.results):
            return int(ExitCode.FINDINGS)
        if self.errors or any(r.verdict is Verdict.UNDECIDED for r in self.results):
            return int(ExitCode.UNDECIDED)
        if not self.results:
            return int(ExitCode.UNDECIDED)
        return int(ExitCode.CLEAN)

    def count(self, verdict: Verdict) -> int:
        return sum(1 for r in self.results if r.verdict is verdict)
