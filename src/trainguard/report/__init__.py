"""Renderers of scan reports: text for people, JSON for programs, SARIF for code-scanning tools."""

from trainguard.report.interface import Renderer, renderer_for

__all__ = ["Renderer", "renderer_for"]
