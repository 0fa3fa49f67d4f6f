"""Plots as inline SVG, drawn here: no script and no library, so a page holding them opens offline.

Every text (titles, series names, labels, values) is escaped: the drill's plots carry names and
messages that come from logs an attacker can write to.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence

__all__ = ["Marker", "Plot", "Series", "figure"]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclasses.dataclass(frozen=True)
class Series:
    """A named line: (x, y) points, y None where there is no value (the line breaks there)."""

    name: str
    points: tuple[tuple[float, float | None], ...]
    colour: str
    line: bool = True
    dots: bool = True


@dataclasses.dataclass(frozen=True)
class Marker:
    """A vertical line at step `x`, labelled."""

    x: float
    label: str
    colour: str
    dashed: bool = True


@dataclasses.dataclass(frozen=True)
class Plot:
    key: str
    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...]
    markers: tuple[Marker, ...] = ()
    caption: str = ""
    # Names of y = 0, 1, ...: a categorical axis instead of numbers.
    categories: tuple[str, ...] = ()
    legend: bool = True


def figure(plot: Plot) -> str:
    caption = f"<figcaption>{_e(plot.caption)}</figcaption>" if plot.caption else ""
    return f'<figure class="plot" data-plot="{_e(plot.key)}">\n{_svg(plot)}\n{caption}\n</figure>'


# -- SVG -----------------------------------------------------------------------------------------

WIDTH, HEIGHT = 560, 300
RIGHT, BOTTOM = 16, 44
LEGEND_TOP, LEGEND_ROW = 32, 15
CHAR_PX = 6.2  # an 11 px sans-serif character, for room around labels


@dataclasses.dataclass(frozen=True)
class _Axis:
    """Maps data in [low, high] onto pixels [start, end]; ticks are where labels go."""

    low: float
    high: float
    start: float
    end: float
    ticks: tuple[float, ...]
    decimals: int

    def __call__(self, value: float) -> float:
        return self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)

    def label(self, value: float) -> str:
        return f"{value:.{self.decimals}f}"


def _nice_axis(values: Sequence[float], start: float, end: float, *, integer: bool) -> _Axis:
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = (
            low - (1 if integer else abs(low) * 0.1 or 1),
            high + (1 if integer else abs(high) * 0.1 or 1),
        )
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, round(step))
    first, last = math.floor(low / step) * step, math.ceil(high / step) * step
    ticks = tuple(first + i * step for i in range(round((last - first) / step) + 1))
    return _Axis(first, last, start, end, ticks, _decimals(step))


def _decimals(step: float) -> int:
    return next((d for d in range(7) if abs(round(step, d) - step) <= step * 1e-6), 6)


def _category_axis(count: int, start: float, end: float) -> _Axis:
    return _Axis(-0.5, count - 0.5, start, end, tuple(float(i) for i in range(count)), 0)


def _svg(plot: Plot) -> str:
    left = _left_margin(plot)
    legend = _legend_places(plot.series) if plot.legend else []
    top = (
        LEGEND_TOP + LEGEND_ROW * max((row for _, row, _ in legend), default=-1) + 14 + 13 * len(plot.markers)
    )
    height = max(HEIGHT, top + BOTTOM + 28 * len(plot.categories))
    xs = [x for s in plot.series for x, _ in s.points] + [m.x for m in plot.markers]
    ys = [y for s in plot.series for _, y in s.points if y is not None]
    x = _nice_axis(xs, left, WIDTH - RIGHT, integer=True)
    if plot.categories:
        y = _category_axis(len(plot.categories), height - BOTTOM, top)
    else:
        y = _nice_axis(ys, height - BOTTOM, top, integer=False)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{_e(plot.title)}">',
        f"<title>{_e(plot.title)}</title>",
        f'<text class="plot-title" x="8" y="16">{_e(plot.title)}</text>',
        _grid_and_axes(plot, x, y),
        *(_marker(m, x, y, i) for i, m in enumerate(plot.markers)),
        *(_series(s, x, y, categorical=bool(plot.categories)) for s in plot.series),
        "\n".join(_legend_entry(item, LEGEND_TOP + LEGEND_ROW * row, at) for item, row, at in legend),
        "</svg>",
    ]
    return "\n".join(part for part in parts if part)


def _left_margin(plot: Plot) -> float:
    longest = max((len(c) for c in plot.categories), default=6)
    return max(64.0, 16 + CHAR_PX * longest)


def _grid_and_axes(plot: Plot, x: _Axis, y: _Axis) -> str:
    bottom, top = y.start, y.end
    parts = []
    for tick in x.ticks:
        px = _px(x(tick))
        parts.append(f'<line class="grid" x1="{px}" y1="{top}" x2="{px}" y2="{bottom}"/>')
        parts.append(
            f'<text class="tick" x="{px}" y="{bottom + 16}" text-anchor="middle">{x.label(tick)}</text>'
        )
    for tick in y.ticks:
        py = _px(y(tick))
        label = plot.categories[int(tick)] if plot.categories else y.label(tick)
        parts.append(f'<line class="grid" x1="{_px(x.start)}" y1="{py}" x2="{_px(x.end)}" y2="{py}"/>')
        parts.append(
            f'<text class="tick" x="{_px(x.start - 6)}" y="{py}" text-anchor="end" '
            f'dominant-baseline="middle">{_e(label)}</text>'
        )
    parts.append(f'<path class="axis" d="M{_px(x.start)} {top} V{_px(bottom)} H{_px(x.end)}" fill="none"/>')
    parts.append(
        f'<text class="axis-label" x="{_px((x.start + x.end) / 2)}" y="{_px(bottom + 38)}" '
        f'text-anchor="middle">{_e(plot.x_label)}</text>'
    )
    if plot.y_label:
        middle = _px((top + bottom) / 2)
        parts.append(
            f'<text class="axis-label" x="14" y="{middle}" text-anchor="middle" '
            f'transform="rotate(-90 14 {middle})">{_e(plot.y_label)}</text>'
        )
    return "\n".join(parts)


def _series(series: Series, x: _Axis, y: _Axis, *, categorical: bool) -> str:
    title = f"<title>{_e(series.name)}</title>"
    parts = [f'<g class="series" data-series="{_e(series.name)}">{title}']
    if series.line:
        for run in _unbroken(series.points):
            if len(run) > 1:
                points = " ".join(f"{_px(x(px))},{_px(y(py))}" for px, py in run)
                parts.append(
                    f'<polyline points="{points}" fill="none" stroke="{series.colour}" '
                    f'stroke-width="1.8">{title}</polyline>'
                )
    for px, py in series.points if series.dots else ():
        if py is not None:
            # A category's number means nothing to a reader: its name is on the axis.
            value = f"{series.name}, step {px:g}" + ("" if categorical else f": {py:.4g}")
            parts.append(
                f'<circle cx="{_px(x(px))}" cy="{_px(y(py))}" r="{3.2 if not series.line else 2.2}" '
                f'fill="{series.colour}"><title>{_e(value)}</title></circle>'
            )
    parts.append("</g>")
    return "\n".join(parts)


def _unbroken(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """The stretches of points with a value."""
    runs: list[list[tuple[float, float]]] = [[]]
    for px, py in points:
        if py is None:
            runs.append([])
        else:
            runs[-1].append((px, py))
    return [run for run in runs if run]


def _marker(marker: Marker, x: _Axis, y: _Axis, index: int) -> str:
    at = x(marker.x)
    px = _px(at)
    dash = ' stroke-dasharray="5 4"' if marker.dashed else ""
    # Labels stack above the plot area, one line each, so that markers at nearby steps stay readable.
    ty = y.end - 6 - 13 * index
    anchor, tx = ("end", at - 4) if at > (x.start + x.end) / 2 else ("start", at + 4)
    return (
        f'<g class="marker"><title>{_e(marker.label)}</title>'
        f'<line x1="{px}" y1="{_px(ty + 3)}" x2="{px}" y2="{_px(y.start)}" '
        f'stroke="{marker.colour}" stroke-width="1.4"{dash}/>'
        f'<text class="marker-label" x="{_px(tx)}" y="{ty}" text-anchor="{anchor}" '
        f'fill="{marker.colour}">{_e(marker.label)}</text></g>'
    )


def _legend_places(series: Sequence[Series]) -> list[tuple[Series, int, float]]:
    """Each series' legend entry: its row and x, wrapping at the right edge."""
    places, row, cursor = [], 0, 8.0
    for item in series:
        width = 28 + CHAR_PX * len(item.name)
        if cursor > 8 and cursor + width > WIDTH - RIGHT:
            row, cursor = row + 1, 8.0
        places.append((item, row, cursor))
        cursor += width
    return places


def _legend_entry(item: Series, y: float, x: float) -> str:
    swatch = (
        f'<line x1="{_px(x)}" y1="{y}" x2="{_px(x + 16)}" y2="{y}" stroke="{item.colour}" stroke-width="3"/>'
        if item.line
        else f'<circle cx="{_px(x + 8)}" cy="{y}" r="4" fill="{item.colour}"/>'
    )
    return (
        f'<g class="legend">{swatch}<text x="{_px(x + 20)}" y="{y}" dominant-baseline="middle">'
        f"{_e(item.name)}</text></g>"
    )


def _px(value: float) -> str:
    return f"{value:.1f}"
