"""`watch()` and the world a launcher says the process is in: under torchrun (WORLD_SIZE above 1) a
process without a process group would be a world of one on every rank, with the checks across
replicas off; it is refused, and the error names the fix. A single process is a world of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import trainguard  # noqa: E402
from tests.monitor.conftest import ROOT, run_job  # noqa: E402
from trainguard.errors import UsageError  # noqa: E402

pytestmark = pytest.mark.torch

JOB = Path(__file__).with_name("alone_job.py")
FIX = "call torch.distributed.init_process_group() before trainguard.watch(...)"
# What torchrun, torch.distributed.launch and SLURM scripts set: none may leak in from the caller.
LAUNCHER = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run_alone(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """alone_job.py as one plain process, with `env` as the launcher's variables; its rank0.json, if any."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCHER}
    environment.update(
        TRAINGUARD_HOME=str(tmp_path / "home"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        **env,
    )
    completed = subprocess.run(
        [sys.executable, str(JOB), "--out", str(out), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    written = out / "rank0.json"
    return completed, json.loads(written.read_text()) if written.exists() else None


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in LAUNCHER:
        monkeypatch.delenv(key, raising=False)


def test_watch_before_init_process_group_under_torchrun_is_refused_on_every_rank(tmp_path: Path) -> None:
    job = run_job(tmp_path, 2, script=JOB, timeout=120)
    for rank in job.ranks:
        assert rank["error"]["type"] == "UsageError", job.output
        assert "WORLD_SIZE=2" in rank["error"]["message"]
        assert FIX in rank["error"]["message"]
    # The traceback a user sees names the fix.
    assert FIX in job.output


def test_a_process_told_it_is_one_of_two_exits_with_the_fix_in_its_traceback(tmp_path: Path) -> None:
    completed, result = _run_alone(tmp_path, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    assert completed.returncode != 0
    raised = "trainguard.errors.UsageError: watch(): WORLD_SIZE=2"
    shown = [line for line in completed.stderr.splitlines() if line.startswith(raised)]
    assert shown and FIX in shown[0], completed.stderr
    assert "single_process=True" in completed.stderr
    assert result["error"]["type"] == "UsageError"


@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}], ids=["unset", "1"])
def test_a_single_process_is_a_world_of_one_without_a_process_group(
    tmp_path: Path, env: dict[str, str]
) -> None:
    completed, result = _run_alone(tmp_path, **env)
    assert completed.returncode == 0, completed.stderr
    assert result == {"rank": 0, "error": None, "world": 1, "steps": 3}


def test_single_process_runs_alone_where_a_launcher_said_otherwise(
    no_launcher: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sweep under torchrun: every process trains a model of its own and none joins a group.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with trainguard.watch(model, optimizer, ledger=False, single_process=True) as guard:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
    assert (guard.rank, guard.world_size, guard.step, guard.failure) == (0, 1, 1, None)


def test_single_process_is_refused_in_a_process_group_of_several(tmp_path: Path) -> None:
    # It must not switch off the comparison of ranks that did join a group.
    job = run_job(tmp_path, 2, "--init", "--single-process", script=JOB, timeout=120)
    for rank in job.ranks:
        assert rank["error"]["type"] == "UsageError", job.output
        assert (
            "single_process=True, but torch.distributed's process group has 2 ranks"
            in (rank["error"]["message"])
        )


@pytest.mark.parametrize("value", ["abc", "-2", "0", "", "2.0", "1e9", "9" * 5000])
def test_a_world_size_that_is_not_a_count_is_a_usage_error(
    no_launcher: None, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", value)
    model = nn.Linear(4, 2)
    with pytest.raises(UsageError, match="the environment's WORLD_SIZE is") as caught:
        trainguard.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), ledger=False)
    # The value is quoted, and cut short: the environment is not ours to print whole.
    assert len(caught.value.message) < 200
    assert "unset WORLD_SIZE" in caught.value.diagnostics()


def test_the_refusal_names_the_fix_in_its_message_and_the_way_out_in_its_hint(
    no_launcher: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "8")
    model = nn.Linear(4, 2)
    with pytest.raises(UsageError) as caught:
        trainguard.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), ledger=False)
    assert FIX in caught.value.message
    assert caught.value.hint is not None and "single_process=True" in caught.value.hint
