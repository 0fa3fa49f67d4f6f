"""RFC 8785 (JSON Canonicalization Scheme) bytes, fast for the documents a ledger holds.

The `rfc8785` package is the reference; it formats every value in Python. Ledger events rarely carry
floats, and for JSON without floats, without integers past 2**53 and without keys beyond U+D7FF,
`json.dumps` with sorted keys, compact separators and raw UTF-8 writes exactly the RFC 8785 bytes:
its string escapes (\\" \\\\ \\b \\f \\n \\r \\t, other controls as lowercase \\u00xx) are those of
ECMAScript's JSON.stringify, and code-point order equals UTF-16 order below U+D800. Every other
document goes to `rfc8785.dumps`. A property test checks the two agree.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

__all__ = ["canonical_json"]

_MAX_SAFE_INT = (1 << 53) - 1
# Below this code point, sorting by code points and by UTF-16 code units agree.
_UTF16_SAFE_KEY_MAX = "\ud7ff"
_MAX_FAST_DEPTH = 64

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False).encode


def canonical_json(document: Any) -> bytes:
    """The RFC 8785 bytes of `document`; rfc8785's errors (ValueError, TypeError subclasses) otherwise."""
    if _plain(document, 0):
        try:
            return _encode(document).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: the reference raises its own error for it
    return rfc8785.dumps(document)


def _plain(value: Any, depth: int) -> bool:
    """True if `value` is JSON that `json.dumps` writes canonically (see the module docstring)."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return True
    if kind is int:
        return bool(-_MAX_SAFE_INT <= value <= _MAX_SAFE_INT)
    if depth >= _MAX_FAST_DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (key and max(key) > _UTF16_SAFE_KEY_MAX):
                return False
            if not _plain(item, depth + 1):
                return False
        return True
    if kind is list:
        return all(_plain(item, depth + 1) for item in value)
    return False
