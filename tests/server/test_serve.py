"""`trainguard serve`, run as real processes (uvicorn workers) on SQLite and on PostgreSQL.

Tokens are made with `trainguard server token create`; jobs deliver with the real Delivery client. Every
test waits for conditions with a generous deadline; none asserts on how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.ledger.conftest import PG_URL, pg_schema, with_query
from tests.server.serve_process import Answer, Serve, cli, events_batch, events_path, make_token
from trainguard.ledger import Ledger, SigningKey, new_event
from trainguard.relay._delivery import Delivery, DeliveryLimits
from trainguard.relay._spool import Spool
from trainguard.server import Scope, TokenStore

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ORIGIN = "test.example/serve"
RUN = "exp/7 é"  # a slash and non-ASCII: quoted into the URL by the client, routed back whole
OTHER = "other-run"
DEADLINE_S = 90.0
FAST = DeliveryLimits(timeout_s=10.0, batch_events=20, backoff_base_s=0.02, backoff_cap_s=0.2, poll_s=0.05)
SECURITY = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _items(run: str, prefix: str, n: int, **payload: Any) -> list[tuple[str, bytes]]:
    return [
        (f"{prefix}/{i}", new_event("test.step", {"i": i, **payload}, run_id=run).canonical())
        for i in range(n)
    ]


def _run_entries(store: str, run: str) -> list[bytes]:
    """The canonical bytes of every entry of `run`, in log order (read without the signing key)."""
    with Ledger.open(store, create=False) as ledger:
        return [event.canonical() for _, event in ledger.entries() if event.run_id == run]


@dataclass
class Cluster:
    home: Path
    store: str
    server: Serve
    admin: str
    viewer: str
    job: str
    """A job token for RUN."""
    other_job: str
    """A job token for OTHER."""
    revoked: str
    expired: str


@contextlib.contextmanager
def _cluster(home: Path, store: str, workers: int) -> Iterator[Cluster]:
    key = home / "keys" / "serve.key"
    key.parent.mkdir(parents=True, exist_ok=True)
    SigningKey.generate(ORIGIN).save(key)
    admin = make_token(home, store, "--scope", "admin")
    viewer = make_token(home, store, "--scope", "viewer")
    job = make_token(home, store, "--scope", "job", "--run", RUN, "--expires", "1h")
    other_job = make_token(home, store, "--scope", "job", "--run", OTHER, "--expires", "1h")
    revoked = make_token(home, store, "--scope", "viewer")
    done = cli(home, "server", "token", "revoke", "--store", store, revoked[len("tgs_") : len("tgs_") + 11])
    assert done.returncode == 0, done.stderr
    # Made an hour ago, expired half an hour ago: the store takes `now`, the command line does not.
    past = datetime.now(UTC) - timedelta(hours=1)
    with TokenStore.open(store) as tokens:
        expired = tokens.create(
            Scope.ADMIN, expires_at=past + timedelta(minutes=30), created_by="test", now=past
        ).token
    server = Serve.command(home, store, key, workers=workers).start()
    try:
        yield Cluster(home, store, server, admin, viewer, job, other_job, revoked, expired)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One SQLite-backed server for the module's tests; each test writes runs of its own."""
    home = tmp_path_factory.mktemp("serve")
    with _cluster(home, str(home / "ledger.db"), workers=1) as c:
        yield c


def _tokens(c: Cluster) -> list[str]:
    return [c.admin, c.viewer, c.job, c.other_job, c.revoked, c.expired]


def _assert_security_headers(answer: Answer, cache: str = "no-store") -> None:
    for name, value in SECURITY.items():
        assert answer.headers.get(name) == value, (name, answer.headers)
    assert answer.headers["content-security-policy"].startswith("default-src 'none'")
    assert answer.headers["cache-control"] == cache
    assert "server" not in answer.headers  # no software banner


# Ingest


