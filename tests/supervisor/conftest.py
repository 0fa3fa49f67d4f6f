"""Running `trainguard run` as a real process over real rank processes, and reading what it recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from trainguard.ledger import Event, Ledger

HERE = Path(__file__).resolve().parent
RANK = str(HERE / "rank.py")
LAUNCHER = str(HERE / "launcher.py")
# Waits on other processes end here at the latest, so that a broken supervisor fails a test, not the run.
PATIENCE_S = 60.0


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TRAINGUARD_HOME, seen by this process (to read the ledger) and by the supervisor."""
    home = tmp_path / "home"
    monkeypatch.setenv("TRAINGUARD_HOME", str(home))
    for name in ("TRAINGUARD_LEDGER", "TRAINGUARD_LEDGER_KEY", "TRAINGUARD_ENV_BASELINE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return home


class Supervised:
    """`python -m trainguard run OPTIONS -- JOB...` running in the background."""

    def __init__(
        self, job: Sequence[str], *, options: Sequence[str] = ("--no-env-check",), **env: str
    ) -> None:
        command = [sys.executable, "-m", "trainguard", "run", *options, "--", *job]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )

    def ready(self, folder: Path, rank: int) -> dict[str, Any]:
        """What rank `rank` wrote once it was beating: its pid, whether it watches signals."""
        path = folder / f"rank{rank}.json"
        deadline = time.monotonic() + PATIENCE_S
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate()
                pytest.fail(f"rank {rank} never got ready; supervisor exit {self.proc.returncode}:\n{err}")
            time.sleep(0.02)
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def finish(self) -> tuple[int, str]:
        """The supervisor's exit status and its stderr."""
        try:
            _, err = self.proc.communicate(timeout=PATIENCE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"the supervisor did not finish:\n{err}")
        return self.proc.returncode, err


@pytest.fixture
def supervised() -> Iterator[list[Supervised]]:
    """Supervisors started by a test; any still running at its end are killed with their jobs."""
    started: list[Supervised] = []
    yield started
    for run in started:
        if run.proc.poll() is None:
            run.signal(signal.SIGTERM)
            try:
                run.proc.communicate(timeout=PATIENCE_S)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.communicate()


def events(home: Path, kind: str | None = None) -> list[Event]:
    with Ledger.open(home / "ledger.db") as ledger:
        found = [event for _, event in ledger.entries()]
    return [event for event in found if kind is None or event.type == kind]


def wait_for_event(home: Path, kind: str, run: Supervised) -> Event:
    """The first `kind` event, waiting for the supervisor to record it."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        if (home / "ledger.db").exists() and (found := events(home, kind)):
            return found[0]
        if run.proc.poll() is not None or time.monotonic() > deadline:
            _, err = run.proc.communicate()
            pytest.fail(f"no {kind} event; supervisor exit {run.proc.returncode}:\n{err}")
        time.sleep(0.05)


def killer(pid: int, sig: int) -> subprocess.Popen[bytes]:
    """Another process that signals `pid` and then waits for its stdin to close, so that the receiver
    can read its command line (a process that is gone has none)."""
    code = f"import os, signal, sys; os.kill({pid}, signal.Signals({int(sig)})); sys.stdin.read()"
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
