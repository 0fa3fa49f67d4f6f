"""The job's event spool and its delivery, against a real HTTP server in its own process (spool_server.py).

Every test waits for conditions with a generous deadline; none asserts on how long anything took.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trainguard.errors import StoreError, UsageError
from trainguard.ledger import Event, new_event
from trainguard.relay._delivery import Delivery, DeliveryLimits
from trainguard.relay._spool import GAP_EVENT, Spool, SpoolFull, SpoolLimits, default_path

SERVER = Path(__file__).with_name("spool_server.py")
TOKEN = "tgs_tg_0123abcd_" + "A" * 43
RUN = "run/42 é"  # a slash and non-ASCII: the run id is quoted into the URL and made safe as a file name
FAST = DeliveryLimits(timeout_s=2.0, batch_events=20, backoff_base_s=0.02, backoff_cap_s=0.2, poll_s=0.05)
DEADLINE_S = 90.0


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _event(i: int) -> Event:
    return new_event("test.step", {"i": i}, run_id=RUN)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """spool_server.py as a process; its database outlives restarts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.db = folder / "received.db"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *options: str, port: int | None = None) -> Server:
        port_file = self.folder / "port.txt"
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                *(sys.executable, str(SERVER), "--db", str(self.db), "--port-file", str(port_file)),
                *("--token", TOKEN, "--port", str(port if port is not None else self.port), *options),
            ],
        )
        _wait(port_file.exists, "the test server to listen")
        self.port = int(port_file.read_text())
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        with sqlite3.connect(self.db) as conn:
            try:
                return conn.execute(sql).fetchall()
            except sqlite3.OperationalError:  # the tables are not made yet
                return []

    def received(self) -> dict[str, dict[str, Any]]:
        return {key: json.loads(event) for key, event in self._rows("SELECT key, event FROM received")}

    def posts(self) -> int:
        return len(self._rows("SELECT n FROM posts"))

    def steps(self) -> list[int]:
        """The payload numbers of the test events received, in key order, each as often as it was stored."""
        return sorted(e["payload"]["i"] for e in self.received().values() if e["type"] == "test.step")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    folder = tmp_path / "server"
    folder.mkdir()
    srv = Server(folder)
    yield srv
    srv.kill()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool.open(RUN, path=tmp_path / "job" / "spool.db") as opened:
        yield opened


def _deliver_all(spool: Spool, server: Server, n: int, limits: DeliveryLimits = FAST) -> None:
    delivery = Delivery(spool, server.url, TOKEN, limits=limits)
    report = delivery.close(timeout=DEADLINE_S)
    assert report.remaining == 0, report
    assert server.steps() == list(range(n))


def test_events_are_delivered_exactly_once(spool: Spool, server: Server) -> None:
    server.start()
    delivery = Delivery(spool, server.url, TOKEN, limits=FAST)
    keys = [spool.put(_event(i)) for i in range(50)]
    delivery.wake()
    report = delivery.close(timeout=DEADLINE_S)
    assert (report.remaining, report.delivered, report.running) == (0, 50, False)
    received = server.received()
    assert sorted(received) == sorted(keys)
    assert server.steps() == list(range(50))
    assert {event["run_id"] for event in received.values()} == {RUN}


def test_server_down_at_start_keeps_events_until_it_comes_up(spool: Spool, server: Server) -> None:
    port = _free_port()
    delivery = Delivery(spool, f"http://127.0.0.1:{port}", TOKEN, limits=FAST)
    for i in range(30):
        spool.put(_event(i))
    _wait(lambda: delivery.report().failed_tries >= 3, "failed tries against a closed port")
    assert spool.stats().events == 30
    assert delivery.report().last_error is not None
    server.start(port=port)
    _wait(lambda: spool.stats().events == 0, "delivery once the server is up")
    assert delivery.close(timeout=DEADLINE_S).delivered == 30
    assert server.steps() == list(range(30))


def test_server_killed_mid_run_and_restarted_loses_and_duplicates_nothing(
    spool: Spool, server: Server
) -> None:
    server.start()
    delivery = Delivery(spool, server.url, TOKEN, limits=FAST)
    total = 300

    def produce() -> None:
        for i in range(total):
            spool.put(_event(i))
            if i % 10 == 0:
                time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    _wait(lambda: len(server.received()) >= 40, "the first deliveries")
    server.kill()
    time.sleep(0.2)  # not a timing assertion: lets delivery fail against the dead server a few times
    server.start()
    producer.join()
    report = delivery.close(timeout=DEADLINE_S)
    assert report.remaining == 0, report
    assert server.steps() == list(range(total))


