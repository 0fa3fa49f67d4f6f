"""What the argparse parsers share: bounded number types, and handlers that import their room when run."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

__all__ = ["handler", "non_negative_int", "positive_int", "ratio"]


def _bounded(
    parse: type[int] | type[float], bound: float, what: str, *, inclusive: bool
) -> Callable[[str], float]:
    """An argparse type: `parse(text)`, which must be above `bound` (or equal to it, when `inclusive`)."""

    def convert(text: str) -> float:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < bound or (value == bound and not inclusive):
            limit = "at least" if inclusive else "above"
            raise argparse.ArgumentTypeError(f"{text!r} must be {limit} {bound:g}")
        return value

    return convert


positive_int = _bounded(int, 0, "an integer", inclusive=False)
non_negative_int = _bounded(int, 0, "an integer", inclusive=True)
ratio = _bounded(float, 1, "a number", inclusive=False)


def handler(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand handler that imports `module` only when the subcommand runs, so `--help` stays instant."""

    def run(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), name)(args))

    return run
