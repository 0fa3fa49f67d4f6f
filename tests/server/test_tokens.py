"""The token store on SQLite and a real PostgreSQL: issue, list, revoke, authenticate, authorize."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ledger.conftest import ORIGIN, event
from trainguard.errors import StoreError, TrainguardError, UsageError
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._store import is_postgres_location
from trainguard.relay._tokenformat import TOKEN_LENGTH
from trainguard.server import (
    Action,
    AuthenticationFailed,
    AuthFailure,
    Identity,
    IssuedToken,
    NotAuthorized,
    Scope,
    TokenStore,
    authorize,
)
from trainguard.server._commands import parse_expires

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)


def _issue(store: TokenStore, scope: Scope = Scope.VIEWER, run: str | None = None, **kw: Any) -> IssuedToken:
    kw.setdefault("expires_at", NOW + WEEK)
    return store.create(scope, run=run, created_by="test", now=NOW, **kw)


def _secret_of(issued: IssuedToken) -> bytes:
    # The secret is everything after "tgs_tg_xxxxxxxx_"; base64url may itself hold '_' or '-'.
    return base64.urlsafe_b64decode(issued.token[len("tgs_tg_00000000_") :] + "=")


def _reason(store: TokenStore, token: object, now: datetime = NOW) -> AuthFailure:
    with pytest.raises(AuthenticationFailed) as caught:
        store.authenticate(token, now)
    assert caught.value.reason == caught.value.failure.value
    return caught.value.failure


@pytest.fixture
def store(location: str) -> Any:
    with TokenStore.open(location, create=True) as opened:
        yield opened


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A SQLite store holding one token, shared by every fuzzed example."""
    with TokenStore.open(tmp_path_factory.mktemp("fuzz") / "ledger.db", create=True) as opened:
        yield opened, _issue(opened)


# Issue, list, revoke


def test_create_list_revoke(store: TokenStore) -> None:
    admin = _issue(store, Scope.ADMIN, label="ops team", expires_at=None)
    job = _issue(store, Scope.JOB, run="r42")
    assert admin.token.startswith(f"tgs_{admin.info.token_id}_") and len(admin.token) == TOKEN_LENGTH
    assert admin.token not in repr(admin)

    listed = {info.token_id: info for info in store.tokens()}
    assert listed == {admin.info.token_id: admin.info, job.info.token_id: job.info}
    assert listed[admin.info.token_id].expires_at is None
    assert listed[job.info.token_id].run == "r42"
    assert [info.status(NOW) for info in listed.values()] == ["active", "active"]

    info, revoked = store.revoke(job.info.token_id, now=NOW + timedelta(hours=1))
    assert revoked and info.revoked_at == NOW + timedelta(hours=1)
    assert info.status(NOW) == "revoked"
    again, revoked_again = store.revoke(job.info.token_id, now=NOW + timedelta(hours=2))
    assert not revoked_again and again.revoked_at == info.revoked_at  # the first revocation stands
    assert store.get(job.info.token_id) == info


def test_list_shows_expired_tokens(store: TokenStore) -> None:
    issued = _issue(store, expires_at=NOW + timedelta(minutes=5))
    (info,) = store.tokens()
    assert info == issued.info
    assert info.status(NOW) == "active"
    assert info.status(NOW + timedelta(minutes=5)) == "expired"
    assert info.to_json(NOW + WEEK)["status"] == "expired"


def test_revoking_an_unknown_or_malformed_id_is_a_usage_error(store: TokenStore) -> None:
    issued = _issue(store)
    with pytest.raises(UsageError, match="no token tg_00000000"):
        store.revoke("tg_00000000")
    with pytest.raises(UsageError, match="not a token id"):
        store.revoke("tg_' OR 1=1 --")
    with pytest.raises(UsageError) as caught:
        store.revoke(issued.token)  # the whole token pasted instead of its id
    assert issued.info.token_id in str(caught.value)
    assert issued.token.split("_", 3)[3] not in str(caught.value)
    assert store.get(issued.info.token_id) == issued.info


# What a token may be


def test_job_tokens_name_one_run_and_expire(store: TokenStore) -> None:
    with pytest.raises(UsageError, match="bound to one run"):
        _issue(store, Scope.JOB)
    with pytest.raises(UsageError, match="must expire"):
        _issue(store, Scope.JOB, run="r1", expires_at=None)
    with pytest.raises(UsageError, match="only for job tokens"):
        _issue(store, Scope.VIEWER, run="r1")
    with pytest.raises(UsageError, match="not in the future"):
        _issue(store, expires_at=NOW)
    for label in ("a\x1b[2Jb", "x" * 201, " padded"):
        with pytest.raises(UsageError, match="printable"):
            _issue(store, label=label)
    with pytest.raises(UsageError, match="run id"):
        _issue(store, Scope.JOB, run="")
    assert store.tokens() == []


