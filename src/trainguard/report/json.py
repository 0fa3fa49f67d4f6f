"""Machine-readable scan output; `schema_version` changes whenever a field changes meaning."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from trainguard import __version__
from trainguard.report.interface import Renderer
from trainguard.scan.result import SCHEMA_VERSION, FileResult, ScanReport


def _result(result: FileResult) -> dict[str, Any]:
    return {
        "path": result.path,
        "formats": list(result.formats),
        "verdict": result.verdict.value,
        "size": result.size,
        "note": result.note,
        "findings": [{**dataclasses.asdict(f), "severity": f.severity.value} for f in result.findings],
        "problems": [dataclasses.asdict(p) for p in result.problems],
    }


class JsonRenderer(Renderer):
    def render(self, report: ScanReport) -> str:
        # One result per line: readable and diffable, and each line goes through json's C encoder
        # (indent= would route the whole document through the pure-Python one).
        head = json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "tool": {"name": "trainguard", "version": __version__},
                "exit_code": report.exit_code,
            }
        )
        results = ",\n".join("  " + json.dumps(_result(r)) for r in report.results)
        body = f"[\n{results}\n]" if results else "[]"
        return f'{head[:-1]}, "results": {body}, "errors": {json.dumps(list(report.errors))}}}\n'
