"""Findings, severities and verdicts: the data every check produces."""

from __future__ import annotations

import dataclasses
import enum


class Severity(str, enum.Enum):
    """How bad a finding is. Only the allowlist decides *whether* something is a finding."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.CRITICAL: 4, Severity.HIGH: 3, Severity.MEDIUM: 2, Severity.LOW: 1}


class Verdict(str, enum.Enum):
    """The outcome for one artifact."""

    CLEAN = "clean"
    FINDINGS = "findings"
    UNDECIDED = "undecided"  # could not be fully analysed: never treated as clean
    SKIPPED = "skipped"  # not a serialisation format that a loader could execute


@dataclasses.dataclass(frozen=True)
class Finding:
    """One suspicious thing found in an artifact.

    `location` is the artifact path, with `!/member` for each level of nesting;
    `offset` is the byte offset inside the innermost member, when known.
    """

    rule: str
    severity: Severity
    message: str
    location: str
    offset: int | None = None

    def sort_key(self) -> tuple[int, str, int]:
        return (-self.severity.rank, self.location, self.offset if self.offset is not None else -1)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A reason the artifact could not be fully analysed (the verdict fails closed)."""

    kind: str
    message: str
    location: str
    offset: int | None = None
