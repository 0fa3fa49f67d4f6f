"""Timing helpers the benchmarks share: interleaved rounds, medians, markdown tables."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable

__all__ = ["interleaved", "run_command", "table", "timed"]


def run_command(command: list[str], env: dict[str, str] | None = None) -> Callable[[], None]:
    def call() -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[:300]}")

    return call


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, float | None]:
    """Median seconds per case; a case that fails once is reported as unavailable (None)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    broken: dict[str, str] = {}
    for _ in range(rounds):
        for name, function in cases.items():
            if name in broken:
                continue
            try:
                times[name].append(timed(function))
            except Exception as exc:
                broken[name] = str(exc)
                print(f"  {name}: unavailable ({exc})", file=sys.stderr)
    return {name: (statistics.median(t) if t and name not in broken else None) for name, t in times.items()}


def table(title: str, results: dict[str, float | None], baseline: str, size: int | None) -> list[str]:
    base = results.get(baseline)
    lines = [f"### {title}", "", "| what | seconds | GB/s | vs " + baseline + " |", "|---|---:|---:|---:|"]
    for name, seconds in results.items():
        if seconds is None:
            lines.append(f"| {name} | n/a | | |")
            continue
        rate = f"{size / seconds / 1e9:.2f}" if size else ""
        ratio = f"{seconds / base:.2f}x" if base else ""
        lines.append(f"| {name} | {seconds:.3f} | {rate} | {ratio} |")
    return [*lines, ""]
