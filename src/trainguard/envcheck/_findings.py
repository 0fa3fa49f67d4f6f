"""What an environment check reports: one finding per problem, each saying what it means and what to do."""

from __future__ import annotations

import dataclasses
from typing import Any

from trainguard.findings import Severity

__all__ = ["EnvFinding"]


@dataclasses.dataclass(frozen=True)
class EnvFinding:
    """One problem in an environment.

    `kind` is a stable rule name ("modified", "pth-import", ...); `path` the file, directory or variable
    it is about; `message` what it means; `advice` what to do; `distribution` the installed distribution
    the file belongs to, when known; `group` an entry point's group.
    """

    kind: str
    severity: Severity
    path: str
    message: str
    advice: str
    distribution: str | None = None
    # The entry-point group of an autoload-entry-point finding: rules match on it, never on the message,
    # which quotes names and values the distribution chose.
    group: str | None = None

    def sort_key(self) -> tuple[int, str, str]:
        return (-self.severity.rank, self.kind, self.path)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity.value,
            "path": self.path,
            "message": self.message,
            "advice": self.advice,
            "distribution": self.distribution,
        }
