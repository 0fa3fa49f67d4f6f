"""Webhooks: the outbox written in the append's transaction, signed deliveries to a real receiver,
retries, failure after the last attempt, no redirect, two workers never sending one row together.

End-to-end cases run `trainguard serve` as a process and configure it with `trainguard server webhook`;
the receiver is a real HTTP server on a thread. No test asserts on how long anything took.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.server.alerting_harness import FAST_HOOKS, Receiver, Site, event, make_site, wait_for
from tests.server.serve_process import cli
from trainguard.ledger import Ledger, SigningKey
from trainguard.ledger._store import Transaction
from trainguard.server import TokenStore
from trainguard.server._alerts import EventFilter
from trainguard.server._appended import on_append
from trainguard.server._eventkeys import AppendedEvent, EventKeys
from trainguard.server._sidetables import OUTBOX, create_tables, open_side_db
from trainguard.server._signature import SignatureInvalid, sign, verify_webhook
from trainguard.server._webhook_outbox import Outbox
from trainguard.server._webhook_sender import WebhookLimits, post
from trainguard.server._webhooks import add_webhook, check_url

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SECRET = b"a-receiver-secret-of-32-bytes!!!"


@pytest.fixture
def site(tmp_path: Path, location: str) -> Site:
    return make_site(tmp_path / "site", location)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver().start()
    yield hook
    hook.stop()


def _add(site: Site, url: str, *flags: str) -> str:
    return site.add_webhook(url, *flags, secret=SECRET)


def _deliveries(site: Site) -> dict[str, object]:
    done = cli(site.home, "server", "webhook", "deliveries", "--store", site.store, "--json")
    assert done.returncode in (0, 1), done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def _counts(site: Site) -> dict[str, int]:
    counts = _deliveries(site)["counts"]
    assert isinstance(counts, dict)
    return counts


def _settled(site: Site, delivered: int, failed: int = 0) -> bool:
    return _counts(site) == {"pending": 0, "delivered": delivered, "failed": failed}


# End to end


def test_an_alert_gets_exactly_one_signed_delivery(site: Site, receiver: Receiver) -> None:
    webhook_id = _add(site, receiver.url)
    with site.serve(*FAST_HOOKS) as server:
        items = [
            ("k/1", event(site.run, "run.start", command=["train"])),
            ("k/2", event(site.run, "monitor.alert", check="update-direction", rank=3)),
            ("k/3", event(site.run, "monitor.steps", rows=[])),
            ("k/4", event(site.run, "provenance.verify", ok=True)),
        ]
        assert server.post_events(site.run, items, site.job).status == 200
        wait_for("the delivery", lambda: _settled(site, delivered=1))
        output = server.output()
    assert receiver.count() == 1
    got = receiver.received[0]
    assert got.path == "/hooks/secret-path-token"
    moment = verify_webhook(SECRET, got.headers["x-trainguard-signature"], got.body)
    assert got.headers["x-trainguard-signature"] == sign(SECRET, got.body, moment)
    with pytest.raises(SignatureInvalid, match="does not match"):
        verify_webhook(b"another-secret-of-enough-bytes!", got.headers["x-trainguard-signature"], got.body)
    body = json.loads(got.body)
    assert body["delivery_id"] == got.headers["x-trainguard-delivery"]
    assert (body["webhook_id"], body["run"], body["schema_version"]) == (webhook_id, site.run, 1)
    assert body["event"]["type"] == "monitor.alert"
    assert body["event"]["payload"] == {"check": "update-direction", "rank": 3}
    with Ledger.open(site.store, create=False) as ledger:
        entries = {index: e.canonical() for index, e in ledger.entries()}
    assert json.loads(entries[body["ledger_index"]]) == body["event"]
    # Neither the secret nor the URL's path (which may hold one) reaches the server's log.
    assert SECRET.decode() not in output and "secret-path-token" not in output


def test_a_receiver_down_then_up_gets_the_alert_after_retries(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", str(tmp_path / "ledger.db"))
    receiver = Receiver()  # its port is chosen but nothing listens yet: connections are refused
    _add(site, receiver.url)
    with site.serve("--webhook-attempts", "10", "--webhook-backoff", "0.3") as server:
        assert (
            server.post_events(site.run, [("k", event(site.run, "run.rank_lost", rank=1))], site.job).status
            == 200
        )

        def failed_once() -> bool:
            rows = _deliveries(site)["deliveries"]
            assert isinstance(rows, list)
            return bool(rows) and rows[0]["attempts"] >= 1 and rows[0]["last_error"] is not None

        wait_for("a failed attempt", failed_once)
        receiver.start()
        try:
            wait_for("the delivery", lambda: _settled(site, delivered=1))
        finally:
            receiver.stop()
        assert "secret-path-token" not in server.output()
    rows = _deliveries(site)["deliveries"]
    assert isinstance(rows, list)
    assert rows[0]["attempts"] >= 2 and "ConnectionRefusedError" in rows[0]["last_error"]
    assert receiver.count() == 1


def test_a_receiver_that_always_fails_is_marked_failed_after_the_last_attempt(site: Site) -> None:
    receiver = Receiver(default=500).start()
    try:
        _add(site, receiver.url)
        with site.serve(*FAST_HOOKS) as server:
            assert (
                server.post_events(site.run, [("k", event(site.run, "spool.gap", lost=3))], site.job).status
                == 200
            )
            wait_for("the failure", lambda: _settled(site, delivered=0, failed=1))
            assert receiver.count() == 3  # --webhook-attempts 3, and not one more
            done = cli(site.home, "server", "webhook", "deliveries", "--store", site.store)
            assert done.returncode == 1 and "1 failed" in done.stdout and "HTTP 500" in done.stdout
            # Queued again by an admin once the receiver is fixed: delivered, still under the same id.
            receiver.default = 200
            again = cli(site.home, "server", "webhook", "retry", "--all", "--store", site.store)
            assert again.returncode == 0, again.stderr
            wait_for("the retried delivery", lambda: _settled(site, delivered=1))
    finally:
        receiver.stop()
    ids = {r.headers["x-trainguard-delivery"] for r in receiver.received}
    assert receiver.count() == 4 and len(ids) == 1


def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", str(tmp_path / "ledger.db"))
    receiver = Receiver(default=302).start()
    try:
        _add(site, receiver.url)
        with site.serve(*FAST_HOOKS) as server:
            assert (
                server.post_events(site.run, [("k", event(site.run, "run.kill", pids=[7]))], site.job).status
                == 200
            )
            wait_for("the failure", lambda: _settled(site, delivered=0, failed=1))
    finally:
        receiver.stop()
    assert {r.path for r in receiver.received} == {"/hooks/secret-path-token"}
    rows = _deliveries(site)["deliveries"]
    assert isinstance(rows, list) and "redirects are not followed" in rows[0]["last_error"]


def test_a_batch_rolled_back_on_a_key_conflict_sends_no_webhook(site: Site, receiver: Receiver) -> None:
    _add(site, receiver.url)
    with site.serve(*FAST_HOOKS) as server:
        assert (
            server.post_events(site.run, [("k/1", event(site.run, "test.step", i=1))], site.job).status == 200
        )
        conflicting = [
            ("k/1", event(site.run, "test.step", i=999)),  # the same key, other content: 409, all rolled back
            ("k/2", event(site.run, "monitor.alert", marker="rolled-back")),
        ]
        assert server.post_events(site.run, conflicting, site.job).status == 409
        sentinel = [("k/3", event(site.run, "monitor.alert", marker="kept"))]
        assert server.post_events(site.run, sentinel, site.job).status == 200
        wait_for("the sentinel's delivery", lambda: _settled(site, delivered=1))
    assert [b["event"]["payload"]["marker"] for b in receiver.bodies()] == ["kept"]


def test_filters_choose_the_events_and_failed_verifications_are_alerts(
    site: Site, receiver: Receiver
) -> None:
    _add(site, receiver.url)  # alerts
    _add(site, receiver.url, "--events", "run.end,provenance.*")
    with site.serve(*FAST_HOOKS) as server:
        items = [
            ("v/ok", event(site.run, "provenance.verify", ok=True)),
            ("v/bad", event(site.run, "provenance.verify", ok=False)),
            ("v/odd", event(site.run, "env.verify", ok="yes")),  # not literally true: fail closed
            ("end", event(site.run, "run.end", code=0)),
            ("step", event(site.run, "monitor.steps", rows=[])),
        ]
        assert server.post_events(site.run, items, site.job).status == 200
        # alerts: v/bad, v/odd; run.end,provenance.*: v/ok, v/bad, end.
        wait_for("five deliveries", lambda: _settled(site, delivered=5))
    seen = sorted((b["event"]["type"], str(b["event"]["payload"].get("ok"))) for b in receiver.bodies())
    assert seen == [
        ("env.verify", "yes"),
        ("provenance.verify", "False"),
        ("provenance.verify", "False"),
        ("provenance.verify", "True"),
        ("run.end", "None"),
    ]


@pytest.mark.parametrize("workers", [2])
def test_two_workers_deliver_every_row_exactly_once(tmp_path: Path, pg_location: str, workers: int) -> None:
    site = make_site(tmp_path / "site", pg_location)
    receiver = Receiver(hold_s=0.02).start()
    try:
        _add(site, receiver.url)
        with site.serve(*FAST_HOOKS, workers=workers) as server:
            for batch in range(6):
                items = [
                    (f"b{batch}/{i}", event(site.run, "monitor.alert", n=batch * 10 + i)) for i in range(10)
                ]
                assert server.post_events(site.run, items, site.job).status == 200
            wait_for("sixty deliveries", lambda: _settled(site, delivered=60))
    finally:
        receiver.stop()
    ids = [r.headers["x-trainguard-delivery"] for r in receiver.received]
    assert len(ids) == 60 and len(set(ids)) == 60
    assert sorted(b["event"]["payload"]["n"] for b in receiver.bodies()) == list(range(60))


# The outbox in process, on a real database


def _ledger(tmp_path: Path, location: str) -> tuple[Ledger, SigningKey]:
    key = SigningKey.generate("test.example/outbox")
    ledger = Ledger.open(location, key=key)
    TokenStore.open(location, create=True).close()
    create_tables(ledger.store)
    return ledger, key


def test_an_append_that_rolls_back_leaves_no_outbox_row(tmp_path: Path, location: str) -> None:
    ledger, key = _ledger(tmp_path, location)
    try:
        add_webhook(
            ledger.store,
            "https://alerts.example/hook",
            SECRET,
            EventFilter("alerts"),
            label="",
            created_by="t",
        )

        def fail_after(tx: Transaction, run: str, appended: Sequence[AppendedEvent]) -> None:
            raise RuntimeError("a later hook failed")

        keys = EventKeys(ledger.store, key, hooks=[on_append, fail_after])
        with pytest.raises(RuntimeError):
            keys.append("r", [("k", event("r", "monitor.alert"))], "tg_00000000")
        assert ledger.store.read(f"SELECT count(*) FROM {OUTBOX}")[0][0] == 0
        assert ledger.store.read("SELECT count(*) FROM server_event_counts")[0][0] == 0
        assert ledger.size == 0
    finally:
        ledger.close()


def test_two_claimers_never_hold_one_row_together(tmp_path: Path, location: str) -> None:
    ledger, key = _ledger(tmp_path, location)
    try:
        add_webhook(
            ledger.store, "https://alerts.example/hook", SECRET, EventFilter("*"), label="", created_by="t"
        )
        keys = EventKeys(ledger.store, key, hooks=[on_append])
        # Six runs of 50 alerts: each stays under the limit of deliveries waiting per run.
        for batch in range(6):
            run = f"r{batch}"
            keys.append(
                run, [(f"{batch}/{i}", event(run, "monitor.alert", i=i)) for i in range(50)], "tg_00000000"
            )
    finally:
        ledger.close()
    claimed: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def claimer(slot: int) -> None:
        db = open_side_db(location)
        try:
            outbox = Outbox(db)
            start.wait()
            while rows := outbox.claim(7, lease_s=600):
                claimed[slot].extend(row.delivery_id for row in rows)
        finally:
            db.close()

    threads = [threading.Thread(target=claimer, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not set(claimed[0]) & set(claimed[1])
    assert len(claimed[0]) + len(claimed[1]) == 300 == len(set(claimed[0]) | set(claimed[1]))


def test_an_outcome_from_a_lost_lease_is_not_recorded(tmp_path: Path, location: str) -> None:
    ledger, key = _ledger(tmp_path, location)
    try:
        add_webhook(
            ledger.store, "https://alerts.example/hook", SECRET, EventFilter("*"), label="", created_by="t"
        )
        EventKeys(ledger.store, key, hooks=[on_append]).append("r", [("k", event("r", "x"))], "tg_00000000")
    finally:
        ledger.close()
    db = open_side_db(location)
    try:
        outbox = Outbox(db)
        (first,) = outbox.claim(1, lease_s=0.0)  # a lease that is over at once: as if the worker stalled
        (second,) = outbox.claim(1, lease_s=600)
        assert second.attempt == first.attempt + 1
        assert not outbox.delivered(first)  # the stalled worker's word no longer counts
        assert outbox.failed(second, "HTTP 500")
        assert outbox.counts() == {"pending": 0, "delivered": 0, "failed": 1}
    finally:
        db.close()


# Pieces


def test_a_receiver_dripping_its_answer_is_cut_off(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            with contextlib.suppress(OSError):
                while not stop.wait(0.2):  # a header byte at a time, forever: every read gets data
                    conn.sendall(b"X")

    threading.Thread(target=drip, daemon=True).start()
    limits = WebhookLimits(connect_timeout_s=1.0, answer_timeout_s=1.0)
    result: list[str | None] = []
    worker = threading.Thread(
        target=lambda: result.append(post(f"http://127.0.0.1:{port}/", b"{}", {}, limits))
    )
    worker.start()
    worker.join(60)
    stop.set()
    listener.close()
    assert result and result[0] is not None and "deadline" in result[0]


def test_a_signature_is_refused_when_old_tampered_or_malformed() -> None:
    body = b'{"event":1}'
    header = sign(SECRET, body, 1_000_000)
    assert verify_webhook(SECRET, header, body, now=1_000_100) == 1_000_000
    with pytest.raises(SignatureInvalid, match="old"):
        verify_webhook(SECRET, header, body, now=1_000_000 + 301)  # a replay after the tolerance
    with pytest.raises(SignatureInvalid, match="does not match"):
        verify_webhook(SECRET, header, b'{"event":2}', now=1_000_000)
    for bad in ("", "t=1", "v1=" + "0" * 64, f"t=abc,v1={'0' * 64}", header.upper()):
        with pytest.raises(SignatureInvalid):
            verify_webhook(SECRET, bad, body, now=1_000_000)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://alerts.example/hook", "in clear"),
        ("ftp://alerts.example/hook", "https://"),
        ("https://user:pw@alerts.example/hook", "user:password"),
        ("https://alerts.example:0/hook", "port"),
        ("https://alerts.example/hook#frag", "fragment"),
        ("https://alerts.example/a b", "printable"),
        ("https:///nohost", "https://"),
    ],
)
def test_a_bad_webhook_url_is_refused(url: str, problem: str) -> None:
    from trainguard.errors import UsageError

    with pytest.raises(UsageError, match=problem):
        check_url(url)


def test_http_is_allowed_to_loopback_or_when_asked() -> None:
    for url in ("http://127.0.0.1:9/x", "http://[::1]/x", "http://localhost/x"):
        assert check_url(url) == url
    assert check_url("http://alerts.internal/x", allow_http=True) == "http://alerts.internal/x"


def test_the_command_line_manages_webhooks_without_showing_secrets(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", str(tmp_path / "ledger.db"))
    refused = cli(site.home, "server", "webhook", "add", "http://alerts.example/x", "--store", site.store)
    assert refused.returncode == 2 and "in clear" in refused.stderr and "Traceback" not in refused.stderr
    short = tmp_path / "short"
    short.write_text("tiny\n")
    done = cli(
        site.home,
        "server",
        "webhook",
        "add",
        "https://a.example/x",
        "--store",
        site.store,
        "--secret-file",
        str(short),
    )
    assert done.returncode == 2 and "shorter than 16 bytes" in done.stderr
    bad = cli(
        site.home, "server", "webhook", "add", "https://a.example/x", "--store", site.store, "--events", "a b"
    )
    assert bad.returncode == 2 and "event filter item" in bad.stderr
    made = cli(
        site.home,
        "server",
        "webhook",
        "add",
        "https://a.example/path-secret",
        "--store",
        site.store,
        "--label",
        "ops",
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert len(secret) >= 43 and "only time" in made.stderr
    listed = cli(site.home, "server", "webhook", "list", "--store", site.store, "--json")
    (hook,) = json.loads(listed.stdout)["webhooks"]
    assert hook["url"] == "https://a.example/..." and hook["events"] == "alerts" and hook["label"] == "ops"
    text = cli(site.home, "server", "webhook", "list", "--store", site.store).stdout
    for shown in (listed.stdout, text):
        assert secret not in shown and "path-secret" not in shown
    assert cli(site.home, "server", "webhook", "remove", "wh_00000000", "--store", site.store).returncode == 2
    gone = cli(site.home, "server", "webhook", "remove", hook["id"], "--store", site.store)
    assert gone.returncode == 0, gone.stderr
    assert cli(site.home, "server", "webhook", "list", "--store", site.store).stdout == "no webhooks\n"


def test_the_readme_receiver_snippet_agrees_with_verify_webhook() -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    match = re.search(r"```python\n(import hashlib, hmac, re, time\n.*?)```", readme, re.S)
    assert match, "README lost its webhook receiver snippet"
    scope: dict[str, object] = {}
    exec(match[1], scope)
    verify = scope["verify"]
    assert callable(verify)
    body = b'{"event":{"type":"monitor.alert"}}'
    header = sign(SECRET, body, int(time.time()))
    assert verify(SECRET, header, body) is True
    assert verify(SECRET, header, body + b" ") is False
    assert verify(b"x" * 32, header, body) is False
    assert verify(SECRET, sign(SECRET, body, int(time.time()) - 3600), body) is False


def test_deliveries_of_a_removed_webhook_are_marked_failed_not_dropped(tmp_path: Path, location: str) -> None:
    from trainguard.server._metrics import WorkerMetrics
    from trainguard.server._webhooks import remove_webhook

    ledger, key = _ledger(tmp_path, location)
    try:
        hook = add_webhook(
            ledger.store, "https://alerts.example/h", SECRET, EventFilter("*"), label="", created_by="t"
        )
        EventKeys(ledger.store, key, hooks=[on_append]).append(
            "r", [("k", event("r", "monitor.alert"))], "tg_0"
        )
        assert remove_webhook(ledger.store, hook.webhook_id)
    finally:
        ledger.close()
    db = open_side_db(location)
    try:
        from trainguard.server._webhook_sender import WebhookSender

        assert WebhookSender(db, WebhookLimits(), WorkerMetrics()).send_due() == 1
        rows = Outbox(db).rows("failed", 10)
        assert [(r.state, r.last_error) for r in rows] == [("failed", "the webhook was removed")]
    finally:
        db.close()


def test_a_run_flooding_alerts_pages_at_most_the_limit_and_one_notice_until_its_backlog_drains(
    tmp_path: Path, location: str
) -> None:
    from trainguard.server._appended import MAX_PENDING_PER_RUN, SUPPRESSED

    ledger, key = _ledger(tmp_path, location)
    try:
        add_webhook(
            ledger.store,
            "https://alerts.example/hook",
            SECRET,
            EventFilter("alerts"),
            label="",
            created_by="t",
        )
        keys = EventKeys(ledger.store, key, hooks=[on_append])

        def alerts(run: str, first: int, n: int) -> list[tuple[str, bytes]]:
            return [(f"k/{i}", event(run, "monitor.alert", i=i)) for i in range(first, first + n)]

        def outbox(run: str) -> list[tuple[str, str]]:
            rows = ledger.store.read(
                f"SELECT state, event FROM {OUTBOX} WHERE run = ? ORDER BY ledger_index", (run,)
            )
            return [(str(state), json.loads(bytes(data))["type"]) for state, data in rows]

        keys.append("flood", alerts("flood", 0, MAX_PENDING_PER_RUN + 50), "tg_00000000")
        keys.append("flood", alerts("flood", MAX_PENDING_PER_RUN + 50, 10), "tg_00000000")
        queued = outbox("flood")
        assert [kind for _, kind in queued] == ["monitor.alert"] * MAX_PENDING_PER_RUN + [SUPPRESSED]
        assert ledger.size == MAX_PENDING_PER_RUN + 60  # every alert is in the ledger all the same
        # Another run is not held back by the flooding one.
        keys.append("quiet", alerts("quiet", 0, 1), "tg_00000000")
        assert outbox("quiet") == [("pending", "monitor.alert")]
        # Once deliveries drain, the run's next alerts are sent again.
        ledger.store.transaction(
            lambda tx: tx.execute(f"UPDATE {OUTBOX} SET state = 'delivered' WHERE run = ?", ("flood",))
        )
        keys.append("flood", alerts("flood", 1000, 2), "tg_00000000")
        assert [kind for state, kind in outbox("flood") if state == "pending"] == ["monitor.alert"] * 2
    finally:
        ledger.close()
