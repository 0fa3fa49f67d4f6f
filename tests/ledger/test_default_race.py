"""Processes that open a fresh default ledger together: one creates its key and store, all append."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROCESSES = 8
ROUNDS = 3


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_processes_creating_the_default_ledger_together_all_append(tmp_path: Path, round_: int) -> None:
    home = tmp_path / f"home-{round_}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINGUARD_")}
    env["TRAINGUARD_HOME"] = str(home)
    command = [sys.executable, "-m", "trainguard", "ledger", "append", "--type", "race.test"]
    children = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(PROCESSES)
    ]
    failures = []
    for child in children:
        out, err = child.communicate(timeout=120)
        if child.returncode != 0:
            failures.append(f"exit {child.returncode}: {out}{err}")
    assert not failures, "\n".join(failures)
    key = home / "keys" / "ledger.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert not [p.name for p in key.parent.iterdir() if p.name.endswith(".new")]  # no temporary left
    shown = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "show", "--type", "race.test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert len([json.loads(line) for line in shown.stdout.splitlines()]) == PROCESSES
    verified = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
