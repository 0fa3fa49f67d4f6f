"""The guard under `trainguard run` and torchrun: a rank killed by another process is named, and so is
whoever sent a catchable signal. Real processes, real signals."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.supervisor.conftest import PATIENCE_S, Supervised, events, killer

pytestmark = pytest.mark.torch

JOB = Path(__file__).with_name("job.py")


def _start(tmp_path: Path, home: Path) -> tuple[Supervised, list[int]]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    job = [*torchrun, str(JOB), "--out", str(tmp_path), "--ready", str(tmp_path), "--steps", "100000"]
    run = Supervised(job, TRAINGUARD_HOME=str(home), OMP_NUM_THREADS="1")
    pids = []
    deadline = time.monotonic() + PATIENCE_S
    for rank in (0, 1):
        path = tmp_path / f"rank{rank}.ready.json"
        while not path.exists():
            if run.proc.poll() is not None or time.monotonic() > deadline:
                _, err = run.proc.communicate()
                pytest.fail(f"rank {rank} never got ready:\n{err}")
            time.sleep(0.05)
        pids.append(json.loads(path.read_text())["pid"])
    # Let the guard's first steps report in.
    time.sleep(1.0)
    return run, pids


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRAINGUARD_LEDGER", raising=False)
    return tmp_path / "home"


def test_sigterm_to_a_guarded_rank_names_the_sender(tmp_path: Path, home: Path) -> None:
    run, pids = _start(tmp_path, home)
    try:
        attacker = killer(pids[1], signal.SIGTERM)
        status, err = run.finish()
        attacker.communicate(b"")
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert status != 0, err
    sent = [event for event in events(home, "run.signal") if event.payload.get("pid") == pids[1]]
    assert sent, err
    assert sent[0].rank == 1
    assert sent[0].payload["name"] == "SIGTERM"
    assert sent[0].payload["sender_pid"] == attacker.pid
    assert f"os.kill({pids[1]}, signal.Signals(15))" in sent[0].payload["sender_cmdline"]
    assert "rank 1 received SIGTERM from pid" in err


def test_sigkill_of_a_guarded_rank_is_named_within_two_seconds(tmp_path: Path, home: Path) -> None:
    run, pids = _start(tmp_path, home)
    try:
        killer(pids[0], signal.SIGKILL).communicate(b"")
        status, err = run.finish()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert status != 0, err
    lost = [event for event in events(home, "run.rank_lost") if event.payload.get("pid") == pids[0]]
    assert len(lost) == 1, err
    assert lost[0].rank == 0
    assert lost[0].payload["cause"] in ("killed by SIGKILL", "gone; its parent reaped it")
    assert lost[0].payload["silent_s"] < 2.0


# The guard switched off or patched from inside the job: its evidence has already left the process, and
# `trainguard run` judges it there.

ADAPTIVE = Path(__file__).with_name("adaptive_job.py")


def _supervised_attack(tmp_path: Path, home: Path, *args: str) -> list[dict[str, object]]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    job = [*torchrun, str(ADAPTIVE), "--out", str(tmp_path), "--steps", "100000", *args]
    run = Supervised(job, TRAINGUARD_HOME=str(home), OMP_NUM_THREADS="1")
    try:
        status, err = run.finish()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert status != 0, err
    alarms = [{"rank": event.rank, **event.payload} for event in events(home, "run.guard_alarm")]
    assert alarms, err
    return alarms


def _stopping(alarms: list[dict[str, object]]) -> dict[str, object]:
    return next(a for a in alarms if a["kind"] != "failed")


def test_guard_switched_off_on_one_rank_is_named_within_seconds(tmp_path: Path, home: Path) -> None:
    alarm = _stopping(_supervised_attack(tmp_path, home, "--attack", "guard_off", "--attack-ranks", "1"))
    assert (alarm["kind"], alarm["rank"]) == ("silent", 1)
    assert "has sent nothing for" in str(alarm["message"])
    (forward,) = events(home, "run.forward")  # the supervisor stopped the job
    assert forward.payload["name"] == "SIGTERM"


def test_guard_closed_on_one_rank_is_named(tmp_path: Path, home: Path) -> None:
    alarm = _stopping(_supervised_attack(tmp_path, home, "--attack", "guard_close", "--attack-ranks", "1"))
    assert (alarm["kind"], alarm["rank"]) == ("closed", 1), alarm


def test_verdict_function_patched_in_process_is_judged_by_the_supervisor(tmp_path: Path, home: Path) -> None:
    alarms = _supervised_attack(tmp_path, home, "--attack", "decide_patch")
    # Under load a timing alert may be recorded too: the code check is what matters here.
    failed = [a for a in alarms if a["kind"] == "failed" and a["check"] == "code"]
    assert {a["rank"] for a in failed} == {0, 1}
    assert all(a["step"] in (10, 11) for a in failed)
    assert "trainguard.monitor._guard.decide was replaced" in str(failed[0]["message"])
    alarm = _stopping(alarms)
    assert alarm["kind"] == "not-stopped" and alarm["check"] == "code"


def test_guard_checks_emptied_is_caught_by_the_supervisor(tmp_path: Path, home: Path) -> None:
    alarm = _stopping(_supervised_attack(tmp_path, home, "--attack", "checks_emptied"))
    assert alarm["kind"] == "checks-dropped" and alarm["step"] == 10
