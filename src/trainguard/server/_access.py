"""Who a token speaks for (`Identity`), what it may do (`authorize`), and why a request is turned away.

AccessDenied                 a request is refused; `reason` is a stable code a client may act on
├── AuthenticationFailed     the token is malformed, unknown (or its secret is wrong), expired or revoked
└── NotAuthorized            the token is valid but its scope does not cover the action
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from trainguard.errors import ExitCode, TrainguardError

__all__ = [
    "AccessDenied",
    "Action",
    "AuthFailure",
    "AuthenticationFailed",
    "Identity",
    "NotAuthorized",
    "Scope",
    "authorize",
]


class Scope(str, enum.Enum):
    """What a token is for. Each scope is a fixed grant: there is no way to combine or widen them."""

    ADMIN = "admin"
    """Everything, including managing tokens."""
    VIEWER = "viewer"
    """Read every run; write nothing."""
    JOB = "job"
    """Append to the one run it is bound to; nothing else, not even reads."""


class Action(str, enum.Enum):
    READ = "read"
    APPEND = "append"
    MANAGE = "manage"


class AuthFailure(str, enum.Enum):
    """Why a token was refused. A wrong secret reads as UNKNOWN, so a caller who knows a token's public id
    learns nothing about it without its secret; EXPIRED and REVOKED are told only once the secret matched."""

    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Identity:
    """An authenticated token: its public id, its scope and, for a job token, its run."""

    token_id: str
    scope: Scope
    run: str | None = None


class AccessDenied(TrainguardError):
    """A request refused: `reason` is a stable code; the message never quotes the token it was given."""

    exit_code = ExitCode.USAGE

    def __init__(self, reason: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class AuthenticationFailed(AccessDenied):
    """The token does not authenticate (an HTTP server answers 401)."""

    def __init__(self, failure: AuthFailure, token_id: str | None = None) -> None:
        # The id is named only once the secret matched: before that it is whatever the caller typed.
        which = f"token {token_id}" if token_id else "token"
        super().__init__(failure.value, f"{which} rejected: {failure.value}")
        self.failure = failure


class NotAuthorized(AccessDenied):
    """The token is valid but may not do this (an HTTP server answers 403)."""

    def __init__(self, identity: Identity, action: Action, run_id: str | None) -> None:
        target = f" on run {run_id!r}" if run_id is not None else ""
        super().__init__(
            "forbidden",
            f"token {identity.token_id} ({_describe(identity)}) may not {action.value}{target}",
        )


def _describe(identity: Identity) -> str:
    return f"job token for run {identity.run!r}" if identity.scope is Scope.JOB else identity.scope.value


def authorize(identity: Identity, action: Action, run_id: str | None = None) -> None:
    """Return when `identity` may do `action` (on `run_id`, for per-run actions); else NotAuthorized."""
    if not _allowed(identity, action, run_id):
        raise NotAuthorized(identity, action, run_id)


def _allowed(identity: Identity, action: Action, run_id: str | None) -> bool:
    if identity.scope is Scope.ADMIN:
        return True
    if identity.scope is Scope.VIEWER:
        return action is Action.READ
    # A job token: least privilege, because it sits in a training job's environment where any code the
    # job imports can read it. Its run must be named and equal: None never matches.
    return action is Action.APPEND and run_id is not None and run_id == identity.run
