"""A run whose job stops talking to the server without ending is an alarm (`trainguard serve --silent-after`).

Real jobs: processes running the relay's own delivery thread (events, then signs of life while idle), one
of them SIGKILLed. Real servers: `trainguard serve` with two workers, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.server.alerting_harness import Receiver, Site, event, make_site, wait_for
from tests.server.serve_process import Serve, cli, events_path, home_env, make_token
from trainguard.ledger import Ledger
from trainguard.server._webauth import COOKIE

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# Long next to the idle job's signs of life (every 0.3 s), so a loaded machine that stalls the job or the
# server for a few seconds does not make a live job look silent.
SILENT_AFTER = "5"
# The relay's delivery thread, as a job runs it: it sends a start and `count` events, then says it is alive
# every 0.3 s.
JOB = """
import sys, time
from trainguard.ledger import new_event
from trainguard.relay._delivery import Delivery, DeliveryLimits
from trainguard.relay._spool import Spool
url, token, run, spool_path, count = sys.argv[1:6]
spool = Spool.open(run, path=spool_path)
Delivery(spool, url, token, limits=DeliveryLimits(alive_every_s=0.3, poll_s=0.1))
spool.put(new_event("run.start", {}, run_id=run))
spool.put_many([new_event("monitor.steps", {"i": i}, run_id=run) for i in range(int(count))])
time.sleep(600)
"""


@pytest.fixture
def site(tmp_path: Path, location: str) -> Site:
    return make_site(tmp_path / "site", location)


class Jobs:
    def __init__(self, site: Site, server: Serve) -> None:
        self.site = site
        self.server = server
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, run: str, token: str, count: int) -> subprocess.Popen[bytes]:
        spool = self.site.home / f"spool-{len(self.processes)}.db"
        argv = [sys.executable, "-c", JOB, self.server.url, token, run, str(spool), str(count)]
        process = subprocess.Popen(argv, env=home_env(self.site.home))
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait(30)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


def _runs(site: Site) -> tuple[str, ...]:
    return (site.run, "idle-run", "ended-run")


def _events(server: Serve, site: Site, run: str) -> list[dict[str, Any]]:
    answer = server.request("GET", events_path(run) + "?limit=1000", token=site.viewer)
    assert answer.status == 200, answer.body
    return [item["event"] for item in answer.json()["events"]]


def _notices(server: Serve, site: Site, run: str) -> list[dict[str, Any]]:
    return [e for e in _events(server, site, run) if e["type"] == "server.run_silent"]


def _silent_gauge(server: Serve, site: Site) -> float:
    text = server.request("GET", "/metrics", token=site.viewer).body.decode()
    [line] = [line for line in text.splitlines() if line.startswith("trainguard_runs_silent ")]
    return float(line.split()[1])


def _alive(server: Serve, run: str, token: str) -> int:
    return server.request("POST", f"/api/v1/runs/{quote(run, safe='')}/alive", b"", token).status


def test_a_killed_job_is_judged_silent_once_and_a_live_idle_or_ended_one_is_not(
    site: Site, receiver: Receiver
) -> None:
    site.add_webhook(receiver.url)
    idle_token = make_token(site.home, site.store, "--scope", "job", "--run", "idle-run", "--expires", "1h")
    ended_token = make_token(site.home, site.store, "--scope", "job", "--run", "ended-run", "--expires", "1h")
    sign_token = make_token(site.home, site.store, "--scope", "job", "--run", "signed-run", "--expires", "1h")
    with site.serve("--silent-after", SILENT_AFTER, workers=2) as server:
        jobs = Jobs(site, server)
        try:
            killed = jobs.start(site.run, site.job, 5)
            jobs.start("idle-run", idle_token, 3)
            ended = [("start", event("ended-run", "run.start")), ("end", event("ended-run", "run.end"))]
            assert server.post_events("ended-run", ended, ended_token).status == 200
            # A signing reported on its own (no start): no job that could fall silent.
            signed = [("sign", event("signed-run", "provenance.sign"))]
            assert server.post_events("signed-run", signed, sign_token).status == 200
            wait_for("the job's events", lambda: len(_events(server, site, site.run)) == 6)
            killed.send_signal(signal.SIGKILL)
            killed.wait(30)

            wait_for("the silence notice", lambda: len(_notices(server, site, site.run)) == 1)
            [notice] = _notices(server, site, site.run)
            assert notice["rank"] is None and notice["payload"]["silent_after_s"] == float(SILENT_AFTER)
            assert notice["payload"]["silent_for_s"] >= float(SILENT_AFTER)
            assert "has not ended" in notice["payload"]["message"]
            assert _silent_gauge(server, site) == 1
            wait_for("the alert's webhook", lambda: receiver.count() == 1)
            delivered = receiver.bodies()[0]
            assert "server.run_silent" in json.dumps(delivered), delivered
            page = server.request("GET", "/ui/", headers={"Cookie": f"{COOKIE}={site.viewer}"})
            assert page.status == 200
            rows = {run: page.body.decode().split(run, 1)[1].split("</tr>", 1)[0] for run in _runs(site)}
            assert "status-alarmed" in rows[site.run]
            assert "status-running" in rows["idle-run"] and "status-ended" in rows["ended-run"]

            time.sleep(3.0)  # more looks by each worker (every 1.25 s): none may judge the silence again
            assert len(_notices(server, site, site.run)) == 1, "two workers judged one silence twice"
            assert _notices(server, site, "idle-run") == []
            assert _notices(server, site, "ended-run") == []
            assert _notices(server, site, "signed-run") == []

            # Heard from again, the run is no longer counted silent; silent again, it gets a second notice.
            assert _alive(server, site.run, site.job) == 204
            assert _silent_gauge(server, site) == 0
            wait_for("the second notice", lambda: len(_notices(server, site, site.run)) == 2)
            first, second = _notices(server, site, site.run)
            assert first["payload"]["last_contact"] < second["payload"]["last_contact"]
            assert _notices(server, site, "idle-run") == []
        finally:
            jobs.stop()


def test_a_job_cannot_write_the_servers_own_keys_or_types(site: Site) -> None:
    with site.serve() as server:
        forged = server.post_events(site.run, [("x", event(site.run, "server.run_silent"))], site.job)
        assert forged.status == 400 and b"are the server's" in forged.body
        squatted = server.post_events(site.run, [("server:silent:1", event(site.run, "run.start"))], site.job)
        assert squatted.status == 400 and b"are the server's" in squatted.body
        assert _alive(server, "another-run", site.job) == 403
        assert _alive(server, site.run, site.viewer) == 403
        assert server.request("POST", f"/api/v1/runs/{site.run}/alive", b"").status == 401
        assert _alive(server, site.run, site.job) == 204


def test_silent_after_takes_seconds_or_off(site: Site) -> None:
    done = cli(site.home, "serve", "--store", site.store, "--key", str(site.key), "--silent-after", "-1")
    assert done.returncode == 2 and "--silent-after" in done.stderr


def test_two_workers_that_both_saw_a_run_silent_append_one_notice(location: str, tmp_path: Path) -> None:
    """Worker B reads the run as unjudged before worker A marks it judged: the notice's key, taken from the
    last contact, makes B's append a conflict, and the log holds one notice. Played deterministically."""
    from trainguard.ledger import SigningKey
    from trainguard.server._app import open_server
    from trainguard.server._sidetables import CONTACT
    from trainguard.server._tokens import TokenStore

    key = tmp_path / "ledger.key"
    SigningKey.generate("test.example/silence").save(key)
    TokenStore.open(location, create=True).close()
    a, b = (open_server(location, key, silent_after_s=0.01) for _ in range(2))
    try:
        a.keys.append("r", [("start", event("r", "run.start"))], "tg_0000000a")
        a.ops.heard_from("r")
        db = a.ops._request_db
        db.write(f"UPDATE {CONTACT} SET last_contact = last_contact - 60")
        time.sleep(0.05)  # both workers up for longer than silent_after_s
        assert a.ops.silence is not None and b.ops.silence is not None
        assert a.ops.silence.sweep() == ["r"]
        db.write(f"UPDATE {CONTACT} SET state = 'heard'")  # as B saw it, before A's mark
        assert b.ops.silence.sweep() == ["r"]
        with Ledger.open(location, create=False) as ledger:
            types = [event.type for _, event in ledger.entries()]
        assert types == ["run.start", "server.run_silent"]
        assert db.rows(f"SELECT state FROM {CONTACT}") == [("silent",)]
    finally:
        a.close()
        b.close()


def test_a_worker_just_started_does_not_take_its_own_outage_for_silence(
    location: str, tmp_path: Path
) -> None:
    from trainguard.ledger import SigningKey
    from trainguard.server._app import open_server
    from trainguard.server._sidetables import CONTACT
    from trainguard.server._tokens import TokenStore

    key = tmp_path / "ledger.key"
    SigningKey.generate("test.example/silence").save(key)
    TokenStore.open(location, create=True).close()
    server = open_server(location, key, silent_after_s=3600)
    try:
        server.keys.append("r", [("start", event("r", "run.start"))], "tg_0000000a")
        server.ops.heard_from("r")
        server.ops._request_db.write(f"UPDATE {CONTACT} SET last_contact = last_contact - 7200")
        assert server.ops.silence is not None and server.ops.silence.sweep() == []
        server.ops.silence._started -= 3600
        assert server.ops.silence.sweep() == ["r"]
    finally:
        server.close()
