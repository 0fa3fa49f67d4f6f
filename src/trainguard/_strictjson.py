"""JSON read from untrusted bytes: one spelling per document, nothing JSON does not define."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["loads_strict"]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Readers disagree on which of two equal keys wins; such a document has no single meaning.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("an object has a duplicate key")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(data: bytes | str, *, parse_int: Callable[[str], Any] | None = None) -> Any:
    """Parse UTF-8 JSON; ValueError (UnicodeDecodeError included) for duplicate keys, NaN or Infinity."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_int=parse_int)
