"""`trainguard run` over real rank processes, sent real signals: every exit, lost rank and sender recorded.

The incident (DESIGN.md, row d): an insider killed multi-node training processes at random, and nobody
could tell who. Each test here is one way a rank, or the supervisor, can be stopped.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.supervisor.conftest import LAUNCHER, RANK, Supervised, events, killer, wait_for_event
from trainguard.ledger import Ledger
from trainguard.provenance import PrivateKey, sign_path
from trainguard.supervisor._attest import verify_attestation


def test_clean_run_is_attested_and_every_exit_recorded(
    home: Path, tmp_path: Path, supervised: list[Supervised]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("lr: 0.1\n")
    run = Supervised(
        [sys.executable, LAUNCHER, "2", "--steps", "10"],
        options=("--no-env-check", "--config", str(config), "--seed", "1234"),
        WORLD_SIZE="2",
    )
    supervised.append(run)
    status, err = run.finish()
    assert status == 0, err

    with Ledger.open(home / "ledger.db") as ledger:
        assert ledger.verify().ok
        verifier = ledger.verifier
    (attest,) = events(home, "run.attest")
    assert verify_attestation(attest.payload, verifier)
    assert attest.payload["key"] == verifier.text()
    statement = attest.payload["attestation"]
    assert statement["command"][1:] == [LAUNCHER, "2", "--steps", "10"]
    assert statement["environment"] == {"checked": False, "digest": None}
    assert statement["config"] == {"path": str(config), "sha256": hashlib.sha256(b"lr: 0.1\n").hexdigest()}
    assert statement["seeds"]["seed"] == 1234
    assert statement["world_size"] == 2
    assert statement["uid"] >= 0 and statement["hosts"]
    assert set(statement["code"]) == {"revision", "diff_sha256", "root"}
    # Tampering with any field breaks the signature.
    forged = {**attest.payload, "attestation": {**statement, "user": "someone-else"}}
    assert not verify_attestation(forged, verifier)

    run_ids = {event.run_id for event in events(home)}
    assert run_ids == {statement["run_id"]}
    (exit_event,) = events(home, "run.exit")
    assert exit_event.payload["cause"] == "exited with status 0"
    (end,) = events(home, "run.end")
    assert end.payload["ranks"] == 2 and end.payload["ranks_lost"] == []
    assert not events(home, "run.rank_lost")


def test_sigterm_to_a_rank_names_the_sender(home: Path, tmp_path: Path, supervised: list[Supervised]) -> None:
    run = Supervised([sys.executable, RANK, "--rank", "0", "--ready", str(tmp_path)])
    supervised.append(run)
    rank = run.ready(tmp_path, 0)
    assert rank["watching"] and rank["blocked"]
    attacker = killer(rank["pid"], signal.SIGTERM)
    status, err = run.finish()
    attacker.communicate(b"")

    assert status == 128 + signal.SIGTERM, err
    (sent,) = events(home, "run.signal")
    assert sent.rank == 0
    assert sent.payload["name"] == "SIGTERM" and sent.payload["pid"] == rank["pid"]
    assert sent.payload["sender_pid"] == attacker.pid
    assert f"os.kill({rank['pid']}, signal.Signals(15))" in sent.payload["sender_cmdline"]
    (exit_event,) = events(home, "run.exit")
    assert exit_event.payload["cause"] == "killed by SIGTERM"
    (lost,) = events(home, "run.rank_lost")
    assert lost.payload["cause"] == "killed by SIGTERM"


def test_a_python_handler_still_runs(home: Path, tmp_path: Path, supervised: list[Supervised]) -> None:
    run = Supervised([sys.executable, RANK, "--handler", "--ready", str(tmp_path)])
    supervised.append(run)
    rank = run.ready(tmp_path, 0)
    attacker = killer(rank["pid"], signal.SIGTERM)
    status, err = run.finish()
    attacker.communicate(b"")

    assert status == 7, err  # the job's own handler ran: sys.exit(7)
    (sent,) = events(home, "run.signal")
    assert sent.payload["sender_pid"] == attacker.pid


def test_malformed_datagrams_are_counted_and_ignored(home: Path, supervised: list[Supervised]) -> None:
    run = Supervised([sys.executable, RANK, "--junk", "--steps", "5"])
    supervised.append(run)
    status, err = run.finish()

    assert status == 0, err
    (end,) = events(home, "run.end")
    assert end.payload["datagrams_rejected"] == 4
    assert end.payload["ranks"] == 1 and end.payload["ranks_lost"] == []


def test_sigkill_of_a_rank_is_named_within_two_seconds(
    home: Path, tmp_path: Path, supervised: list[Supervised]
) -> None:
    run = Supervised([sys.executable, LAUNCHER, "2", "--ready", str(tmp_path)])
    supervised.append(run)
    victim = run.ready(tmp_path, 1)
    run.ready(tmp_path, 0)
    killer(victim["pid"], signal.SIGKILL).communicate(b"")
    status, err = run.finish()

    assert status == 1, err  # the launcher saw a rank fail
    lost = [event for event in events(home, "run.rank_lost") if event.rank == 1]
    assert len(lost) == 1, err
    payload = lost[0].payload
    assert payload["pid"] == victim["pid"]
    # Best effort: the launcher may reap its child before the supervisor reads its status.
    assert payload["cause"] in ("killed by SIGKILL", "gone; its parent reaped it")
    assert payload["silent_s"] < 2.0
    assert f"RANK 1 LOST (pid {victim['pid']}" in err


def test_a_hung_rank_is_named_and_sigterm_to_the_supervisor_stops_the_job(
    home: Path, tmp_path: Path, supervised: list[Supervised]
) -> None:
    run = Supervised(
        [sys.executable, LAUNCHER, "2", "--ready", str(tmp_path)], options=("--no-env-check", "--grace", "5")
    )
    supervised.append(run)
    hung = run.ready(tmp_path, 1)
    run.ready(tmp_path, 0)
    killer(hung["pid"], signal.SIGSTOP).communicate(b"")  # alive, and silent
    lost = wait_for_event(home, "run.rank_lost", run)
    assert lost.rank == 1
    assert lost.payload["cause"] == "hung: still running but silent (stopped by a signal)"
    assert 1.5 < lost.payload["silent_s"] < 2.5

    run.signal(signal.SIGTERM)
    status, err = run.finish()

    assert status == 128 + signal.SIGTERM, err
    to_supervisor = [event for event in events(home, "run.signal") if event.payload["to"] == "supervisor"]
    assert len(to_supervisor) == 1
    assert to_supervisor[0].payload["sender_pid"] == os.getpid()
    assert to_supervisor[0].payload["name"] == "SIGTERM"
    (forward,) = events(home, "run.forward")
    assert hung["pid"] in forward.payload["pids"]
    (exit_event,) = events(home, "run.exit")
    assert "SIGTERM" in exit_event.payload["cause"]


def test_an_unwatched_rank_still_dies_on_sigterm(
    home: Path, tmp_path: Path, supervised: list[Supervised]
) -> None:
    run = Supervised([sys.executable, RANK, "--no-watch", "--ready", str(tmp_path)])
    supervised.append(run)
    rank = run.ready(tmp_path, 0)
    assert not rank["watching"] and rank["blocked"]
    attacker = killer(rank["pid"], signal.SIGTERM)
    status, err = run.finish()
    attacker.communicate(b"")

    assert status == 128 + signal.SIGTERM, err
    (sent,) = events(home, "run.signal")
    assert sent.payload["to"] == "process" and sent.payload["name"] == "SIGTERM"
    assert sent.payload["pid"] == rank["pid"] and sent.payload["sender_pid"] is None
    assert sent.payload["action"].startswith("carried out")
    (exit_event,) = events(home, "run.exit")
    assert exit_event.payload["cause"] == "killed by SIGKILL on behalf of a pending SIGTERM"


def test_sigterm_to_a_launcher_that_handles_it_but_does_not_watch_stops_the_job(
    home: Path, tmp_path: Path, supervised: list[Supervised]
) -> None:
    # torchrun's agent: a SIGTERM handler of its own, and the supervisor's block inherited, so the
    # handler never runs. The user's request to stop must stop the job all the same.
    run = Supervised(
        [sys.executable, RANK, "--no-watch", "--handler", "--ready", str(tmp_path)],
        options=("--no-env-check", "--grace", "1"),
    )
    supervised.append(run)
    rank = run.ready(tmp_path, 0)
    assert not rank["watching"] and rank["blocked"]
    attacker = killer(rank["pid"], signal.SIGTERM)
    status, err = run.finish()
    attacker.communicate(b"")

    assert status != 0, err
    sent = [e for e in events(home, "run.signal") if e.payload["to"] == "process"]
    assert [e.payload["action"][:14] for e in sent] == ["a stop request"]
    (forward,) = events(home, "run.forward")
    assert rank["pid"] in forward.payload["pids"]
    (exit_event,) = events(home, "run.exit")
    assert "SIGKILL" in exit_event.payload["cause"]


@pytest.mark.parametrize("how", ["untrusted baseline", "tampered input"])
def test_preflight_refusal_launches_nothing(home: Path, tmp_path: Path, how: str) -> None:
    trusted = PrivateKey.generate("ed25519")
    trusted.public().save(tmp_path / "trusted.pub")
    marker = tmp_path / "launched"
    if how == "untrusted baseline":
        baseline = tmp_path / "baseline.json"
        baseline.write_text('{"format": "trainguard-env-baseline", "forged": true}\n')
        options = ["--baseline", str(baseline)]
    else:
        checkpoint = tmp_path / "ckpt"
        checkpoint.mkdir()
        (checkpoint / "weights.bin").write_bytes(b"\0" * 64)
        sign_path(checkpoint, trusted)
        (checkpoint / "weights.bin").write_bytes(b"\1" * 64)
        options = ["--no-env-check", "--input", str(checkpoint)]
    job = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "run",
            *options,
            "--trust",
            str(tmp_path / "trusted.pub"),
            "--",
            *job,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "not launching" in done.stderr or "does not" in done.stderr
    assert not marker.exists()
    assert not events(home, "run.start") and not events(home, "run.attest")
    (refused,) = events(home, "run.refused")
    assert refused.payload["command"] == job


def test_a_ledger_that_cannot_be_written_stops_the_launch(home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "launched"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "run",
            "--no-env-check",
            "--",
            sys.executable,
            "-c",
            f"open({str(marker)!r}, 'w')",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TRAINGUARD_HOME": str(blocker / "home")},
    )
    assert done.returncode == 3, done.stderr
    assert "ledger" in done.stderr
    assert not marker.exists()


def test_a_message_never_runs_into_an_unfinished_line_of_the_job(
    home: Path, supervised: list[Supervised]
) -> None:
    job = [
        sys.executable,
        "-c",
        "import sys; sys.stderr.write('epoch 3: 42%'); sys.stderr.flush(); sys.exit(5)",
    ]
    run = Supervised(job)
    supervised.append(run)
    code, err = run.finish()
    assert code == 5, err
    assert "epoch 3: 42%\n" in err
    assert any(line.startswith("trainguard: job ") for line in err.splitlines()), err
