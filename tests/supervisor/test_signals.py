"""`watch_signals` in a real process with real signals: sender reported, then the process's own
disposition: ignored, a Python handler, or death by the signal itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainguard.monitor._signals import watch_signals

TARGET = str(Path(__file__).with_name("target.py"))


def _run(mode: str) -> tuple[int, list[str], str]:
    done = subprocess.run(
        [sys.executable, TARGET, mode], capture_output=True, text=True, timeout=60, check=False
    )
    return done.returncode, done.stdout.splitlines(), done.stderr


def _report(line: str, signo: int) -> dict[str, object]:
    event: dict[str, object] = json.loads(line)
    assert event["signal"] == signo and event["name"] == signal.Signals(signo).name
    assert event["sender_uid"] == os.getuid()
    assert TARGET in str(event["sender_cmdline"])  # it signalled itself
    return event


def test_without_the_block_it_does_nothing() -> None:
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert watch_signals(lambda event: None) is False
    status, lines, err = _run("unblocked")
    assert status == 0 and lines == ['{"watching": false}'], err


def test_an_ignored_signal_is_reported_and_stays_ignored() -> None:
    status, lines, err = _run("ignored")
    assert status == 0, err
    _report(lines[0], signal.SIGUSR1)
    assert lines[1:] == ["alive"]


def test_a_python_handler_runs_in_the_main_thread() -> None:
    status, lines, err = _run("interrupt")
    assert status == 3, err
    _report(lines[0], signal.SIGINT)
    assert lines[1:] == ["KeyboardInterrupt"]


@pytest.mark.parametrize(("mode", "signo"), [("default", signal.SIGHUP), ("failing-report", signal.SIGTERM)])
def test_a_default_disposition_kills_with_the_signal_itself(mode: str, signo: int) -> None:
    status, lines, err = _run(mode)
    assert status == -signo, err
    _report(lines[0], signo)
    assert "alive" not in lines
    if mode == "failing-report":
        assert "the ledger is down" in err
