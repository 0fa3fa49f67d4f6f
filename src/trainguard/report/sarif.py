"""SARIF 2.1.0 output, as GitHub code scanning reads it."""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from trainguard import __version__
from trainguard.findings import Severity, Verdict
from trainguard.report.interface import Renderer
from trainguard.scan.result import ScanReport

_LEVEL = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
}
_SCORE = {Severity.CRITICAL: "9.8", Severity.HIGH: "8.0", Severity.MEDIUM: "5.0", Severity.LOW: "2.0"}
_UNDECIDED_RULE = "undecided"


def _uri(path: str) -> str:
    return PurePosixPath(path.split("!/", 1)[0]).as_posix().lstrip("/") if path.startswith("/") else path


def _location(path: str, message: str | None = None) -> dict[str, Any]:
    loc: dict[str, Any] = {"physicalLocation": {"artifactLocation": {"uri": _uri(path.split("!/", 1)[0])}}}
    if message:
        loc["message"] = {"text": message}
    return loc


class SarifRenderer(Renderer):
    def render(self, report: ScanReport) -> str:
        rules: dict[str, dict[str, Any]] = {}
        results: list[dict[str, Any]] = []
        for file_result in report.results:
            for finding in file_result.findings:
                rule = rules.setdefault(
                    finding.rule,
                    {
                        "id": finding.rule,
                        "shortDescription": {"text": finding.rule.replace("-", " ")},
                        "properties": {"security-severity": _SCORE[finding.severity], "tags": ["security"]},
                    },
                )
                if float(rule["properties"]["security-severity"]) < float(_SCORE[finding.severity]):
                    rule["properties"]["security-severity"] = _SCORE[finding.severity]
                results.append(
                    {
                        "ruleId": finding.rule,
                        "level": _LEVEL[finding.severity],
                        "message": {"text": f"{finding.location}: {finding.message}"},
                        "locations": [_location(finding.location)],
                    }
                )
            if file_result.verdict is Verdict.UNDECIDED:
                rules.setdefault(
                    _UNDECIDED_RULE,
                    {
                        "id": _UNDECIDED_RULE,
                        "shortDescription": {"text": "artifact could not be fully analysed"},
                        "properties": {"security-severity": "5.0", "tags": ["security"]},
                    },
                )
                results.extend(
                    {
                        "ruleId": _UNDECIDED_RULE,
                        "level": "warning",
                        "message": {"text": problem.message},
                        "locations": [_location(problem.location)],
                    }
                    for problem in file_result.problems
                )
        doc = {
            "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
            "version": "2.1.0",
            "runs": [
                {
                    "tool": {
                        "driver": {
                            "name": "trainguard",
                            "version": __version__,
                            "rules": list(rules.values()),
                        }
                    },
                    "results": results,
                }
            ],
        }
        return json.dumps(doc, indent=2) + "\n"
