"""The scorecard as it fills in: one row per attack on stderr as soon as it is judged, with the attack
running shown on a terminal meanwhile (a run takes several seconds; the drill must not look hung)."""

from __future__ import annotations

import sys
from typing import TextIO

from trainguard.drill._attacks import Attack
from trainguard.drill._play import Outcome

__all__ = ["LiveTable"]

_COLUMNS = ((5, "#"), (1, "g"), (38, "attack"), (14, "verdict"), (49, "detected by"), (8, "steps"))


def _line(cells: tuple[str, ...]) -> str:
    return "  ".join(cell.ljust(width) for (width, _), cell in zip(_COLUMNS, cells, strict=True))


class LiveTable:
    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty()

    def header(self) -> None:
        self._write(_line(tuple(title for _, title in _COLUMNS)) + "  seconds\n")

    def running(self, number: int, attack: Attack) -> None:
        if self.terminal:  # overwritten by the attack's row
            self._write(f"{number}/{self.total}  {attack.group}  {attack.name}: running...")

    def row(self, number: int, outcome: Outcome, seconds: float) -> None:
        steps = outcome.steps_to_detection
        cells = (
            f"{number}/{self.total}",
            outcome.attack.group,
            outcome.attack.name,
            {"caught": "caught", "missed": "MISSED"}.get(outcome.verdict, outcome.verdict),
            outcome.detected_by[:49] or "-",
            "-" if steps is None else (f"{-steps} before" if steps < 0 else str(steps)),
        )
        self._write(("\r\033[K" if self.terminal else "") + _line(cells) + f"  {seconds:.1f}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
