"""The signature on each webhook delivery, and the check a receiver runs (standard library only).

    X-Trainguard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
    X-Trainguard-Delivery:  <delivery id, the same on every retry: deduplicate on it>

The time is signed with the body, so a captured delivery cannot be replayed later: a receiver refuses a
signature whose time is more than `tolerance_s` away from its own clock, and deduplicates on the delivery
id within that window. A receiver without trainguard installed can copy `verify_webhook` as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

__all__ = ["DELIVERY_HEADER", "SIGNATURE_HEADER", "SignatureInvalid", "sign", "verify_webhook"]

SIGNATURE_HEADER = "X-Trainguard-Signature"
DELIVERY_HEADER = "X-Trainguard-Delivery"
_HEADER = re.compile(r"t=([0-9]{1,12}),v1=([0-9a-f]{64})")


class SignatureInvalid(Exception):
    """The delivery is not authentic or not fresh; the message says which (never the secret)."""


def sign(secret: bytes, body: bytes, moment: int) -> str:
    """The X-Trainguard-Signature value for `body` sent at `moment` (unix seconds)."""
    digest = hmac.new(secret, b"%d." % moment + body, hashlib.sha256).hexdigest()
    return f"t={moment},v1={digest}"


def verify_webhook(
    secret: bytes, header: str, body: bytes, *, tolerance_s: float = 300.0, now: float | None = None
) -> int:
    """Check a delivery: its signed time (returned) when `header` signs `body` with `secret` and that time
    is within `tolerance_s` of `now`; SignatureInvalid otherwise. `body` is the raw request body."""
    match = _HEADER.fullmatch(header.strip())
    if match is None:
        raise SignatureInvalid("the signature header does not read t=<unix>,v1=<64 hex digits>")
    moment = int(match[1])
    expected = hmac.new(secret, b"%d." % moment + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, match[2]):
        raise SignatureInvalid("the signature does not match the body")
    current = time.time() if now is None else now
    if abs(current - moment) > tolerance_s:
        raise SignatureInvalid(f"the signature is {current - moment:+.0f} s old; a replay, or a clock off")
    return moment
