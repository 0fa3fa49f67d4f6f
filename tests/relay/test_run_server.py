"""`trainguard run --server`: a real job reports through a real `trainguard serve` (SQLite, PostgreSQL).

Every event is read back through the server's API and counted: each must arrive, and arrive once. The job
runs under torchrun with the guard on (gloo, 2 ranks); tests that need no guard run a one-line job.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.relay.conftest import PATIENCE_S, RUN, cli, deployment, finish
from trainguard.ledger import new_event

JOB = str(Path(__file__).with_name("guarded_job.py"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
EXIT_SERVER_REFUSED = 4


def _types(events: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(event["type"] for event in events)


def _assert_no_duplicates(events: list[dict[str, Any]]) -> None:
    seen = [json.dumps(event, sort_keys=True) for event in events]
    assert len(seen) == len(set(seen)), "an event reached the server twice"


def _steps(events: list[dict[str, Any]]) -> list[int]:
    rows = [row for event in events if event["type"] == "monitor.steps" for row in event["payload"]["rows"]]
    return [row[0] for row in rows]


def _wait_for(path: Path, proc: Any) -> dict[str, Any]:
    deadline = time.monotonic() + PATIENCE_S
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _, err = proc.communicate()
            pytest.fail(f"{path.name} never appeared; supervisor exit {proc.returncode}:\n{err}")
        time.sleep(0.05)
    time.sleep(0.1)  # written, not half-written
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


@pytest.mark.torch
@pytest.mark.slow
def test_a_guarded_job_reports_every_event_once_and_never_sees_the_token(
    tmp_path: Path, store: str | None
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with deployment(tmp_path, store) as d:
        # Given in the variables, which the job must not inherit.
        env = {"TRAINGUARD_SERVER": d.server.url, "TRAINGUARD_SERVER_TOKEN_FILE": str(d.token_file)}
        proc = d.run([*TORCHRUN, JOB, "--out", str(out), "--steps", "6"], **env)
        status, _, err = finish(proc)
        assert status == 0, err
        assert f"every event of run {RUN} reached the server" in err
        events = d.events()
    _assert_no_duplicates(events)
    types = _types(events)
    for kind in ("run.attest", "run.start", "run.exit", "run.end", "monitor.start", "monitor.end"):
        assert types[kind] == 1, (kind, types)
    assert _steps(events) == [1, 2, 3, 4, 5, 6]
    assert all(event["run_id"] == RUN for event in events)
    # The guard's events are its own, sent by rank 0 (the kernel named it), not made by the supervisor.
    rank0 = json.loads((out / "rank0.json").read_text())
    monitor = [event for event in events if event["type"].startswith("monitor.")]
    assert {event["actor"]["pid"] for event in monitor} == {rank0["pid"]}
    end = next(event for event in events if event["type"] == "run.end")
    assert end["payload"]["job_events_refused"] == 0
    assert end["payload"]["job_events"] == len(monitor)
    # The token is nowhere in the job: not in any rank's variables, nor the path of its file.
    for rank in (0, 1):
        environ = json.loads((out / f"rank{rank}.json").read_text())["environ"]
        assert not [name for name in environ if name.startswith("TRAINGUARD_SERVER")], environ
        assert not any(d.job_token in value or "tokens/job" in value for value in environ.values())
        assert environ["TRAINGUARD_RUN_ID"] == RUN
    # Nothing is left on the job's host.
    spools = list((d.job_home / "spool").glob("*.db"))
    assert len(spools) == 1


@pytest.mark.torch
@pytest.mark.slow
def test_a_rank_killed_mid_run_loses_nothing_already_sent(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with deployment(tmp_path, None) as d:
        proc = d.run([*TORCHRUN, JOB, "--out", str(out), "--forever"], *d.server_options())
        ranks = [_wait_for(out / f"rank{rank}.json", proc) for rank in (0, 1)]
        # Rank 0's per-step summaries are on their way: wait until the server holds some, then kill it.
        deadline = time.monotonic() + PATIENCE_S
        while not _steps(d.events()):
            assert time.monotonic() < deadline and proc.poll() is None, "no step summary reached the server"
            time.sleep(0.2)
        os.kill(ranks[0]["pid"], signal.SIGKILL)
        status, _, err = finish(proc)
        assert status != 0, err
        events = d.events()
    _assert_no_duplicates(events)
    types = _types(events)
    assert types["monitor.start"] == 1 and types["run.end"] == 1, types
    lost = [event for event in events if event["type"] == "run.rank_lost"]
    assert [event["payload"]["pid"] for event in lost if event["payload"]["rank"] == 0] == [ranks[0]["pid"]]
    steps = _steps(events)
    assert steps and steps == list(range(1, len(steps) + 1))  # the steps it sent, each once, none missing


def test_a_server_down_at_launch_gets_everything_later(tmp_path: Path) -> None:
    job = [sys.executable, "-c", "import time; time.sleep(1)"]
    with deployment(tmp_path, None, start=False) as d:
        # Without the server, the run its token is bound to is unknown: --run-id names it.
        proc = d.run(job, *d.server_options())
        status, _, err = finish(proc)
        assert status == 2 and "--run-id" in err, err
        proc = d.run(job, *d.server_options(), "--run-id", RUN, "--flush-timeout", "1")
        status, _, err = finish(proc)
        assert status == 0, err
        assert "does not answer" in err and "wait in" in err
        assert f"trainguard spool push --run {RUN}" in err
        d.server.start()
        # Delivered by a later command; a second push finds nothing left and sends nothing twice.
        env = {"TRAINGUARD_SERVER": d.server.url, "TRAINGUARD_SERVER_TOKEN_FILE": str(d.token_file)}
        pushed = cli(d.job_home, "spool", "push", **env)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert "delivered" in pushed.stdout
        again = cli(d.job_home, "spool", "push", **env)
        assert again.returncode == 0 and "0 event(s) delivered" in again.stdout, again.stdout
        events = d.events()
    _assert_no_duplicates(events)
    types = _types(events)
    assert [types[kind] for kind in ("run.attest", "run.start", "run.exit", "run.end")] == [1, 1, 1, 1], types


def test_a_server_started_during_the_run_gets_everything_by_its_end(tmp_path: Path) -> None:
    ready = tmp_path / "started"
    job = [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(3)"]
    with deployment(tmp_path, None, start=False) as d:
        proc = d.run(job, *d.server_options(), "--run-id", RUN)
        deadline = time.monotonic() + PATIENCE_S
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        d.server.start()
        status, _, err = finish(proc)
        assert status == 0, err
        assert f"every event of run {RUN} reached the server" in err
        events = d.events()
    _assert_no_duplicates(events)
    assert [_types(events)[kind] for kind in ("run.attest", "run.start", "run.end")] == [1, 1, 1]


@pytest.mark.parametrize("which", ["revoked", "other-run", "viewer", "unknown"])
def test_a_token_the_server_refuses_stops_the_launch(tmp_path: Path, which: str) -> None:
    marker = tmp_path / "the-job-ran"
    job = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).touch()"]
    with deployment(tmp_path, None) as d:
        token_file = d.other_tokens[which]
        options = d.server_options(token_file)
        if which == "other-run":
            options += ["--run-id", RUN]  # the job's run is not the token's
        status, _, err = finish(d.run(job, *options))
        events = d.events()
        token = token_file.read_text().strip()
    assert status == EXIT_SERVER_REFUSED, err
    assert "not launching" in err
    assert token not in err and token[16:] not in err  # the secret is never said
    assert not marker.exists()
    assert events == []


def test_a_token_of_another_run_is_refused_before_launch_naming_both_runs(tmp_path: Path) -> None:
    marker = tmp_path / "the-job-ran"
    job = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).touch()"]
    with deployment(tmp_path, None) as d:
        status, _, err = finish(d.run(job, *d.server_options(), "--run-id", "my-own-run"))
    assert status == EXIT_SERVER_REFUSED and "bound to run 'train-42', not 'my-own-run'" in err, err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("url", "variables", "message"),
    [
        ("http://10.1.2.3:8750", {}, "refusing plain http to 10.1.2.3"),
        ("http://tg.example", {}, "refusing plain http to tg.example"),
        ("ftp://127.0.0.1", {}, "not a server URL"),
        ("https://user@tg.example", {}, "no user, query or fragment"),
        ("http://10.1.2.3:8750", {"TRAINGUARD_SERVER_ALLOW_HTTP": "maybe"}, "must be 1 or 0"),
    ],
)
def test_a_server_url_that_would_leak_the_token_is_refused(
    tmp_path: Path, url: str, variables: dict[str, str], message: str
) -> None:
    marker = tmp_path / "the-job-ran"
    tokens = tmp_path / "token"
    tokens.write_text("tgs_tg_0123abcd_" + "A" * 43)
    tokens.chmod(0o600)
    job = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).touch()"]
    done = cli(
        tmp_path,
        "run",
        "--no-env-check",
        "--server",
        url,
        "--server-token-file",
        str(tokens),
        "--",
        *job,
        **variables,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()


def test_plain_http_to_another_host_is_taken_only_when_the_user_opts_in(tmp_path: Path) -> None:
    tokens = tmp_path / "token"
    tokens.write_text("tgs_tg_0123abcd_" + "A" * 43)
    tokens.chmod(0o600)
    job = [sys.executable, "-c", "pass"]
    # 192.0.2.1 (TEST-NET-1) never answers: the opt-in gets past the URL check to the unreachable server.
    done = cli(
        tmp_path,
        *("run", "--no-env-check", "--server", "http://192.0.2.1:9", "--server-token-file", str(tokens)),
        *("--", *job),
        TRAINGUARD_SERVER_ALLOW_HTTP="1",
        timeout=PATIENCE_S,
    )
    assert done.returncode == 2 and "--run-id" in done.stderr, done.stderr
    assert "refusing plain http" not in done.stderr


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "the-job-ran"
    job = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).touch()"]
    with deployment(tmp_path, None) as d:
        d.token_file.chmod(0o644)
        status, _, err = finish(d.run(job, *d.server_options()))
    assert status == 2 and "accessible by other users (mode 0644)" in err, err
    assert d.job_token[16:] not in err
    assert not marker.exists()


def test_half_a_server_setting_is_an_error_not_the_local_ledger(tmp_path: Path) -> None:
    job = [sys.executable, "-c", "pass"]
    done = cli(tmp_path, "run", "--no-env-check", "--", *job, TRAINGUARD_SERVER="https://tg.example")
    assert done.returncode == 2 and "needs a job token" in done.stderr, done.stderr
    assert not (tmp_path / "ledger.db").exists()


@pytest.mark.torch
@pytest.mark.slow
def test_events_forged_into_the_supervisor_socket_are_refused(tmp_path: Path) -> None:
    """The job's code knows the socket: it sends the supervisor's own kind of event, another run's, one
    whose actor is another process, and junk; a process outside the job sends a well-formed alert."""
    out = tmp_path / "out"
    out.mkdir()
    with deployment(tmp_path, None) as d:
        proc = d.run([*TORCHRUN, JOB, "--out", str(out), "--forever", "--forge"], *d.server_options())
        rank0 = _wait_for(out / "rank0.json", proc)
        _wait_for(out / "rank1.json", proc)
        outsider = new_event("monitor.alert", {"forged": "outside"}, run_id=RUN)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(outsider.canonical(), rank0["environ"]["TRAINGUARD_EVENTS"])
        deadline = time.monotonic() + PATIENCE_S
        while not _steps(d.events()):
            assert time.monotonic() < deadline and proc.poll() is None, "no step summary reached the server"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, _, err = finish(proc)
        events = d.events()
    assert "refusing an event from the job" in err
    assert not [event for event in events if "forged" in event["payload"]], events
    assert _types(events)["run.end"] == 1
    end = next(event for event in events if event["type"] == "run.end")
    assert end["payload"]["job_events_refused"] == 5, end
    assert end["payload"]["exit_code"] != 0


def test_a_job_that_deletes_the_spool_is_reported_to_the_server(tmp_path: Path) -> None:
    remove = (
        "import os, pathlib, time; time.sleep(0.5); "
        "[p.unlink() for p in (pathlib.Path(os.environ['TRAINGUARD_HOME']) / 'spool').glob('*')]"
    )
    with deployment(tmp_path, None) as d:
        status, _, err = finish(d.run([sys.executable, "-c", remove], *d.server_options()))
        assert status == 0, err
        events = d.events()
    assert "was removed or replaced while the run went on" in err
    types = _types(events)
    assert [types[kind] for kind in ("run.attest", "run.start", "run.end", "run.spool_replaced")] == [
        1,
        1,
        1,
        1,
    ]
