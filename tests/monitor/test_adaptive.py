"""The incident's sabotage moved one function away, as an insider who read the guard would move it,
against a real data-parallel job (torchrun, gloo): each is caught within two steps of acting, on
every rank at once, by the check named, and the rank at fault is named where one rank is.

The job (adaptive_job.py) trains an embedding, a LayerNorm and a head with AdamW in two parameter
groups under a LambdaLR warm-up (or SGD with momentum), reading its data through a DistributedSampler.
Attacks act at step 10 unless said otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.monitor.conftest import JobResult, run_job

pytestmark = pytest.mark.torch

JOB = Path(__file__).with_name("adaptive_job.py")


def job(tmp_path: Path, nproc: int, *args: str) -> JobResult:
    return run_job(tmp_path, nproc, *args, script=JOB)


def caught(result: JobResult, check: str, ranks: list[int], *, within: int = 2, at: int = 10) -> str:
    error = result.error()
    assert error["check"] == check, error["message"]
    assert error["ranks"] == ranks, error["message"]
    assert at <= error["step"] < at + within, error
    message: str = error["message"]
    return message


def test_clean_job_with_scheduler_sampler_and_two_groups_raises_nothing(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--steps", "200")
    assert [rank["finished"] for rank in result.ranks] == [True, True], result.output
    assert "trainguard:" not in result.output


# 1. Gradients


def test_loss_function_patched_to_flip_its_gradient_is_caught_by_the_code_check(tmp_path: Path) -> None:
    # cross_entropy returns the right value with a negated gradient: the loss curve looks right.
    message = caught(job(tmp_path, 2, "--attack", "cross_entropy_flip"), "code", [0, 1])
    assert "torch.nn.functional.cross_entropy was replaced" in message


def test_same_gradient_noise_added_on_every_rank_between_backward_and_step(tmp_path: Path) -> None:
    # Replicas stay equal and the update is re-computed from the noisy gradient: only the gradient's
    # path from the all-reduce to the step shows it.
    message = caught(job(tmp_path, 2, "--attack", "grad_noise"), "gradient_path", [0, 1])
    assert "left the backward pass (or the all-reduce) as" in message


def test_gradient_flipped_on_every_rank_after_the_all_reduce(tmp_path: Path) -> None:
    caught(job(tmp_path, 2, "--attack", "grad_flip"), "gradient_path", [0, 1])


def test_communication_hook_negating_one_ranks_gradient_before_watch(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--attack", "comm_hook_negate", "--attack-ranks", "1")
    message = caught(result, "gradient_path", [1], at=1)
    assert (
        "communication hook (__main__._negating_hook.<locals>.negate) was registered on DDP before" in message
    )


def test_communication_hook_registered_after_watch_is_refused_and_named(tmp_path: Path) -> None:
    # DDP takes one hook, and the guard's is there: the attempt fails, and even swallowed it is seen.
    result = job(tmp_path, 2, "--attack", "comm_hook_after", "--attack-ranks", "1")
    assert "registered on DDP after watch()" in caught(result, "gradient_path", [1])


def test_guard_gradient_recording_switched_off_on_one_rank(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--attack", "gradient_recording_off", "--attack-ranks", "1")
    assert "without passing the guard's all-reduce hook" in caught(result, "gradient_path", [1])


# The same moved inside the backward pass, where the gradient path first sees it: only the forward
# pass can tell. Every step is probed here (--derivative-every 1); the default probes 1 in 32.


@pytest.mark.parametrize(
    ("attack", "named"),
    [
        # The model's own code edited: an autograd function that flips the gradient behind the norm.
        ("model_function_flip", "norm.weight"),
        # Hooks left by code that ran before watch() on one replica: the code check names them at the
        # start, as the replicas' hooks differ (test_attacks.py); turned off here, the forward pass tells.
        ("param_hook_flip", "norm.bias"),
        ("module_hook_scale", "norm.weight"),
    ],
)
def test_backward_pass_that_lies_on_one_rank_is_caught_against_its_forward_pass(
    tmp_path: Path, attack: str, named: str
) -> None:
    skip = ["--skip", "code"] if "hook" in attack else []
    result = job(tmp_path, 2, "--attack", attack, "--attack-ranks", "1", "--derivative-every", "1", *skip)
    message = caught(result, "derivative", [1], at=1)
    assert named in message and "disagrees with its forward pass" in message


def test_hook_on_the_output_flipping_the_loss_gradient_on_every_rank(tmp_path: Path) -> None:
    # The loss's gradient flipped between the loss and the model: the guard's own hook on the output
    # runs first and sees the gradient as the loss gave it.
    result = job(tmp_path, 2, "--attack", "output_hook_flip", "--derivative-every", "1")
    caught(result, "derivative", [0, 1])


def test_backward_pass_that_lies_is_caught_at_a_secret_probe(tmp_path: Path) -> None:
    # One step in 4 is probed, at steps no rank can foresee: a lie held for 60 steps escapes with
    # probability (3/4)^60, about 3e-8.
    result = job(tmp_path, 2, "--attack", "model_function_flip", "--derivative-every", "4", "--steps", "60")
    caught(result, "derivative", [0, 1], at=1, within=60)


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_clean_job_with_clipping_and_no_sync_accumulation_raises_nothing(tmp_path: Path, clip: str) -> None:
    result = job(
        tmp_path, 2, "--steps", "200", "--clip", clip, "--accumulate", "2", "--derivative-every", "1"
    )
    assert [rank["finished"] for rank in result.ranks] == [True, True], result.output
    assert "trainguard:" not in result.output


# 2. Optimizer state and hyper-parameters


def test_adam_exp_avg_negated_on_every_rank(tmp_path: Path) -> None:
    message = caught(job(tmp_path, 2, "--attack", "exp_avg_negate"), "update", [0, 1])
    assert "exp_avg " in message and "changed between steps" in message


def test_adam_exp_avg_sq_scaled_on_every_rank(tmp_path: Path) -> None:
    message = caught(job(tmp_path, 2, "--attack", "exp_avg_sq_scale"), "update", [0, 1])
    assert "exp_avg_sq" in message


def test_sgd_momentum_buffer_scaled_on_every_rank(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--optimizer", "sgd", "--attack", "momentum_scale")
    assert "momentum_buffer" in caught(result, "update", [0, 1])


def test_learning_rate_halved_through_param_groups(tmp_path: Path) -> None:
    message = caught(job(tmp_path, 2, "--attack", "lr_halve"), "hyperparameters", [0, 1])
    assert "lr of parameter group 0 is 0.005, but its scheduler computed 0.01" in message


def test_weight_decay_raised_to_50(tmp_path: Path) -> None:
    message = caught(job(tmp_path, 2, "--attack", "weight_decay"), "hyperparameters", [0, 1])
    assert "weight_decay of parameter group 0 changed from 0.01 to 50.0" in message


def test_scheduler_get_lr_patched(tmp_path: Path) -> None:
    message = caught(job(tmp_path, 2, "--attack", "get_lr_patch"), "code", [0, 1])
    assert "LambdaLR.get_lr was replaced" in message


def test_scheduler_get_lr_patched_is_still_caught_by_the_learning_rate_it_sets(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--attack", "get_lr_patch", "--skip", "code")
    assert "learning rate of parameter group 0 is -" in caught(result, "hyperparameters", [0, 1])


def test_optimizer_state_reloaded_from_a_tampered_copy(tmp_path: Path) -> None:
    message = caught(job(tmp_path, 2, "--attack", "load_state_dict"), "update", [0, 1])
    assert "exp_avg " in message


# 3. Weights written outside the optimizer, without a version bump


def test_weights_scaled_through_data_on_every_rank(tmp_path: Path) -> None:
    message = caught(job(tmp_path, 2, "--attack", "data_mul"), "outside", [0, 1])
    assert "changed between steps" in message


def test_weights_scaled_through_data_on_one_rank_of_two_names_it(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--attack", "data_mul", "--attack-ranks", "1")
    caught(result, "fingerprint", [1])
    assert "rank 1" in result.error()["message"]


def test_weights_written_through_a_numpy_view(tmp_path: Path) -> None:
    message = caught(job(tmp_path, 2, "--attack", "numpy_write"), "outside", [0, 1])
    assert "head.weight" in message


# 4. The guard's surroundings: Tensor methods, operator kernels


def test_tensor_method_patched_after_watch(tmp_path: Path) -> None:
    # torch.Tensor.addcdiv_ shadows TensorBase's: the Tensor class is watched by content, not identity.
    message = caught(job(tmp_path, 2, "--attack", "addcdiv_patch", "--skip", "update"), "code", [0, 1])
    assert "torch.Tensor.addcdiv_ was added" in message


def test_operator_kernel_replaced_through_torch_library(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--attack", "library_kernel", "--skip", "update")
    assert "aten/addcdiv_/CPU" in caught(result, "code", [0, 1])


# 5. Timing: spinning on the CPU (off-CPU timing misses it), stalls in the backward pass


@pytest.mark.parametrize("attack", ["busy_forward", "sleep_backward", "busy_backward"])
def test_stall_on_one_rank_is_caught_at_its_second_occurrence(tmp_path: Path, attack: str) -> None:
    # The hook that stalls is also a code finding: skipped here, so that timing alone must see it.
    # A one-off slow step is let pass (a garbage collection); the stall's return is not.
    result = job(tmp_path, 2, "--attack", attack, "--attack-ranks", "1", "--skip", "code")
    message = caught(result, "step_time", [1], at=11, within=1)
    assert re.search(r"rank 1 took \d+ ms from the first forward pass to a complete gradient", message)


def test_busy_wait_one_rank_in_the_optimizer_step_is_caught_at_its_second_occurrence(tmp_path: Path) -> None:
    # The drill's busy-wait-one-rank: a spin in the optimizer step never leaves the CPU, so the step's
    # off-CPU window misses it; the optimizer's CPU time is part of the rank's compute.
    result = job(tmp_path, 2, "--attack", "busy_optimizer", "--attack-ranks", "1", "--skip", "code")
    message = caught(result, "step_time", [1], at=11, within=1)
    assert re.search(r"rank 1 took \d+ ms from the first forward pass to a complete gradient", message)
    assert "optimizer's CPU time" in message


def test_one_slow_step_on_one_rank_does_not_stop_the_job(tmp_path: Path) -> None:
    # The same 150 ms spin, once: a garbage collection looks like this, and is no attack.
    result = job(tmp_path, 2, "--attack", "busy_once", "--attack-ranks", "1", "--skip", "code")
    assert [rank["finished"] for rank in result.ranks] == [True, True], result.output
    assert "trainguard:" not in result.output


def test_stall_at_every_third_step_is_caught_at_its_second_occurrence(tmp_path: Path) -> None:
    # Spacing the stall out does not make each one a one-off: it stalls at steps 10 and 13, and is
    # caught by the step after the second at the latest. On a loaded machine a step next to a stall can
    # read slow or not (own CPU time, the optimizer's included, is not immune to a shared core), which
    # names the same rank a step earlier or later.
    result = job(tmp_path, 2, "--attack", "busy_every_third", "--attack-ranks", "1", "--skip", "code")
    message = caught(result, "step_time", [1], at=11, within=4)
    assert re.search(r"rank 1 took \d+ ms from the first forward pass to a complete gradient", message)


def test_rank_slow_from_the_first_step_is_named_as_the_straggler(tmp_path: Path) -> None:
    # No history to compare with yet: the peers' compute is the yardstick.
    result = job(
        tmp_path,
        3,
        "--attack",
        "busy_backward",
        "--attack-ranks",
        "2",
        "--attack-step",
        "1",
        "--skip",
        "code",
    )
    assert "rank 2 computed step 2 far slower than its peers" in caught(
        result, "step_time", [2], at=2, within=1
    )


def test_clean_job_beside_two_cpu_bound_processes_raises_nothing(tmp_path: Path) -> None:
    # Two processes that spin compete with the job's two ranks for the machine's cores: own time
    # leaves out the wait for a CPU, so nothing is a straggler.
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        result = job(tmp_path, 2, "--steps", "200")
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert [rank["finished"] for rank in result.ranks] == [True, True], result.output
    assert "trainguard:" not in result.output


# 6. Coverage


def test_attack_on_one_small_tensor_every_37th_step_is_caught_at_its_first(tmp_path: Path) -> None:
    # Every tensor's fixed elements are re-computed at every step: a LayerNorm bias is no exception.
    result = job(tmp_path, 2, "--attack", "small_tensor", "--steps", "40", "--skip", "code")
    assert "norm.bias" in caught(result, "update", [0, 1], at=37)


# 7. Seeds and data order


def test_sampler_seed_changed_on_one_rank(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--attack", "sampler_seed", "--attack-ranks", "1")
    assert "seed of a DistributedSampler changed from 3 to 7" in caught(result, "sampler", [1])


def test_manual_seed_patched_on_one_rank_before_watch(tmp_path: Path) -> None:
    result = job(tmp_path, 2, "--attack", "manual_seed_patch", "--attack-ranks", "1")
    message = caught(result, "code", [1], at=1)
    assert "torch.manual_seed runs" in message and "patched before watch()" in message


# 9. Modules that write their own weights in forward


@pytest.mark.parametrize("nproc", [1, 2])
def test_embedding_with_max_norm_is_no_false_alarm(tmp_path: Path, nproc: int) -> None:
    result = job(tmp_path, nproc, "--max-norm", "1.0", "--steps", "60")
    assert all(rank["finished"] for rank in result.ranks), result.output
    assert "trainguard:" not in result.output.replace("trainguard: notice:", "")
    notices = result.ranks[0]["notices"]
    if nproc > 1:
        assert any("embed.weight is renormalised" in notice for notice in notices)