def test_job_killed_after_puts_leaves_the_rest_for_the_next_delivery(tmp_path: Path, server: Server) -> None:
    server.start()
    path = tmp_path / "job" / "spool.db"
    job = textwrap.dedent(
        f"""
        import sys
        from trainguard.ledger import new_event
        from trainguard.relay._delivery import Delivery, DeliveryLimits
        from trainguard.relay._spool import Spool
        spool = Spool.open({RUN!r}, path={str(path)!r})
        Delivery(spool, {server.url!r}, {TOKEN!r}, limits=DeliveryLimits(batch_events=7, poll_s=0.01))
        for i in range(400):
            spool.put(new_event("test.step", {{"i": i}}, run_id={RUN!r}))
        print("spooled", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", job], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "spooled\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.stdin is not None
    proc.stdin.close()
    proc.stdout.close()
    with Spool.open(RUN, path=path) as again:
        _deliver_all(again, server, 400)


def test_full_spool_refuses_loudly_and_reports_a_counted_gap(
    spool: Spool, server: Server, tmp_path: Path
) -> None:
    with Spool.open(RUN, path=tmp_path / "small.db", limits=SpoolLimits(max_events=5)) as small:
        for i in range(5):
            small.put(_event(i))
        for i in range(5, 8):
            with pytest.raises(SpoolFull) as refused:
                small.put(_event(i))
        assert refused.value.stats.gap_pending == 3
        assert "dropped" in str(refused.value)
        stats = small.stats()
        assert (stats.events, stats.gap_pending, stats.dropped_total) == (5, 3, 3)
        server.start()
        delivery = Delivery(small, server.url, TOKEN, limits=FAST)
        _wait(lambda: small.stats().events == 0, "delivery of the full spool and of its gap event")
        small.put(_event(8))
        report = delivery.close(timeout=DEADLINE_S)
    assert report.remaining == 0
    assert server.steps() == [0, 1, 2, 3, 4, 8]
    gaps = [event for event in server.received().values() if event["type"] == GAP_EVENT]
    assert len(gaps) == 1
    assert gaps[0]["payload"]["dropped_events"] == 3
    assert gaps[0]["run_id"] == RUN


def test_gap_event_takes_the_place_of_the_dropped_events(tmp_path: Path) -> None:
    with Spool.open(RUN, path=tmp_path / "s.db", limits=SpoolLimits(max_events=3)) as spool:
        for i in range(3):
            spool.put(_event(i))
        with pytest.raises(SpoolFull):
            spool.put_many([_event(3), _event(4)])
        first = spool.oldest(1, 1 << 20)
        spool.remove([first[0].seq])  # room for exactly the gap event
        with pytest.raises(SpoolFull):
            spool.put(_event(5))
        assert spool.stats().gap_pending == 1
        spool.remove([item.seq for item in spool.oldest(10, 1 << 20)])
        spool.put(_event(6))
        kinds = [json.loads(item.data)["type"] for item in spool.oldest(10, 1 << 20)]
        assert kinds == [GAP_EVENT, "test.step"]
        gap = json.loads(spool.oldest(1, 1 << 20)[0].data)
        assert gap["payload"]["dropped_events"] == 1
        assert spool.stats().dropped_total == 3


def test_byte_bound_refuses_too(tmp_path: Path) -> None:
    with Spool.open(
        RUN, path=tmp_path / "s.db", limits=SpoolLimits(max_events=1000, max_bytes=4096)
    ) as spool:
        with pytest.raises(SpoolFull):
            for i in range(1000):
                spool.put(new_event("test.step", {"i": i, "pad": "x" * 500}, run_id=RUN))
        assert spool.stats().bytes <= 4096


def test_concurrent_puts_from_four_threads(spool: Spool, server: Server) -> None:
    server.start()
    delivery = Delivery(spool, server.url, TOKEN, limits=FAST)
    keys: list[list[str]] = [[] for _ in range(4)]

    def produce(worker: int) -> None:
        keys[worker] = [spool.put(_event(worker * 100 + i)) for i in range(100)]

    workers = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    all_keys = [key for chunk in keys for key in chunk]
    assert len(set(all_keys)) == 400
    report = delivery.close(timeout=DEADLINE_S)
    assert (report.remaining, report.delivered) == (0, 400)
    assert sorted(server.received()) == sorted(all_keys)
    assert server.steps() == list(range(400))


def test_failing_and_hanging_server_is_retried(spool: Spool, server: Server) -> None:
    server.start("--hang", "1", "--fail", "3")
    for i in range(25):
        spool.put(_event(i))
    _deliver_all(
        spool, server, 25, limits=DeliveryLimits(timeout_s=0.5, backoff_base_s=0.02, backoff_cap_s=0.1)
    )
    assert server.posts() >= 5


@pytest.mark.parametrize("mode", ["not-json", "huge", "wrong-keys", "wrong-keys-list"])
def test_hostile_answers_never_delete_unacknowledged_events(spool: Spool, server: Server, mode: str) -> None:
    server.start("--mode", mode)
    keys = [spool.put(_event(i)) for i in range(10)]
    delivery = Delivery(spool, server.url, TOKEN, limits=FAST)
    _wait(lambda: server.posts() >= 3, "several tries")
    report = delivery.report()
    assert report.running
    assert (report.delivered, report.remaining) == (0, 10)
    assert report.last_error is not None and report.last_error.startswith("answer")
    assert delivery.close(timeout=0.5).remaining == 10
    assert [item.key for item in spool.oldest(100, 1 << 30)] == keys
    server.kill()
    _deliver_all(spool, server.start(), 10)


def test_partial_acknowledgement_removes_only_what_was_acknowledged(spool: Spool, server: Server) -> None:
    server.start("--mode", "ack-half")
    for i in range(40):
        spool.put(_event(i))
    report = Delivery(spool, server.url, TOKEN, limits=FAST).close(timeout=DEADLINE_S)
    assert report.remaining == 0
    assert report.duplicates > 0  # the unacknowledged half came back as duplicates
    assert server.steps() == list(range(40))


def test_rejection_stops_delivery_and_keeps_the_events(spool: Spool, server: Server) -> None:
    server.start("--mode", "reject")
    for i in range(5):
        spool.put(_event(i))
    delivery = Delivery(spool, server.url, TOKEN, limits=FAST)
    _wait(lambda: not delivery.report().running, "delivery to stop after rejections")
    report = delivery.close(timeout=1)
    assert report.rejections == FAST.rejections_before_stop
    assert report.stopped is not None and "403" in report.stopped
    assert report.remaining == 5
    assert server.posts() == FAST.rejections_before_stop


def test_wrong_token_is_a_rejection(spool: Spool, server: Server) -> None:
    server.start()
    spool.put(_event(0))
    other = "tgs_tg_0123abcd_" + "B" * 42 + "A"
    report = Delivery(spool, server.url, other, limits=FAST).close(timeout=DEADLINE_S)
    assert report.stopped is not None and "401" in report.stopped
    assert report.remaining == 1
    assert TOKEN not in repr(report) and other not in repr(report)


@pytest.mark.parametrize("url", ["ftp://h/", "http://", "http://u:p@h/", "http://h/?q=1", "http://h:99999/"])
def test_bad_url_is_refused(spool: Spool, url: str) -> None:
    with pytest.raises(UsageError):
        Delivery(spool, url, TOKEN)


def test_malformed_token_is_refused_without_echoing_it(spool: Spool) -> None:
    secretish = "tgs_tg_0123abcd_" + "A" * 40
    with pytest.raises(UsageError) as refused:
        Delivery(spool, "http://127.0.0.1:1", secretish)
    assert secretish not in str(refused.value)


def test_keys_are_never_reused_and_belong_to_one_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool.open(RUN, path=path) as spool:
        first = spool.put(_event(0))
        spool.remove([spool.oldest(1, 1 << 20)[0].seq])
        second = spool.put(_event(1))
    with Spool.open(RUN, path=path) as again:
        third = again.put(_event(2))
    assert len({first, second, third}) == 3
    assert first.split("/")[0] == second.split("/")[0] == third.split("/")[0]
    with Spool.open(RUN, path=tmp_path / "other.db") as other:
        assert other.put(_event(0)).split("/")[0] != first.split("/")[0]
    with pytest.raises(StoreError, match="belongs to run"):
        Spool.open("another run", path=path)
    assert path.stat().st_mode & 0o077 == 0


def test_default_path_is_per_run_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    one, two = default_path("a/b"), default_path("a_b")
    assert one.parent == tmp_path / "home" / "spool"
    assert one != two
    with Spool.open("a/b") as spool:
        assert spool.path == one
    assert one.exists()


def test_closing_cuts_a_long_backoff_short_once_so_a_server_back_by_then_gets_everything(
    spool: Spool, server: Server
) -> None:
    port = _free_port()
    # After one failure the backoff is drawn between 20 and 80 s: far longer than the close below.
    slow = DeliveryLimits(timeout_s=2.0, backoff_base_s=40.0, backoff_cap_s=120.0, poll_s=0.05)
    delivery = Delivery(spool, f"http://127.0.0.1:{port}", TOKEN, limits=slow)
    for i in range(10):
        spool.put(_event(i))
    _wait(lambda: delivery.report().failed_tries >= 1, "a failed try against a closed port")
    server.start(port=port)
    report = delivery.close(timeout=8.0)
    assert (report.delivered, report.remaining) == (10, 0), report
    assert server.steps() == list(range(10))


def test_an_idle_job_says_it_is_alive_and_a_server_without_the_endpoint_costs_it_nothing(
    spool: Spool, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # The test server answers 404 to .../alive, as a server from before signs of life would.
    server.start()
    limits = dataclasses.replace(FAST, alive_every_s=0.1)
    with caplog.at_level(logging.WARNING, logger="trainguard.delivery"):
        delivery = Delivery(spool, server.url, TOKEN, limits=limits)
        _wait(lambda: server.posts() >= 3, "three signs of life")
        keys = [spool.put(_event(i)) for i in range(5)]
        delivery.wake()
        report = delivery.close(timeout=DEADLINE_S)
    assert (report.remaining, report.delivered, report.rejections, report.failed_tries) == (0, 5, 0, 0)
    assert sorted(server.received()) == sorted(keys)
    said = [r.getMessage() for r in caplog.records if "sign of life" in r.getMessage()]
    assert len(said) == 1 and "HTTP 404" in said[0], said
