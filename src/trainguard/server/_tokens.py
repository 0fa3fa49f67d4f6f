"""Access tokens for `trainguard serve`: shown once, stored as a hash, scoped, expiring and revocable.

A token reads ``tgs_<id>_<secret>``. ``<id>`` is public: ``tg_`` and 8 hex digits, what `list` shows, logs
may name and `revoke` takes. ``<secret>`` is 32 random bytes in unpadded base64url (43 characters). The
store keeps SHA-256 of the secret, bound to the id, and never the secret itself.

Why a plain SHA-256 and no slow KDF (scrypt, Argon2, PBKDF2): a slow hash makes guessing a low-entropy,
human-chosen password expensive. A 256-bit random secret cannot be guessed at any hash speed, so a leaked
table gives nothing away either way; a fast hash keeps the check on every request cheap, where a
deliberately slow one would let anyone sending bogus tokens burn the server's CPU. Each secret is random and
used once, so a salt would add nothing either.

Every check reads the database: there is no cache in the process, so a token revoked by one host or worker
is refused by every other on its next request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from trainguard.errors import StoreError, UsageError
from trainguard.relay._tokenformat import TOKEN, TOKEN_ID, TOKEN_LENGTH, TOKEN_PREFIX
from trainguard.server._access import AuthenticationFailed, AuthFailure, Identity, Scope
from trainguard.server._db import TABLE, TokenDb, connect

__all__ = [
    "DEFAULT_LIFETIME",
    "IssuedToken",
    "TokenInfo",
    "TokenStore",
    "is_token_id",
]

DEFAULT_LIFETIME = {
    Scope.JOB: timedelta(days=7),
    Scope.VIEWER: timedelta(days=90),
    Scope.ADMIN: timedelta(days=365),
}
_SECRET_BYTES = 32
_HASH_CONTEXT = b"trainguard server token v1\0"
# Compared against when the id is unknown, so that path does the same work as a wrong secret.
_NO_TOKEN_HASH = bytes(32)
_ID_ATTEMPTS = 8
_MAX_LABEL = 200
_MAX_RUN_ID = 256
_COLUMNS = "id, scope, run_id, label, created_at, expires_at, revoked_at, created_by"


@dataclass(frozen=True)
class TokenInfo:
    """Everything stored about a token except the hash of its secret."""

    token_id: str
    scope: Scope
    run: str | None
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    created_by: str

    def status(self, now: datetime) -> str:
        """``revoked``, ``expired`` or ``active`` at `now`."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "id": self.token_id,
            "scope": self.scope.value,
            "run": self.run,
            "label": self.label,
            "status": self.status(now),
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class IssuedToken:
    """A new token: `token` is the only copy of its secret, to hand to the user once."""

    token: str = field(repr=False)  # a repr that lands in a log must not carry the secret
    info: TokenInfo


def is_token_id(text: str) -> bool:
    return TOKEN_ID.fullmatch(text) is not None


