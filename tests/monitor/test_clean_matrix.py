"""Clean jobs in the shapes real training takes raise nothing over 200 steps, on two ranks: a tiny
GPT with dropout or a BatchNorm network; AdamW in two groups, SGD with Nesterov momentum, Adam with
amsgrad, fused and foreach AdamW; warm-up and cosine decay; clipping; accumulation under no_sync;
bf16 autocast; eval passes and checkpoint saves. Each job is attacked at its 201st step, on every
rank, so that a configuration in which the checks went quiet cannot pass as clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.monitor.conftest import run_job

pytestmark = pytest.mark.torch

JOB = Path(__file__).with_name("clean_job.py")
STEPS = 201

CONFIGURATIONS = {
    "gpt-adamw-groups-clip-accumulate-bf16-eval-save": [
        *("--optimizer", "adamw-groups", "--clip", "1.0", "--accumulate", "2", "--autocast"),
        *("--eval-every", "25", "--save-every", "50", "--attack", "gradient"),
    ],
    "gpt-sgd-nesterov": ["--optimizer", "sgd-nesterov", "--attack", "state"],
    "gpt-adam-amsgrad": ["--optimizer", "adam-amsgrad", "--attack", "state"],
    "gpt-adamw-fused": ["--optimizer", "adamw-fused", "--attack", "gradient"],
    "gpt-adamw-foreach-bf16": ["--optimizer", "adamw-foreach", "--autocast", "--attack", "state"],
    "batchnorm-adamw-eval-save": (
        ["--model", "batchnorm", "--eval-every", "20", "--save-every", "100", "--attack", "state"]
    ),
    "batchnorm-sgd-nesterov-accumulate": (
        ["--model", "batchnorm", "--optimizer", "sgd-nesterov", "--accumulate", "2", "--attack", "gradient"]
    ),
}
EXPECTED = {"gradient": "gradient_path", "state": "update"}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_clean_job_raises_nothing_until_it_is_attacked(tmp_path: Path, name: str) -> None:
    arguments = CONFIGURATIONS[name]
    result = run_job(
        tmp_path, 2, "--steps", str(STEPS), "--attack-step", str(STEPS), *arguments, script=JOB, timeout=300
    )
    for rank in result.ranks:
        assert rank["steps"] == STEPS, (rank, result.output)
        assert rank["notices"] == [], rank["notices"]
        error = rank["error"]
        assert error is not None, f"the attack at step {STEPS} was not caught:\n{result.output}"
        assert error["step"] == STEPS, error["message"]
        assert error["check"] == EXPECTED[arguments[arguments.index("--attack") + 1]], error["message"]
        assert error["ranks"] == [0, 1], error["message"]
    # Nothing else was said on the way but the attack's stop. Off-CPU waits between steps may be
    # alerted (an alert, the job goes on): the test runs beside another job on the same two cores.
    said = [line for line in result.output.splitlines() if "trainguard:" in line]
    others = [line for line in said if f"at step {STEPS}" not in line]
    assert all("off-CPU time between steps" in line for line in others), others
    if "--eval-every" in arguments:
        assert result.ranks[0]["evals"] > 0
    if "--save-every" in arguments:
        assert result.ranks[0]["saves"] > 0
