"""The incident's run-time attacks against a real data-parallel job: each is caught at the step it
acts, by the check meant for it, on every rank at once, with the rank at fault named.

Each test plants the attack at step 10 of a job of 2 or 3 processes (torchrun, gloo). Where a test
turns other checks off, it shows that one check catches the attack on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.monitor.conftest import run_job
from trainguard.ledger._ledger import Ledger

pytestmark = pytest.mark.torch


def test_clean_run_of_200_steps_raises_no_alarm(tmp_path: Path) -> None:
    result = run_job(tmp_path, 2, "--steps", "200")
    assert [rank["finished"] for rank in result.ranks] == [True, True], result.output
    assert [rank["steps"] for rank in result.ranks] == [200, 200]
    assert "trainguard:" not in result.output
    with Ledger.open(result.home / "ledger.db") as ledger:
        types = [event.type for _, event in ledger.entries()]
    assert types[0] == "monitor.start" and types[-1] == "monitor.end"
    assert types.count("monitor.steps") == 2  # 200 steps in batches of 100
    assert "monitor.alert" not in types


def test_update_flipped_on_one_rank_is_caught_that_step_and_the_rank_named(tmp_path: Path) -> None:
    error = run_job(tmp_path, 2, "--attack", "flip", "--attack-ranks", "1").error()
    assert error["step"] == 10
    assert error["ranks"] == [1]
    assert "rank 1" in error["message"]


def test_flip_on_one_of_three_replicas_is_named_by_the_fingerprints_alone(tmp_path: Path) -> None:
    result = run_job(
        tmp_path, 3, "--attack", "flip", "--attack-ranks", "1", "--skip", "code", "--skip", "update"
    )
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("fingerprint", [1], 10)


def test_fingerprints_in_turns_still_catch_a_flip_at_its_step(tmp_path: Path) -> None:
    # Half the parameters each step: a tampered update touches every tensor, so the turn sees it.
    result = run_job(
        tmp_path, 3, "--attack", "flip", "--attack-ranks", "0", "--skip", "code", "--skip", "update",
        "--params-every", "2",
    )  # fmt: skip
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("fingerprint", [0], 10)


def test_noise_on_one_rank_is_named_by_the_fingerprints_alone(tmp_path: Path) -> None:
    result = run_job(
        tmp_path, 3, "--attack", "noise", "--attack-ranks", "2", "--skip", "code", "--skip", "update"
    )
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("fingerprint", [2], 10)


def test_same_flip_on_every_rank_is_caught_by_the_update_recomputation(tmp_path: Path) -> None:
    # Replicas stay equal, so fingerprints see nothing: only the re-computed update can tell.
    result = run_job(tmp_path, 2, "--attack", "flip", "--skip", "code")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("update", [0, 1], 10)
    assert "direction flipped" in error["message"]


def test_same_flip_on_every_rank_with_sgd(tmp_path: Path) -> None:
    result = run_job(tmp_path, 2, "--optimizer", "sgd", "--attack", "flip", "--skip", "code")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("update", [0, 1], 10)


def test_attack_gated_on_world_size_is_caught_at_the_gated_size(tmp_path: Path) -> None:
    # The incident's attack fired only in jobs of more than 256 GPUs; here the gate is 2 processes.
    error = run_job(tmp_path, 2, "--attack", "gated_flip", "--gate", "2").error()
    assert (error["ranks"], error["step"]) == ([0, 1], 10)


def test_patched_optimizer_function_is_caught_by_the_code_snapshot(tmp_path: Path) -> None:
    result = run_job(tmp_path, 2, "--attack", "sleep", "--attack-ranks", "0", "--skip", "step_time")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("code", [0], 10)
    assert "_single_tensor_adam was replaced" in error["message"]


def test_injected_forward_hook_is_caught(tmp_path: Path) -> None:
    error = run_job(tmp_path, 2, "--attack", "hook", "--attack-ranks", "1").error()
    assert (error["check"], error["ranks"], error["step"]) == ("code", [1], 10)
    assert "hook was added" in error["message"]


def test_a_hook_on_one_replica_before_watch_is_caught_at_the_start(tmp_path: Path) -> None:
    # Registered before watch(), it is part of what the guard first sees; only the replicas differ.
    error = run_job(tmp_path, 3, "--attack", "hook_before_watch", "--attack-ranks", "1").error()
    assert error["check"] == "code" and error["ranks"] == [1], error
    assert "hooks of rank 1 differ from those of its replicas" in error["message"]


def test_step_replaced_without_hooks_is_caught_on_every_rank(tmp_path: Path) -> None:
    # The guard's optimizer hooks never run again: the next forward pass sees the weights moved.
    error = run_job(tmp_path, 2, "--attack", "monkeypatch_step").error()
    assert (error["check"], error["ranks"], error["step"]) == ("outside", [0, 1], 10)
    assert "AdamW.step was replaced" in error["message"]


def test_step_replaced_on_one_rank_stops_the_others_naming_it(tmp_path: Path) -> None:
    # The other rank gathers the report the bypassed rank sends from its next forward pass.
    error = run_job(tmp_path, 2, "--attack", "monkeypatch_step", "--attack-ranks", "1").error()
    assert (error["ranks"], error["step"]) == ([1], 10)
    assert "rank 1 changed without passing the guard's optimizer hooks" in error["message"]


def test_random_sleeps_on_one_rank_are_caught_at_the_first_and_the_rank_named(tmp_path: Path) -> None:
    result = run_job(tmp_path, 2, "--attack", "sleep", "--attack-ranks", "1", "--skip", "code")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("step_time", [1], 10)
    assert "off-CPU in the optimizer" in error["message"]


def test_nan_from_one_rank_is_caught_and_its_origin_named(tmp_path: Path) -> None:
    error = run_job(tmp_path, 2, "--attack", "nan", "--attack-ranks", "1").error()
    assert (error["check"], error["ranks"], error["step"]) == ("nonfinite", [1], 10)
    assert "loss is nan" in error["message"]


def test_the_alert_that_stops_a_job_is_in_the_ledger(tmp_path: Path) -> None:
    result = run_job(tmp_path, 2, "--attack", "flip", "--attack-ranks", "1")
    with Ledger.open(result.home / "ledger.db") as ledger:
        alerts = [event for _, event in ledger.entries() if event.type == "monitor.alert"]
        assert ledger.verify().ok
    assert alerts and alerts[0].payload["step"] == 10 and alerts[0].payload["action"] == "stop"
    assert 1 in alerts[0].payload["ranks"]
    assert all(event.rank == 0 for event in alerts)


def test_ranks_guarding_models_of_different_shapes_share_one_gather(tmp_path: Path) -> None:
    # Pipeline stages: reports of different lengths are padded, not a collective mismatch that aborts.
    result = run_job(tmp_path, 2, script=Path(__file__).with_name("stages_job.py"))
    assert [(rank["finished"], rank.get("steps")) for rank in result.ranks] == [(True, 12), (True, 12)], (
        result.output
    )


# One step late, as on a GPU (forced here on the CPU): the same attacks, the same step in the verdict,
# which every rank draws one step later.
FLIP_ONE = ["--attack", "flip", "--attack-ranks", "1", "--skip", "code", "--skip", "update"]
SLEEP_ONE = ["--attack", "sleep", "--attack-ranks", "1", "--skip", "code"]
DEFERRED = [
    ("flip on one of three", 3, FLIP_ONE, ("fingerprint", [1], 10)),
    ("flip on every rank", 2, ["--attack", "flip", "--skip", "code"], ("update", [0, 1], 10)),
    ("sleeps on one rank", 2, SLEEP_ONE, ("step_time", [1], 10)),
    ("nan from one rank", 2, ["--attack", "nan", "--attack-ranks", "1"], ("nonfinite", [1], 10)),
    ("hook on one rank", 2, ["--attack", "hook", "--attack-ranks", "1"], ("code", [1], 10)),
]


@pytest.mark.parametrize(("name", "nproc", "args", "expected"), DEFERRED, ids=[d[0] for d in DEFERRED])
def test_read_one_step_late_the_same_attacks_are_caught(
    tmp_path: Path, name: str, nproc: int, args: list[str], expected: tuple[str, list[int], int]
) -> None:
    result = run_job(tmp_path, nproc, *args, "--defer")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == expected
    # Raised when step 12 began: the verdict on step 10 is drawn at the start of step 12.
    assert {rank["steps"] for rank in result.ranks} == {11}


def test_read_one_step_late_a_bypassed_step_on_one_rank_stops_both(tmp_path: Path) -> None:
    error = run_job(tmp_path, 2, "--attack", "monkeypatch_step", "--attack-ranks", "1", "--defer").error()
    assert error["ranks"] == [1]
    assert "rank 1 changed without passing the guard's optimizer hooks" in error["message"]


def test_read_one_step_late_a_clean_run_raises_no_alarm(tmp_path: Path) -> None:
    result = run_job(tmp_path, 2, "--steps", "60", "--defer")
    assert [rank["finished"] for rank in result.ranks] == [True, True], result.output
    assert "trainguard:" not in result.output
