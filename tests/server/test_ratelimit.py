"""Rate limits: shared by two workers through PostgreSQL, a generic 429 with Retry-After, failed
authentications slowing an address down, and the job's Delivery honouring 429 + Retry-After.

Counts are checked against the database's own window rows, so no assertion depends on where a window
boundary fell or on how long anything took.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.server.alerting_harness import Site, event, make_site, wait_for
from trainguard.ledger import Ledger, new_event
from trainguard.relay._delivery import Delivery, DeliveryLimits
from trainguard.relay._spool import Spool
from trainguard.server._ratelimit import RateLimits, client_bucket
from trainguard.server._sidetables import LIMITS, METRICS, open_side_db

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

GENERIC = {"error": "rate_limited", "message": "too many requests; retry later"}


def _token_id(token: str) -> str:
    return "_".join(token.split("_", 3)[1:3])


def _windows(site: Site, bucket: str) -> list[int]:
    db = open_side_db(site.store)
    try:
        return [
            int(r[0])
            for r in db.rows(f"SELECT hits FROM {LIMITS} WHERE bucket = ? ORDER BY window_start", (bucket,))
        ]
    finally:
        db.close()


def test_two_workers_share_one_limit_per_token(tmp_path: Path, pg_location: str) -> None:
    site = make_site(tmp_path / "site", pg_location)
    limit = 10
    with site.serve("--rate-job", str(limit), "--rate-window", "3600", workers=2) as server:
        answers = [
            server.post_events(site.run, [(f"k/{i}", event(site.run, "test.step", i=i))], site.job)
            for i in range(3 * limit)
        ]
        # The viewer has a bucket of its own: the job's exhaustion does not touch it.
        assert server.request("GET", "/checkpoint", token=site.viewer).status == 200
        refused = [a for a in answers if a.status == 429]
        for answer in refused:
            assert answer.json(typed=False) == GENERIC
            assert answer.headers["retry-after"].isdigit() and 1 <= int(answer.headers["retry-after"]) <= 3600
        assert {a.status for a in answers} == {200, 429}
        hits = _windows(site, f"token:{_token_id(site.job)}")
        assert sum(hits) == 3 * limit
        assert len(answers) - len(refused) == sum(min(h, limit) for h in hits)

        def both_workers_answered() -> bool:
            # A new connection each time: the kernel hands it to either worker, so both get some in the end.
            time.sleep(0.2)
            assert server.request("GET", "/healthz").status == 200
            db = open_side_db(site.store)
            try:
                rows = db.rows(
                    f"SELECT DISTINCT worker FROM {METRICS} WHERE name = 'trainguard_http_requests'"
                )
            finally:
                db.close()
            return len(rows) == 2

        wait_for("both workers' counters", both_workers_answered)
        assert "rate limited POST" in server.output() and site.job.split("_", 3)[3] not in server.output()
    with Ledger.open(site.store, create=False) as ledger:
        assert ledger.size == len(answers) - len(refused)


def test_failed_authentications_lock_an_address_out(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", str(tmp_path / "ledger.db"))
    with site.serve("--rate-failures", "5", "--rate-window", "3600") as server:
        statuses = [
            server.request("GET", "/checkpoint", token=f"tgs_tg_0000000{i % 10}_{'A' * 43}").status
            for i in range(5)
        ]
        statuses.append(server.request("GET", "/checkpoint").status)  # no token at all counts too
        locked = server.request("GET", "/checkpoint", token=site.viewer)
        output = server.output()
    hits = _windows(site, "addr:127.0.0.1")
    if len(hits) == 1:  # all in one window: the sixth failure and the valid token are refused unheard
        assert statuses == [401] * 5 + [429]
        assert (
            locked.status == 429 and locked.json(typed=False) == GENERIC and "retry-after" in locked.headers
        )
    else:  # a window boundary fell in between: still never more than the limit of 401s per window
        assert statuses.count(401) <= 5 * len(hits)
    assert site.viewer.split("_", 3)[3] not in output


def test_the_jobs_delivery_honours_429_and_retry_after(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", str(tmp_path / "ledger.db"))
    limit, total = 4, 24
    with site.serve("--rate-job", str(limit), "--rate-window", "1") as server:
        spool = Spool.open(site.run, path=tmp_path / "spool.db")
        try:
            spool.put_many([new_event("test.step", {"i": i}, run_id=site.run) for i in range(total)])
            limits = DeliveryLimits(
                timeout_s=10.0, batch_events=1, backoff_base_s=0.02, backoff_cap_s=5.0, poll_s=0.05
            )
            delivery = Delivery(spool, server.url, site.job, limits=limits)
            # A training loop puts events (and wakes the delivery) all the time, also while it backs off.
            stop = threading.Event()

            def steps() -> None:
                while not stop.wait(0.01):
                    delivery.wake()

            waker = threading.Thread(target=steps, daemon=True)
            waker.start()
            try:
                report = delivery.close(timeout=120)
            finally:
                stop.set()
                waker.join(10)
            assert (report.remaining, report.delivered, report.rejections) == (0, total, 0), report
        finally:
            spool.close()
    hits = _windows(site, f"token:{_token_id(site.job)}")
    # One sequential client that waits out Retry-After meets at most one 429 per window.
    assert sum(hits) > total and max(hits) <= limit + 1, hits
    with Ledger.open(site.store, create=False) as ledger:
        seen = sorted(
            json.loads(e.canonical())["payload"]["i"] for _, e in ledger.entries() if e.run_id == site.run
        )
    assert seen == list(range(total))


def test_limits_are_checked_and_addresses_grouped() -> None:
    from trainguard.errors import UsageError

    for bad in (
        {"job": 0},
        {"reader": -1},
        {"failures": 1.5},
        {"window_s": 0},
        {"window_s": "60; DROP TABLE x"},
    ):
        with pytest.raises(UsageError):
            RateLimits(**bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="do not parse"):
        RateLimits.from_env('{"job": 1, "bogus": 2}')
    assert RateLimits.from_env(RateLimits(job=7).to_env()) == RateLimits(job=7)
    assert (
        client_bucket("2001:db8:1:2:3:4:5:6")
        == client_bucket("2001:db8:1:2:ffff::1")
        == "addr:2001:db8:1:2::/64"
    )
    assert client_bucket("::ffff:10.0.0.1") == client_bucket("10.0.0.1") == "addr:10.0.0.1"
    assert client_bucket(None) == client_bucket("/run/sock") == "addr:unknown"


def test_a_spoofed_forwarded_for_does_not_reset_the_failure_count(tmp_path: Path) -> None:
    # Evasion: a guesser sends a new X-Forwarded-For with every try. Only a proxy the server was told to
    # trust may set the address; anyone else's header is ignored and all tries count on its real address.
    site = make_site(tmp_path / "site", str(tmp_path / "ledger.db"))
    flags = ("--rate-failures", "3", "--rate-window", "3600", "--forwarded-allow-ips", "10.99.99.99")
    with site.serve(*flags) as server:
        statuses = [
            server.request(
                "GET", "/checkpoint", token=f"tgs_tg_0000000{i}_{'A' * 43}", X_Forwarded_For=f"203.0.113.{i}"
            ).status
            for i in range(6)
        ]
    hits = _windows(site, "addr:127.0.0.1")
    assert not any(_windows(site, f"addr:203.0.113.{i}") for i in range(6))
    # Refused unheard, the last three tries are not even counted.
    assert len(hits) > 1 or (statuses == [401] * 3 + [429] * 3 and hits == [3]), (statuses, hits)
