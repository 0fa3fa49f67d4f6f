"""The supervisor's desk for the job's events, on a real socket and a real spool: what a job that floods
it, or removes the spool, can and cannot do to the supervisor's own events."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.serve_process import free_port
from trainguard.ledger import Event, new_event
from trainguard.relay._jobsocket import EventRefused, EventSender
from trainguard.relay._outbox import Outbox
from trainguard.relay._spool import Spool, SpoolLimits
from trainguard.supervisor._jobevents import JobEvents, event_socket
from trainguard.supervisor._journal import Journal
from trainguard.supervisor._procs import JobProcesses

RUN = "r-flood"
TOKEN = "tgs_tg_0123abcd_" + "B" * 42 + "A"


def _journal(tmp_path: Path, limits: SpoolLimits) -> Journal:
    # Nobody listens on the port: everything stays in the spool, to be counted.
    url = f"http://127.0.0.1:{free_port()}"
    return Journal(
        RUN, outbox=Outbox.open(RUN, url, TOKEN, spool_path=tmp_path / "spool.db", spool_limits=limits)
    )


def _spooled(path: Path) -> list[Event]:
    with Spool.open(RUN, path=path) as spool:
        return [Event.from_canonical(item.data) for item in spool.oldest(1000, 1 << 30)]


def test_a_job_flooding_its_socket_cannot_crowd_out_the_supervisor_s_events(tmp_path: Path) -> None:
    journal = _journal(tmp_path, SpoolLimits(max_events=20))
    sock = event_socket(str(tmp_path / "events.sock"))
    desk = JobEvents(sock, journal, JobProcesses(os.getpid()))  # this process stands for the job
    desk.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        for i in range(60):
            sender.sendto(
                new_event("monitor.steps", {"i": i}, run_id=RUN).canonical(), str(tmp_path / "events.sock")
            )
    desk.stop()
    for kind in ("run.rank_lost", "run.exit", "run.end"):
        journal.write(kind, {})
    journal.close(flush_timeout=0.1)
    sock.close()
    types = [event.type for event in _spooled(tmp_path / "spool.db")]
    assert types.count("monitor.steps") == 10, types  # half the spool
    assert types[-3:] == ["run.rank_lost", "run.exit", "run.end"]
    assert (desk.received, desk.refused, journal.job_events_refused) == (60, 0, 50)


def test_a_spool_removed_under_the_supervisor_is_said_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = _journal(tmp_path, SpoolLimits())
    journal.write("run.start", {})
    journal.write_now("run.exit", {})
    for path in tmp_path.glob("spool.db*"):
        path.unlink()  # what code in the job can do: it runs as the same user
    journal.close(flush_timeout=0.1)
    err = capsys.readouterr().err
    assert "was removed or replaced while the run went on" in err
    assert journal.delivery is not None and journal.delivery.remaining == 3  # held by the open connection


def test_the_supervisor_answers_each_sender_and_refuses_processes_outside_the_job(tmp_path: Path) -> None:
    journal = _journal(tmp_path, SpoolLimits())
    path = str(tmp_path / "events.sock")
    sock = event_socket(path)
    # The job: one process (a session of its own) that sends an event it may send, then one it may not.
    script = (
        "from trainguard.ledger import new_event\n"
        "from trainguard.relay._jobsocket import EventSender, EventRefused\n"
        f"sender = EventSender({path!r}, timeout=30)\n"
        f"sender.send(new_event('monitor.alert', {{}}, run_id={RUN!r}))\n"
        "print('sent')\n"
        "try:\n"
        f"    sender.send(new_event('run.end', {{}}, run_id={RUN!r}))\n"
        "except EventRefused as exc:\n"
        "    print(exc.message)\n"
    )
    job = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    desk = JobEvents(sock, journal, JobProcesses(job.pid))
    desk.start()
    try:
        out, _ = job.communicate(timeout=60)
        assert out.splitlines()[0] == "sent"
        assert "may not write 'run.end'" in out
        # This process, of the same user but outside the job, waits for its answer and is refused.
        sender = EventSender(path, timeout=30)
        with pytest.raises(EventRefused) as caught:
            sender.send(new_event("monitor.alert", {"outside": True}, run_id=RUN))
        sender.close()
        assert "not a live process of the job" in caught.value.message
    finally:
        desk.stop()
        journal.close(flush_timeout=0.1)
        sock.close()
    spooled = _spooled(tmp_path / "spool.db")
    assert [(event.type, event.actor.pid) for event in spooled] == [("monitor.alert", job.pid)]
    assert (desk.received, desk.refused) == (3, 2)
