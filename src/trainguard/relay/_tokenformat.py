"""The shape of a trainguard server token, shared by the server that checks it and the jobs that send it.

tgs_<id>_<43-character base64url secret>, where the id is tg_<8 hex digits>.
"""

from __future__ import annotations

import re

__all__ = ["TOKEN", "TOKEN_ID", "TOKEN_LENGTH", "TOKEN_PREFIX", "is_token"]

TOKEN_PREFIX = "tgs_"
TOKEN_ID = re.compile(r"tg_[0-9a-f]{8}")
# 43 base64url characters hold 258 bits; the last one's two spare bits must be zero (one of the 16 below),
# so every secret has exactly one spelling and decoding can never fail.
TOKEN = re.compile(r"tgs_(tg_[0-9a-f]{8})_([A-Za-z0-9_-]{42}[AEIMQUYcgkosw048])")
TOKEN_LENGTH = len(TOKEN_PREFIX) + 11 + 1 + 43


def is_token(text: object) -> bool:
    """Whether `text` has a token's shape (the length is checked first, so hostile input costs little)."""
    return isinstance(text, str) and len(text) == TOKEN_LENGTH and TOKEN.fullmatch(text) is not None
