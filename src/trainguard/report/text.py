"""Human-readable scan output.

Everything that comes from an artifact or a file name (paths, import names, notes) is shown with its
unprintable characters escaped: a lone surrogate in a module name must not make the whole report
unwritable, and a terminal escape sequence or a carriage return in one must not rewrite the lines
around it (hiding another file's findings).
"""

from __future__ import annotations

from trainguard.findings import Severity, Verdict
from trainguard.report.interface import Renderer
from trainguard.scan.result import FileResult, ScanReport

_COLORS = {
    Severity.CRITICAL: "\033[1;31m",
    Severity.HIGH: "\033[31m",
    Severity.MEDIUM: "\033[33m",
    Severity.LOW: "\033[36m",
}
_VERDICT_WORDS = {
    Verdict.CLEAN: "clean",
    Verdict.FINDINGS: "FINDINGS",
    Verdict.UNDECIDED: "UNDECIDED",
    Verdict.SKIPPED: "skipped",
}


class TextRenderer(Renderer):
    def __init__(self, *, verbose: bool = False, color: bool = False) -> None:
        self.verbose = verbose
        self.color = color

    def _paint(self, severity: Severity, text: str) -> str:
        return f"{_COLORS[severity]}{text}\033[0m" if self.color else text

    def render(self, report: ScanReport) -> str:
        lines: list[str] = []
        for result in report.results:
            if result.verdict in (Verdict.CLEAN, Verdict.SKIPPED) and not self.verbose:
                continue
            lines.extend(self._file(result))
        lines.extend(f"{_shown(error)}: could not be listed" for error in report.errors)
        lines.append(self._summary(report))
        return "\n".join(lines) + "\n"

    def _file(self, result: FileResult) -> list[str]:
        formats = "/".join(result.formats) or "unknown"
        head = f"{_shown(result.path)}: {_VERDICT_WORDS[result.verdict]} ({_shown(formats)})"
        if result.note:
            head += f" - {_shown(result.note)}"
        lines = [head]
        for finding in result.findings:
            place = [_shown(finding.location)] if finding.location != result.path else []
            if finding.offset is not None:
                place.append(f"offset {finding.offset}")
            tag = self._paint(finding.severity, f"[{finding.severity.value}] {finding.rule}")
            suffix = f" ({', '.join(place)})" if place else ""
            lines.append(f"  {tag}: {_shown(finding.message)}{suffix}")
        lines.extend(f"  [undecided] {_shown(problem.message)}" for problem in result.problems)
        return lines

    def _summary(self, report: ScanReport) -> str:
        parts = [
            f"{len(report.results)} files scanned",
            f"{report.count(Verdict.FINDINGS)} with findings",
            f"{report.count(Verdict.UNDECIDED)} undecided",
            f"{report.count(Verdict.CLEAN)} clean",
            f"{report.count(Verdict.SKIPPED)} skipped (not a model format)",
        ]
        return ", ".join(parts)


def _shown(text: object) -> str:
    """The text with each unprintable character (control, surrogate, unassigned) as its escape."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
