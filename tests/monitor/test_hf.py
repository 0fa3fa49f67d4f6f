"""trainguard's callback in a real data-parallel Hugging Face Trainer job (torchrun, gloo, CPU): a
clean run goes on to the end, and an attack stops every rank through the Trainer at the same global
step, with the rank at fault and the check named. The attacks are test_attacks.py's, on a Trainer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.monitor.framework_jobs import run_framework_job
from trainguard.errors import UsageError
from trainguard.ledger._ledger import Ledger

pytestmark = pytest.mark.torch


def test_clean_trainer_run_finishes_without_an_alarm(tmp_path: Path) -> None:
    result = run_framework_job("hf_job.py", tmp_path, 2, "--steps", "30")
    assert [rank["finished"] for rank in result.ranks] == [True, True], result.output
    assert [rank["global_step"] for rank in result.ranks] == [30, 30]
    assert result.errors == [None, None]
    assert all(rank["guard_closed"] for rank in result.ranks)
    assert "trainguard:" not in result.output
    with Ledger.open(result.home / "ledger.db") as ledger:
        events = [event for _, event in ledger.entries()]
    types = [event.type for event in events]
    assert types[0] == "monitor.start" and types[-1] == "monitor.end"
    assert events[-1].payload["steps"] == 30
    assert "monitor.alert" not in types


def test_update_flipped_on_one_rank_stops_every_rank_at_that_step(tmp_path: Path) -> None:
    result = run_framework_job("hf_job.py", tmp_path, 2, "--attack", "flip", "--attack-ranks", "1")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("fingerprint", [1], 10)
    assert "direction flipped" in error["message"]
    # Stopped through the Trainer's control: train() returned, at the attacked step, on every rank.
    assert [(rank["finished"], rank["global_step"]) for rank in result.ranks] == [(True, 10), (True, 10)]
    assert "training stopped at global step 10" in result.output


def test_with_gradient_accumulation_the_verdict_follows_the_optimizer_steps(tmp_path: Path) -> None:
    result = run_framework_job(
        "hf_job.py", tmp_path, 2, "--accumulate", "2", "--attack", "flip", "--attack-ranks", "0",
        "--attack-step", "5", "--skip", "code",
    )  # fmt: skip
    error = result.error()
    assert (error["ranks"], error["step"]) == ([0], 5)
    assert [rank["global_step"] for rank in result.ranks] == [5, 5]


def test_ranks_with_different_training_arguments_stop_before_the_first_step(tmp_path: Path) -> None:
    result = run_framework_job("hf_job.py", tmp_path, 2, "--odd-config-rank", "1")
    error = result.error()
    assert (error["check"], error["step"]) == ("identity", 0)
    assert "run config" in error["message"]
    # The Trainer cannot stop before its first step: train() raised the failure on every rank.
    assert [(rank["raised"], rank["global_step"]) for rank in result.ranks] == [(True, 0), (True, 0)]


def test_callback_rejects_settings_it_cannot_honour() -> None:
    from trainguard.monitor.hf import TrainguardCallback

    with pytest.raises(UsageError, match="raise_errors"):
        TrainguardCallback(raise_errors=True)
    with pytest.raises(UsageError, match="unknown check"):
        TrainguardCallback(skip=["fingerprints"])
    with pytest.raises(UsageError, match="state_every"):
        TrainguardCallback(state_every=0)


def test_the_monitor_package_loads_no_framework_until_a_callback_is_imported() -> None:
    code = (
        "import sys, trainguard, trainguard.monitor; trainguard.monitor.watch; "
        "print(sorted({'transformers', 'lightning', 'pytorch_lightning'} & set(sys.modules)))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_same_gradient_noise_on_every_rank_is_caught_through_the_trainer(tmp_path: Path) -> None:
    # The Trainer wraps the model in DDP itself: the guard finds that wrapper and owns its hook.
    result = run_framework_job("hf_job.py", tmp_path, 2, "--attack", "grad_noise")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("gradient_path", [0, 1], 10), error
    assert [rank["global_step"] for rank in result.ranks] == [10, 10]
