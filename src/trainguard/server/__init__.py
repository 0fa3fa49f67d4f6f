"""Access control for `trainguard serve`: tokens stored beside the ledger, and what each scope may do.

from trainguard.server import Action, TokenStore, authorize

with TokenStore.open("postgresql://db/ledger") as tokens:  # same location as the ledger's
    identity = tokens.authenticate(request_token)         # AuthenticationFailed: .reason is a stable code
    authorize(identity, Action.APPEND, run_id="r42")      # NotAuthorized unless the scope covers it

Tokens are made, listed and revoked with `trainguard server token ...`. Importing this package imports
neither a database driver nor the ledger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports

if TYPE_CHECKING:
    from trainguard.server._access import (
        AccessDenied,
        Action,
        AuthenticationFailed,
        AuthFailure,
        Identity,
        NotAuthorized,
        Scope,
        authorize,
    )
    from trainguard.server._signature import SignatureInvalid, verify_webhook
    from trainguard.server._tokens import DEFAULT_LIFETIME, IssuedToken, TokenInfo, TokenStore

__all__ = [
    "DEFAULT_LIFETIME",
    "AccessDenied",
    "Action",
    "AuthFailure",
    "AuthenticationFailed",
    "Identity",
    "IssuedToken",
    "NotAuthorized",
    "Scope",
    "SignatureInvalid",
    "TokenInfo",
    "TokenStore",
    "authorize",
    "verify_webhook",
]

_HOMES = {
    **dict.fromkeys(
        (
            "AccessDenied",
            "Action",
            "AuthFailure",
            "AuthenticationFailed",
            "Identity",
            "NotAuthorized",
            "Scope",
            "authorize",
        ),
        "_access",
    ),
    **dict.fromkeys(("DEFAULT_LIFETIME", "IssuedToken", "TokenInfo", "TokenStore"), "_tokens"),
    **dict.fromkeys(("SignatureInvalid", "verify_webhook"), "_signature"),
}

__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