def _deliver(c: Cluster, run: str, token: str, n: int) -> list[str]:
    spool = Spool.open(run, path=c.home / f"spool-{n}-{time.monotonic_ns()}.db")
    try:
        keys = spool.put_many([new_event("test.step", {"i": i}, run_id=run) for i in range(n)])
        delivery = Delivery(spool, c.server.url, token, limits=FAST)
        report = delivery.close(timeout=DEADLINE_S)
        assert (report.remaining, report.delivered, report.rejections) == (0, n, 0), report
    finally:
        spool.close()
    return keys


def test_delivery_appends_200_events_exactly_once(cluster: Cluster) -> None:
    _deliver(cluster, RUN, cluster.job, 200)
    entries = _run_entries(cluster.store, RUN)
    assert [json.loads(data)["payload"]["i"] for data in entries] == list(range(200))
    with Ledger.open(cluster.store, create=False) as ledger:
        assert ledger.verify().ok


def test_a_retried_batch_is_answered_as_duplicates(cluster: Cluster) -> None:
    run = "retry"
    items = _items(run, "spool-a", 6)
    first = cluster.server.post_events(run, items[:4], cluster.admin)
    assert first.status == 200 and first.json() == {"accepted": [k for k, _ in items[:4]], "duplicates": []}
    # The answer was lost; the job sends the batch again, with two new events.
    again = cluster.server.post_events(run, items, cluster.admin)
    assert again.json() == {
        "accepted": [k for k, _ in items[4:]],
        "duplicates": [k for k, _ in items[:4]],
    }
    assert _run_entries(cluster.store, run) == [data for _, data in items]


def test_a_key_sent_again_with_other_content_is_a_conflict_and_nothing_of_the_batch_is_appended(
    cluster: Cluster,
) -> None:
    run = "conflict"
    items = _items(run, "spool-c", 3)
    assert cluster.server.post_events(run, items[:2], cluster.admin).status == 200
    # The spool was edited after the first send: key 1 now carries other content, key 2 is new.
    edited = [items[0], _items(run, "spool-c", 2, edited=True)[1], items[2]]
    answer = cluster.server.post_events(run, edited, cluster.admin)
    assert answer.status == 409 and answer.json()["error"] == "conflict", answer.body
    assert "spool-c/1" in answer.json()["message"] and "spool-c/0" not in answer.json()["message"]
    assert _run_entries(cluster.store, run) == [data for _, data in items[:2]]  # key 2 not appended either


def test_each_entry_records_the_token_that_sent_it(cluster: Cluster) -> None:
    run = RUN
    by_job = _items(run, "who-job", 2)
    by_admin = _items(run, "who-admin", 1)
    assert cluster.server.post_events(run, by_job, cluster.job).status == 200
    assert cluster.server.post_events(run, by_admin, cluster.admin).status == 200
    with Ledger.open(cluster.store, create=False) as ledger:
        rows = ledger.store.read(
            "SELECT key, token_id FROM server_event_keys WHERE run = ? AND key LIKE 'who-%' ORDER BY key",
            [run],
        )
    token_id = {
        c: t[len("tgs_") : len("tgs_") + 11] for c, t in (("job", cluster.job), ("admin", cluster.admin))
    }
    assert rows == [
        ("who-admin/0", token_id["admin"]),
        ("who-job/0", token_id["job"]),
        ("who-job/1", token_id["job"]),
    ]


def test_keys_are_per_run_so_one_job_cannot_shadow_another(cluster: Cluster) -> None:
    own = _items(OTHER, "shared-key", 1)
    theirs = _items(RUN, "shared-key", 1)
    assert cluster.server.post_events(OTHER, own, cluster.other_job).json()["accepted"] == ["shared-key/0"]
    assert cluster.server.post_events(RUN, theirs, cluster.job).json()["accepted"] == ["shared-key/0"]