class TokenStore:
    """The ``server_tokens`` table beside a ledger. Thread-safe; every method reads the database afresh."""

    def __init__(self, db: TokenDb) -> None:
        self._db = db

    @classmethod
    def open(cls, location: str | Path | None = None, *, create: bool = False) -> TokenStore:
        """The tokens of the ledger at `location` (default: the default ledger under $TRAINGUARD_HOME).

        Only `create` makes the table (and the ledger's own tables, when they are missing too).
        """
        if location is None:
            from trainguard.ledger._ledger import default_location

            location = default_location()
        return cls(connect(location, create=create))

    @property
    def location(self) -> str:
        return self._db.location

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def create(
        self,
        scope: Scope,
        *,
        expires_at: datetime | None,
        created_by: str,
        run: str | None = None,
        label: str = "",
        now: datetime | None = None,
    ) -> IssuedToken:
        """Issue a token. `expires_at` None means never, which a job token may not have."""
        now = _now(now)
        _check_grant(scope, run, expires_at, now)
        _check_text("label", label, _MAX_LABEL, empty=True)
        _check_text("created_by", created_by, _MAX_LABEL, empty=False)
        secret = secrets.token_bytes(_SECRET_BYTES)
        for _ in range(_ID_ATTEMPTS):
            token_id = f"tg_{secrets.token_hex(4)}"
            # 32-bit ids collide after ~65 000 tokens; a collision just draws another id.
            inserted = self._db.write(
                f"INSERT INTO {TABLE} (id, secret_hash, scope, run_id, label, created_at, expires_at,"
                " revoked_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (id) DO NOTHING",
                (
                    token_id,
                    _secret_hash(token_id, secret),
                    scope.value,
                    run,
                    label,
                    self._db.to_db(now),
                    self._db.to_db(expires_at),
                    created_by,
                ),
            )
            if inserted == 1:
                info = TokenInfo(token_id, scope, run, label, now, expires_at, None, created_by)
                return IssuedToken(_format_token(token_id, secret), info)
        raise StoreError(f"no free token id found in {_ID_ATTEMPTS} tries in {self.location}")

    def tokens(self) -> list[TokenInfo]:
        """Every token, oldest first, revoked and expired ones included."""
        rows = self._db.rows(f"SELECT {_COLUMNS} FROM {TABLE} ORDER BY created_at, id")
        return [self._info(row) for row in rows]

    def get(self, token_id: str) -> TokenInfo | None:
        rows = self._db.rows(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = ?", (token_id,))
        return self._info(rows[0]) if rows else None

    def revoke(self, token_id: str, *, now: datetime | None = None) -> tuple[TokenInfo, bool]:
        """Revoke a token at once, for every process; (its record, whether this call revoked it).

        Revoking a revoked token changes nothing; an unknown id is a UsageError.
        """
        _check_token_id(token_id)
        changed = self._db.write(
            f"UPDATE {TABLE} SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (self._db.to_db(_now(now)), token_id),
        )
        info = self.get(token_id)
        if info is None:
            raise UsageError(
                f"no token {token_id} in {self.location}", hint="'trainguard server token list' shows them"
            )
        return info, changed == 1

    def authenticate(self, token: object, now: datetime | None = None) -> Identity:
        """The identity `token` speaks for at `now`, or AuthenticationFailed with a stable reason.

        Any input, of any type or length, either authenticates or raises AuthenticationFailed (or a
        StoreError when the database fails): the secret is compared in constant time, and a wrong secret
        is reported exactly like an unknown id.
        """
        now = _now(now)
        token_id, secret = _parse_token(token)
        rows = self._db.rows(
            f"SELECT secret_hash, scope, run_id, expires_at, revoked_at FROM {TABLE} WHERE id = ?",
            (token_id,),
        )
        stored = bytes(rows[0][0]) if rows else _NO_TOKEN_HASH
        if not hmac.compare_digest(_secret_hash(token_id, secret), stored) or not rows:
            raise AuthenticationFailed(AuthFailure.UNKNOWN)
        _, scope, run, expires_at, revoked_at = rows[0]
        if revoked_at is not None:
            raise AuthenticationFailed(AuthFailure.REVOKED, token_id)
        expires = self._db.from_db(expires_at)
        if expires is not None and now >= expires:
            raise AuthenticationFailed(AuthFailure.EXPIRED, token_id)
        return Identity(token_id, self._scope(scope), None if run is None else str(run))

    def _info(self, row: tuple[Any, ...]) -> TokenInfo:
        token_id, scope, run, label, created_at, expires_at, revoked_at, created_by = row
        created = self._db.from_db(created_at)
        if created is None:
            raise StoreError(f"server token {token_id} in {self.location} has no creation time")
        return TokenInfo(
            str(token_id),
            self._scope(scope),
            None if run is None else str(run),
            str(label),
            created,
            self._db.from_db(expires_at),
            self._db.from_db(revoked_at),
            str(created_by),
        )

    def _scope(self, value: object) -> Scope:
        try:
            return Scope(value)
        except ValueError:
            raise StoreError(f"server tokens in {self.location}: unknown scope {value!r}") from None

    def __repr__(self) -> str:
        return f"TokenStore({self.location!r})"


def _secret_hash(token_id: str, secret: bytes) -> bytes:
    # Bound to the id: a hash copied onto another row does not make that row's id accept the secret.
    return hashlib.sha256(_HASH_CONTEXT + token_id.encode("ascii") + b"\0" + secret).digest()


def _format_token(token_id: str, secret: bytes) -> str:
    return f"{TOKEN_PREFIX}{token_id}_{base64.urlsafe_b64encode(secret).rstrip(b'=').decode('ascii')}"


def _parse_token(token: object) -> tuple[str, bytes]:
    """(id, secret) of a well-formed token string; AuthenticationFailed(MALFORMED) for anything else.

    The length is checked before the pattern, so the work done on hostile input is bounded.
    """
    if not isinstance(token, str) or len(token) != TOKEN_LENGTH:
        raise AuthenticationFailed(AuthFailure.MALFORMED)
    match = TOKEN.fullmatch(token)
    if match is None:
        raise AuthenticationFailed(AuthFailure.MALFORMED)
    return match[1], base64.urlsafe_b64decode(match[2] + "=")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must carry a time zone")
    return now


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_grant(scope: Scope, run: str | None, expires_at: datetime | None, now: datetime) -> None:
    """A job token names one run and expires; other tokens name no run; no token is born expired."""
    if scope is Scope.JOB:
        if run is None:
            raise UsageError("a job token is bound to one run", hint="give --run RUN_ID")
        _check_text("run id", run, _MAX_RUN_ID, empty=False)
        if expires_at is None:
            raise UsageError(
                "a job token must expire",
                hint="it lives in a training job's environment; "
                f"the default is {DEFAULT_LIFETIME[scope].days} days",
            )
    elif run is not None:
        raise UsageError(f"{scope.value} tokens are not bound to a run: --run is only for job tokens")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise ValueError("expires_at must carry a time zone")
        if expires_at <= now:
            raise UsageError(f"the expiry {_iso(expires_at)} is not in the future")


def _check_text(what: str, value: str, limit: int, *, empty: bool) -> None:
    # Printable only: these are shown in terminals, where control characters could rewrite the screen.
    if (not value and not empty) or len(value) > limit or not value.isprintable() or value != value.strip():
        size = f"at most {limit}" if empty else f"1 to {limit}"
        raise UsageError(f"the {what} must be {size} printable characters, without surrounding spaces")


def _check_token_id(token_id: str) -> None:
    if is_token_id(token_id):
        return
    match = TOKEN.fullmatch(token_id) if len(token_id) == TOKEN_LENGTH else None
    if match is not None:
        # Someone pasted the whole token: name its id, and never repeat the secret.
        raise UsageError("give the token's id, not the token itself", hint=f"its id is {match[1]}")
    # Not echoed: a mistyped token may still hold most of a secret.
    raise UsageError("that is not a token id", hint="ids read tg_ and 8 hex digits, as 'token list' shows")