@pytest.mark.parametrize(
    ("text", "scope", "expected"),
    [
        (None, Scope.JOB, NOW + timedelta(days=7)),
        (None, Scope.VIEWER, NOW + timedelta(days=90)),
        (None, Scope.ADMIN, NOW + timedelta(days=365)),
        ("never", Scope.ADMIN, None),
        ("never", Scope.VIEWER, None),
        ("30m", Scope.JOB, NOW + timedelta(minutes=30)),
        ("24h", Scope.JOB, NOW + timedelta(hours=24)),
        ("2w", Scope.JOB, NOW + timedelta(weeks=2)),
        ("2026-12-31", Scope.JOB, datetime(2026, 12, 31, tzinfo=UTC)),
        ("2026-04-01T08:00:00+02:00", Scope.JOB, datetime(2026, 4, 1, 6, tzinfo=UTC)),
    ],
)
def test_expiry_flags(text: str | None, scope: Scope, expected: datetime | None) -> None:
    assert parse_expires(text, scope, NOW) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("never", "must expire"),
        ("0d", "not a time"),
        ("7 days", "not a time"),
        ("2026-04-01T08:00:00", "not a time"),  # a time without a zone is ambiguous across hosts
        ("2025-01-01", "not in the future"),
        ("999999w", "10 years"),
    ],
)
def test_bad_expiry_flags(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_expires(text, Scope.JOB, NOW)


# Nothing secret at rest


def test_the_store_holds_no_secret(store: TokenStore, location: str) -> None:
    issued = [_issue(store, Scope.ADMIN), _issue(store, Scope.JOB, run="r1"), _issue(store)]
    store.revoke(issued[2].info.token_id)
    dump = _dump(location)
    assert dump  # the rows are there
    for token in issued:
        secret = _secret_of(token)
        b64url = token.token.split("_", 3)[3]
        for needle in (
            secret,
            secret.hex().encode(),
            b64url.encode(),
            base64.b64encode(secret),
            token.token.encode(),
            hashlib.sha256(secret).digest(),  # not even an unbound hash of it
        ):
            assert needle not in dump


def _dump(location: str) -> bytes:
    """Every byte the database holds for the tokens: the SQLite files, or the table's rows as text."""
    if not is_postgres_location(location):
        return b"".join(path.read_bytes() for path in Path(location).parent.iterdir())
    import psycopg

    with psycopg.connect(location.split("?")[0]) as conn:
        schema = location.rsplit("schema=", 1)[1]
        rows = conn.execute(f"SELECT t::text, secret_hash FROM {schema}.server_tokens t").fetchall()
    return b"".join(text.encode() + bytes(raw) for text, raw in rows)


# Authentication


def test_a_token_authenticates_as_its_identity(store: TokenStore) -> None:
    job = _issue(store, Scope.JOB, run="r42")
    admin = _issue(store, Scope.ADMIN, expires_at=None)
    assert store.authenticate(job.token, NOW) == Identity(job.info.token_id, Scope.JOB, "r42")
    assert store.authenticate(admin.token, NOW + timedelta(days=3650)) == Identity(
        admin.info.token_id, Scope.ADMIN
    )
    assert store.authenticate(admin.token).scope is Scope.ADMIN  # `now` defaults to the clock


def test_a_wrong_secret_reads_as_an_unknown_id(store: TokenStore) -> None:
    issued = _issue(store)
    other = _issue(store)
    swapped = issued.token[: len("tgs_tg_00000000_")] + other.token[len("tgs_tg_00000000_") :]
    assert _reason(store, swapped) is AuthFailure.UNKNOWN
    unknown = "tgs_tg_00000000_" + issued.token[len("tgs_tg_00000000_") :]
    assert _reason(store, unknown) is AuthFailure.UNKNOWN


def test_expired_and_revoked(store: TokenStore) -> None:
    issued = _issue(store, expires_at=NOW + timedelta(hours=1))
    assert store.authenticate(issued.token, NOW + timedelta(minutes=59)).token_id == issued.info.token_id
    assert _reason(store, issued.token, NOW + timedelta(hours=1)) is AuthFailure.EXPIRED
    store.revoke(issued.info.token_id)
    assert _reason(store, issued.token, NOW) is AuthFailure.REVOKED
    assert _reason(store, issued.token, NOW + timedelta(hours=2)) is AuthFailure.REVOKED


def test_status_is_told_only_to_the_secret_holder(store: TokenStore) -> None:
    """Someone who knows only a public id learns nothing about it: expired or revoked, it is 'unknown'."""
    issued = _issue(store, expires_at=NOW + timedelta(hours=1))
    store.revoke(issued.info.token_id)
    guessed = issued.token[: len("tgs_tg_00000000_")] + "A" * 43
    assert _reason(store, guessed, NOW + timedelta(hours=2)) is AuthFailure.UNKNOWN


def _variants(token: str) -> list[object]:
    secret = token[len("tgs_tg_00000000_") :]
    return [
        "",
        "tgs_",
        token[:-1],
        token + "A",
        token.upper(),
        " " + token[1:],
        token.replace("tgs_", "tgx_"),
        token[:-1] + "B",  # the same 32 bytes spelt with a spare bit set: one spelling only
        token[: len("tgs_tg_")] + "0000000G_" + secret,
        token[:-2] + "é",
        token[:-1] + "\0",
        "tgs_" + "x" * 10_000_000,
        None,
        token.encode(),
        42,
        ["tgs_"],
    ]


def test_malformed_tokens(store: TokenStore) -> None:
    issued = _issue(store)
    for variant in _variants(issued.token):
        assert _reason(store, variant) is AuthFailure.MALFORMED, repr(variant)[:80]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fuzzed_tokens_never_raise_anything_but_ours(
    fuzz_target: tuple[TokenStore, IssuedToken], data: st.DataObject
) -> None:
    store, issued = fuzz_target
    token = data.draw(
        st.one_of(
            st.text(),
            st.text(alphabet="tgs_0123456789abcdefABCDEF-", min_size=50, max_size=70),
            st.binary().map(lambda raw: "tgs_" + base64.urlsafe_b64encode(raw).decode()),
            st.integers(0, TOKEN_LENGTH - 1).flatmap(
                lambda i: st.characters().map(lambda c: issued.token[:i] + c + issued.token[i + 1 :])
            ),
        )
    )
    try:
        identity = store.authenticate(token, NOW)
    except AuthenticationFailed as exc:
        assert exc.reason in {"malformed", "unknown"}
        assert exc.message == f"token rejected: {exc.reason}"  # never an echo of the input
    else:
        assert token == issued.token and identity.token_id == issued.info.token_id


# Authorization


def test_a_job_token_appends_to_its_own_run_only() -> None:
    job = Identity("tg_00000001", Scope.JOB, "r42")
    authorize(job, Action.APPEND, "r42")
    for action, run in [
        (Action.APPEND, "r43"),
        (Action.APPEND, None),
        (Action.APPEND, "R42"),
        (Action.READ, "r42"),
        (Action.MANAGE, None),
    ]:
        with pytest.raises(NotAuthorized) as caught:
            authorize(job, action, run)
        assert caught.value.reason == "forbidden"


def test_a_viewer_reads_and_writes_nothing() -> None:
    viewer = Identity("tg_00000002", Scope.VIEWER)
    authorize(viewer, Action.READ, "r42")
    authorize(viewer, Action.READ)
    for action in (Action.APPEND, Action.MANAGE):
        with pytest.raises(NotAuthorized):
            authorize(viewer, action, "r42")


def test_an_admin_may_do_everything() -> None:
    admin = Identity("tg_00000003", Scope.ADMIN)
    for action in Action:
        authorize(admin, action, "r42")
        authorize(admin, action)


def test_access_errors_are_trainguard_errors() -> None:
    assert issubclass(AuthenticationFailed, TrainguardError)
    assert issubclass(NotAuthorized, TrainguardError)


# Several processes, one database


def test_a_revocation_is_seen_by_every_store_at_once(location: str) -> None:
    """Two stores stand for two workers or hosts: nothing is cached, so the next check sees the change."""
    with TokenStore.open(location, create=True) as first, TokenStore.open(location) as second:
        issued = _issue(first, Scope.JOB, run="r1")
        assert second.authenticate(issued.token, NOW).run == "r1"
        second.revoke(issued.info.token_id)
        assert _reason(first, issued.token) is AuthFailure.REVOKED
        made_by_second = _issue(second)
        assert first.authenticate(made_by_second.token, NOW).token_id == made_by_second.info.token_id


# Where the tokens live


def test_only_create_makes_the_table(location: str) -> None:
    with pytest.raises(StoreError, match="no server tokens"):
        TokenStore.open(location)
    with TokenStore.open(location, create=True) as store:
        assert store.tokens() == []
    with TokenStore.open(location) as store:
        assert store.tokens() == []


def test_the_ledger_still_opens_a_store_made_for_tokens_first(location: str) -> None:
    with TokenStore.open(location, create=True) as store:
        issued = _issue(store)
    with Ledger.open(location, key=SigningKey.generate(ORIGIN), origin=ORIGIN) as ledger:
        ledger.append(event(0))
        assert ledger.verify().ok
    with TokenStore.open(location) as store:
        assert store.authenticate(issued.token, NOW).token_id == issued.info.token_id


def test_the_default_store_is_the_default_ledger(home: Path) -> None:
    with TokenStore.open(create=True) as store:
        issued = _issue(store)
        assert store.location == str(home / "ledger.db")
    with TokenStore.open(home / "ledger.db") as store:
        assert store.get(issued.info.token_id) == issued.info


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n" * 100)
    with pytest.raises(StoreError):
        TokenStore.open(path)