def _race(server: Serve, run: str, items: list[tuple[str, bytes]], token: str, posts: int) -> list[Any]:
    barrier = threading.Barrier(posts)
    answers: list[Any] = [None] * posts

    def post(i: int) -> None:
        barrier.wait()
        answers[i] = server.post_events(run, items, token).json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(posts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
    return answers


def _assert_appended_once(store: str, run: str, items: list[tuple[str, bytes]], answers: list[Any]) -> None:
    accepted = [key for answer in answers for key in answer["accepted"]]
    assert sorted(accepted) == sorted(key for key, _ in items)  # each key accepted by exactly one post
    for answer in answers:
        assert sorted(answer["accepted"] + answer["duplicates"]) == sorted(key for key, _ in items)
    assert sorted(_run_entries(store, run)) == sorted(data for _, data in items)


def test_concurrent_posts_of_one_batch_append_it_once(cluster: Cluster) -> None:
    items = _items("race", "spool-r", 50)
    answers = _race(cluster.server, "race", items, cluster.admin, posts=4)
    _assert_appended_once(cluster.store, "race", items, answers)


# Access


def test_every_kind_of_bad_token_gets_one_401(cluster: Cluster) -> None:
    server = cluster.server
    wrong_secret = cluster.admin[:-5] + ("AAAAA" if not cluster.admin.endswith("AAAAA") else "BBBBA")
    attempts: list[dict[str, str]] = [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": f"Bearer {wrong_secret}"},
        {"Authorization": f"Bearer {cluster.revoked}"},
        {"Authorization": f"Bearer {cluster.expired}"},
    ]
    bodies = set()
    for headers in attempts:
        for method, path, body in (
            ("GET", "/checkpoint", None),
            ("GET", "/openapi.json", None),
            ("POST", events_path(RUN), events_batch(_items(RUN, "unauth", 1))),
        ):
            answer = server.request(method, path, body, headers=headers)
            assert answer.status == 401, (headers, path, answer)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            _assert_security_headers(answer)
            bodies.add(answer.body)
    assert len(bodies) == 1 and json.loads(bodies.pop())["error"] == "unauthenticated"
    assert not [d for d in _run_entries(cluster.store, RUN) if b"unauth/" in d]


def test_scopes_are_enforced_with_403(cluster: Cluster) -> None:
    server = cluster.server
    before = {run: len(_run_entries(cluster.store, run)) for run in (RUN, OTHER)}
    # A job token writing another run: by the URL, and by the events' run id.
    assert server.post_events(OTHER, _items(OTHER, "x", 1), cluster.job).status == 403
    assert server.post_events(RUN, _items(OTHER, "y", 1), cluster.job).status == 403
    # A viewer writes nothing; a job token reads nothing.
    assert server.post_events(RUN, _items(RUN, "z", 1), cluster.viewer).status == 403
    assert server.request("GET", "/checkpoint", token=cluster.job).status == 403
    assert server.request("GET", events_path(RUN), token=cluster.job).status == 403
    # An admin may write any run, but a batch must belong to the run its URL names.
    mismatched = server.post_events(OTHER, _items(RUN, "w", 1), cluster.admin)
    assert mismatched.status == 400 and mismatched.json()["error"] == "bad_request"
    assert {run: len(_run_entries(cluster.store, run)) for run in (RUN, OTHER)} == before


def test_malformed_batches_are_400(cluster: Cluster) -> None:
    server = cluster.server
    event = _items(RUN, "m", 1)[0][1]
    bad = [
        b"not json",
        b'{"events": []}',
        b'{"events": {}}',
        b'{"events": [{"key": "a"}]}',
        b'{"events": [{"key": "a b", "event": ' + event + b"}]}",
        b'{"events": [{"key": "a", "event": {"type": "x"}}]}',
        b'{"events": [{"key": "a", "event": ' + event + b'}, {"key": "a", "event": ' + event + b"}]}",
        b'{"events": [], "events": []}',
        b"[" * 100_000,
    ]
    for body in bad:
        answer = server.request("POST", events_path(RUN), body, cluster.job)
        assert answer.status == 400, (body[:60], answer)
        assert answer.json()["error"] == "bad_request"
    assert server.request("GET", events_path(RUN) + "?limit=0", token=cluster.viewer).status == 400


def test_an_oversized_body_is_refused_before_it_is_read(cluster: Cluster) -> None:
    # Headers announce 1 GiB; only a few bytes follow. The answer comes anyway: nothing waited for the rest.
    with socket.create_connection(("127.0.0.1", cluster.server.port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST {events_path(RUN)} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {cluster.job}"
                f"\r\nContent-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n"
                '{"events": ['
            ).encode()
        )
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413 "), head
    assert "nosniff" in head


def test_an_oversized_event_or_batch_is_413(cluster: Cluster) -> None:
    server = cluster.server
    big = _items(RUN, "big", 1, blob="x" * 70_000)
    answer = server.post_events(RUN, big, cluster.job)
    assert answer.status == 413 and answer.json()["error"] == "too_large"
    many = [(f"many/{i}", data) for i, (_, data) in enumerate(_items(RUN, "many", 1) * 1001)]
    assert server.post_events(RUN, many, cluster.job).status == 413


# Read path


def test_html_in_an_event_comes_back_as_json(cluster: Cluster) -> None:
    run = "xss"
    script = "<script>alert(document.cookie)</script>"
    items = [("xss/0", new_event("<img src=x onerror=alert(1)>", {"note": script}, run_id=run).canonical())]
    assert cluster.server.post_events(run, items, cluster.admin).json()["accepted"] == ["xss/0"]
    answer = cluster.server.request("GET", events_path(run), token=cluster.viewer)
    assert answer.status == 200
    _assert_security_headers(answer)
    doc = answer.json()  # application/json, exactly
    assert [item["event"]["payload"]["note"] for item in doc["events"]] == [script]
    assert doc["next"] is None
    # Every error is JSON too: nothing this server sends is HTML.
    for path in ("/nope", "/tile/0/999", "/docs", "/redoc"):
        missing = cluster.server.request("GET", path, token=cluster.viewer)
        assert missing.status == 404 and missing.headers["content-type"] == "application/json"


def test_run_events_are_paged_in_bounded_windows(cluster: Cluster) -> None:
    run = "paged"
    items = _items(run, "page", 30)
    cluster.server.post_events(run, items, cluster.admin)
    seen: list[int] = []
    start: int | None = 0
    while start is not None:
        doc = cluster.server.request("GET", f"{events_path(run)}?start={start}&limit=7", token=cluster.viewer)
        page = doc.json()
        assert len(page["events"]) <= 7
        seen.extend(item["event"]["payload"]["i"] for item in page["events"])
        start = page["next"]
    assert seen == list(range(30))


def test_tiles_are_byte_identical_to_ledger_tiles(cluster: Cluster, tmp_path: Path) -> None:
    # Enough entries for full tiles at level 0 and a partial one at level 1.
    for batch in range(3):
        cluster.server.post_events("tiles", _items("tiles", f"tiles-{batch}", 200), cluster.admin)
    out = tmp_path / "tiles"
    done = cli(cluster.home, "ledger", "tiles", "--store", cluster.store, str(out))
    assert done.returncode == 0, done.stderr
    files = sorted(p for p in out.rglob("*") if p.is_file())
    relatives = [p.relative_to(out).as_posix() for p in files]
    assert "checkpoint" in relatives and "tile/0/000" in relatives and "tile/entries/001" in relatives
    for path in files:
        relative = path.relative_to(out).as_posix()
        answer = cluster.server.request("GET", f"/{relative}", token=cluster.viewer)
        assert answer.status == 200, relative
        assert answer.body == path.read_bytes(), relative
        full = relative != "checkpoint" and ".p/" not in relative
        _assert_security_headers(answer, "private, max-age=31536000, immutable" if full else "no-store")
    # Paths C2SP does not spell this way are not tiles.
    for path in ("/tile/0/0", "/tile/0/x000/000", "/tile/00/000", "/tile/0/000.p/0", "/tile/0/000.p/256"):
        assert cluster.server.request("GET", path, token=cluster.viewer).status == 404, path


def test_health_and_openapi(cluster: Cluster) -> None:
    health = cluster.server.request("GET", "/healthz")
    assert health.status == 200 and health.json() == {"status": "ok"}
    _assert_security_headers(health)
    assert cluster.server.request("GET", "/openapi.json").status == 401
    spec = cluster.server.request("GET", "/openapi.json", token=cluster.viewer)
    assert spec.status == 200
    doc = spec.json()
    assert {"/api/v1/runs/{run}/events", "/checkpoint", "/tile/{path}"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_no_token_ever_reaches_the_log(cluster: Cluster) -> None:
    server = cluster.server
    for token in _tokens(cluster):
        server.request("GET", "/checkpoint", token=token)
        server.post_events(RUN, _items(RUN, "log", 1), token)
    output = server.output()
    assert '"POST /api/v1/runs/' in output  # the access log is on...
    for token in _tokens(cluster):
        assert token.split("_", 3)[3] not in output  # ...and no secret is in it, nor anywhere else


def test_serve_help_imports_no_web_framework() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from trainguard.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    main(['serve', '--help'])\n"
        "assert '--workers' in out.getvalue(), out.getvalue()\n"
        "assert not {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules), 'imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr


# PostgreSQL: two workers share one schema


def test_two_workers_on_postgresql_append_each_event_once(tmp_path: Path) -> None:
    with pg_schema() as schema:
        store = with_query(PG_URL, schema=schema)
        with _cluster(tmp_path, store, workers=2) as c:
            _deliver(c, RUN, c.job, 200)
            entries = _run_entries(store, RUN)
            assert [json.loads(data)["payload"]["i"] for data in entries] == list(range(200))
            for round_ in range(3):
                run = f"race-{round_}"
                items = _items(run, "pg", 40)
                answers = _race(c.server, run, items, c.admin, posts=4)
                _assert_appended_once(store, run, items, answers)
            assert c.server.request("GET", "/checkpoint", token=c.revoked).status == 401
            with Ledger.open(store, create=False) as ledger:
                assert ledger.verify().ok


def test_a_key_stored_between_the_read_and_the_lock_rolls_the_append_back(
    location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers read "not stored" for the same key; the second one's append must roll back, not land
    twice. Played deterministically: worker B's first read is made to miss what worker A stored."""
    from trainguard.server._app import open_server

    key = tmp_path / "ledger.key"
    SigningKey.generate(ORIGIN).save(key)
    TokenStore.open(location, create=True).close()
    a, b = open_server(location, key), open_server(location, key)
    try:
        items = _items("r", "k", 3)
        assert a.keys.append("r", items[:2], "tg_0000000a") == (["k/0", "k/1"], [])
        real = b.keys.known
        reads: list[set[str]] = []

        def stale_once(run: str, keys: list[str]) -> dict[str, bytes]:
            found = {} if not reads else real(run, keys)
            reads.append(set(found))
            return found

        monkeypatch.setattr(b.keys, "known", stale_once)
        # B believes none is stored, appends all three, finds k/0 and k/1 taken inside its transaction,
        # rolls back, looks again and appends k/2 alone.
        assert b.keys.append("r", items, "tg_0000000b") == (["k/2"], ["k/0", "k/1"])
        assert reads == [set(), {"k/0", "k/1"}]  # the rolled-back try, then the one that went in
        assert _run_entries(location, "r") == [data for _, data in items]
        assert b.ledger.verify().ok
    finally:
        a.close()
        b.close()
