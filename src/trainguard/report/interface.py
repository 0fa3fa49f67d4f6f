"""One interface for every output format."""

from __future__ import annotations

import abc
import enum

from trainguard.scan.result import ScanReport


class OutputFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"


class Renderer(abc.ABC):
    """Turns a scan report into text."""

    @abc.abstractmethod
    def render(self, report: ScanReport) -> str: ...


def renderer_for(fmt: OutputFormat | str, *, verbose: bool = False, color: bool = False) -> Renderer:
    fmt = OutputFormat(fmt)
    if fmt is OutputFormat.JSON:
        from trainguard.report.json import JsonRenderer

        return JsonRenderer()
    if fmt is OutputFormat.SARIF:
        from trainguard.report.sarif import SarifRenderer

        return SarifRenderer()
    from trainguard.report.text import TextRenderer

    return TextRenderer(verbose=verbose, color=color)
