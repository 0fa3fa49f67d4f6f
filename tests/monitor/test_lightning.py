"""trainguard's callback in a real data-parallel Lightning job (torchrun, gloo, CPU), under both
`lightning.pytorch` and `pytorch_lightning`: a clean run goes on to the end, and an attack stops every
rank through `trainer.should_stop` at the same global step, with the rank at fault and the check named."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from tests.monitor.framework_jobs import run_framework_job  # noqa: E402
from trainguard.errors import UsageError  # noqa: E402
from trainguard.ledger._ledger import Ledger  # noqa: E402
from trainguard.monitor._callback import jsonable, torch_optimizer  # noqa: E402

pytestmark = pytest.mark.torch


def test_clean_lightning_run_finishes_without_an_alarm_and_feeds_the_loss(tmp_path: Path) -> None:
    # With validation every 10 batches: its forward passes go through the guarded module too.
    result = run_framework_job("lightning_job.py", tmp_path, 2, "--steps", "30", "--validate-every", "10")
    assert [rank["finished"] for rank in result.ranks] == [True, True], result.output
    assert [rank["global_step"] for rank in result.ranks] == [30, 30]
    assert result.errors == [None, None]
    assert all(rank["guard_closed"] for rank in result.ranks)
    # Lightning points the module's forward at training_step for one call at a time: the pass cannot
    # be re-run as it ran, and the derivative check says so rather than probe something else.
    said = [line for line in result.output.splitlines() if "trainguard:" in line]
    assert said and all("forward is redirected" in line for line in said), said
    with Ledger.open(result.home / "ledger.db") as ledger:
        events = [event for _, event in ledger.entries()]
    assert events[0].type == "monitor.start" and events[-1].payload["steps"] == 30
    assert "monitor.alert" not in [e.type for e in events]
    rows = [row for e in events if e.type == "monitor.steps" for row in e.payload["rows"]]
    # Each step's loss reached the guard before its optimizer step (the "loss" column).
    assert len(rows) == 30 and all(row[1] is not None and 1.0 < row[1] < 3.0 for row in rows)


def test_update_flipped_on_one_rank_stops_every_rank_at_that_step(tmp_path: Path) -> None:
    result = run_framework_job("lightning_job.py", tmp_path, 2, "--attack", "flip", "--attack-ranks", "1")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("fingerprint", [1], 10)
    assert "direction flipped" in error["message"]
    assert [(rank["finished"], rank["global_step"]) for rank in result.ranks] == [(True, 10), (True, 10)]


def test_pytorch_lightning_namespace_stops_every_rank_the_same_way(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    result = run_framework_job(
        "lightning_job.py", tmp_path, 2, "--namespace", "pytorch_lightning", "--attack", "flip",
        "--attack-ranks", "1", "--skip", "code", "--skip", "fingerprint",
    )  # fmt: skip
    error = result.error()
    # With the fingerprints off, the re-computed update alone names the rank.
    assert (error["check"], error["ranks"], error["step"]) == ("update", [1], 10)
    assert [(rank["finished"], rank["global_step"]) for rank in result.ranks] == [(True, 10), (True, 10)]


def test_with_gradient_accumulation_the_verdict_follows_the_optimizer_steps(tmp_path: Path) -> None:
    result = run_framework_job(
        "lightning_job.py", tmp_path, 2, "--accumulate", "3", "--attack", "flip", "--attack-ranks", "0",
        "--attack-step", "5",
    )  # fmt: skip
    error = result.error()
    assert (error["ranks"], error["step"]) == ([0], 5)
    assert [rank["global_step"] for rank in result.ranks] == [5, 5]


def test_when_min_steps_keeps_lightning_going_the_next_batch_raises_on_every_rank(tmp_path: Path) -> None:
    result = run_framework_job(
        "lightning_job.py", tmp_path, 2, "--min-steps", "30", "--attack", "flip", "--attack-ranks", "1"
    )
    error = result.error()
    assert (error["ranks"], error["step"]) == ([1], 10)
    assert [(rank["raised"], rank["global_step"]) for rank in result.ranks] == [
        ("IntegrityError", 10),
        ("IntegrityError", 10),
    ]
    assert all(rank["guard_closed"] for rank in result.ranks)


# -- the shared pieces, in one process ---------------------------------------------------------------


def test_torch_optimizer_unwraps_framework_wrappers_and_rejects_others() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    class Wrapper:
        def __init__(self, inner: object) -> None:
            self.optimizer = inner

    assert torch_optimizer(Wrapper(Wrapper(optimizer))) is optimizer
    with pytest.raises(UsageError, match=r"not a torch\.optim\.Optimizer"):
        torch_optimizer(Wrapper(object()))


def test_run_config_becomes_plain_json_the_same_on_every_rank() -> None:
    config = jsonable({"lr": 0.1, "layers": (2, 3), "loss": object(), "nested": {"fn": len}})
    assert config == {
        "lr": 0.1,
        "layers": [2, 3],
        "loss": "<builtins.object>",
        "nested": {"fn": "<builtins.builtin_function_or_method>"},
    }


def test_callback_rejects_settings_it_cannot_honour() -> None:
    from trainguard.monitor.lightning import TrainguardCallback

    with pytest.raises(UsageError, match="raise_errors"):
        TrainguardCallback(raise_errors=False)
    with pytest.raises(UsageError, match="unknown action"):
        TrainguardCallback(actions={"update": "ignore"})


def test_same_gradient_noise_on_every_rank_is_caught_through_the_trainer(tmp_path: Path) -> None:
    # Lightning wraps the module in DDP and runs backward inside the step's closure.
    result = run_framework_job("lightning_job.py", tmp_path, 2, "--attack", "grad_noise")
    error = result.error()
    assert (error["check"], error["ranks"], error["step"]) == ("gradient_path", [0, 1], 10), error
    assert [rank["global_step"] for rank in result.ranks] == [10, 10]
