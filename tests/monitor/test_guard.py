"""The guard in a single process: the plain-loop contract (IntegrityError from optimizer.step()), the
actions, the settings, and what it leaves in the ledger."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import trainguard  # noqa: E402
from trainguard.errors import IntegrityError, TrainguardError, UsageError  # noqa: E402
from trainguard.ledger._ledger import Ledger  # noqa: E402
from trainguard.monitor import Guard  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRAINGUARD_LEDGER", raising=False)
    return tmp_path / "home"


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, count: int) -> Iterator[int]:
    for step in range(1, count + 1):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step


@pytest.mark.parametrize("defer", [False, True])
def test_each_step_summary_is_labelled_with_the_step_its_reports_are_of(
    model: nn.Module, home: Path, defer: bool
) -> None:
    # Deferred (as on a GPU), the reports are judged a step late: a row must still carry their own step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with trainguard.watch(model, optimizer, summary_every=5, defer=defer):
        for _ in _steps(model, optimizer, 12):
            pass
    with Ledger.open(home / "ledger.db") as ledger:
        summaries = [event.payload for _, event in ledger.entries() if event.type == "monitor.steps"]
    steps = [row[summaries[0]["columns"].index("step")] for summary in summaries for row in summary["rows"]]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 11


def _summary_steps(ledger_path: Path) -> tuple[list[int], list[str]]:
    with Ledger.open(ledger_path) as ledger:
        events = [event for _, event in ledger.entries()]
    summaries = [event.payload for event in events if event.type == "monitor.steps"]
    steps = [row[summary["columns"].index("step")] for summary in summaries for row in summary["rows"]]
    return steps, [event.type for event in events]


def test_a_job_killed_mid_run_keeps_the_summaries_of_all_but_its_last_seconds(home: Path) -> None:
    # Far from a batch of `summary_every` steps, the rows still reach the ledger once `summary_seconds`
    # have passed: a SIGKILLed rank (the incident's random kills) leaves its per-step verdicts behind.
    code = """
import time, torch, trainguard
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
trainguard.watch(model, optimizer, summary_every=1000, summary_seconds=0.5)
for step in range(1, 5):
    if step == 4:
        time.sleep(0.6)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
time.sleep(300)  # killed here, never closing the guard
"""
    job = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        steps: list[int] = []
        while 4 not in steps:
            assert job.poll() is None, f"the job ended with {job.returncode} before it was killed"
            assert time.monotonic() < deadline, f"no summary of step 4 in the ledger; rows of {steps}"
            time.sleep(0.2)
            try:
                if (home / "ledger.db").exists():
                    steps = _summary_steps(home / "ledger.db")[0]
            except TrainguardError:
                pass  # not made yet, or being made by the job
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    steps, types = _summary_steps(home / "ledger.db")
    assert steps == [1, 2, 3, 4]
    assert "monitor.end" not in types


def _write_weights(model: nn.Module) -> None:
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0


def test_clean_loop_runs_and_leaves_start_summaries_and_end_in_the_ledger(
    model: nn.Module, home: Path
) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with trainguard.watch(model, optimizer, summary_every=10) as guard:
        assert list(_steps(model, optimizer, 25))[-1] == 25
    assert guard.step == 25 and guard.failure is None and guard.notices == ()
    with Ledger.open(home / "ledger.db") as ledger:
        events = [event for _, event in ledger.entries()]
    assert [e.type for e in events] == [
        "monitor.start",
        "monitor.steps",
        "monitor.steps",
        "monitor.steps",
        "monitor.end",
    ]
    assert events[0].payload["checks"] and events[0].payload["world_size"] == 1
    assert sum(len(e.payload["rows"]) for e in events if e.type == "monitor.steps") == 25
    assert {e.run_id for e in events} == {guard.run_id}
    summaries = [e.payload for e in events if e.type == "monitor.steps"]
    column = summaries[0]["columns"].index("data_order_digest")
    digests = [row[column] for summary in summaries for row in summary["rows"]]
    assert len(set(map(tuple, digests))) == 25  # the data-order digest moves with every batch
    changes = summaries[0]["columns"].index("hyperparameter_changes")
    assert all(row[changes] == [] for summary in summaries for row in summary["rows"])


def test_weights_written_between_steps_raise_from_the_next_step(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainguard.watch(model, optimizer, ledger=False)
    steps = _steps(model, optimizer, 10)
    next(steps)
    _write_weights(model)
    with pytest.raises(IntegrityError) as caught:
        next(steps)
    assert (caught.value.check, caught.value.ranks, caught.value.step) == ("outside", (0,), 2)
    assert "rank 0" in str(caught.value)


def test_alert_action_warns_and_keeps_training(model: nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainguard.watch(model, optimizer, ledger=False, actions={"outside": "alert"})
    steps = _steps(model, optimizer, 5)
    next(steps)
    _write_weights(model)
    with caplog.at_level(logging.WARNING, logger="trainguard.monitor"):
        assert list(steps) == [2, 3, 4, 5]
    assert "changed without passing the guard's optimizer hooks" in caplog.text


def test_rollback_action_calls_the_given_function_and_training_goes_on(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[IntegrityError] = []
    trainguard.watch(model, optimizer, ledger=False, actions={"outside": "rollback"}, rollback=calls.append)
    steps = _steps(model, optimizer, 5)
    next(steps)
    _write_weights(model)
    assert list(steps) == [2, 3, 4, 5]
    assert [error.check for error in calls] == ["outside"]


def test_callbacks_get_the_failure_instead_of_an_exception(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = trainguard.watch(model, optimizer, ledger=False, raise_errors=False)
    steps = _steps(model, optimizer, 5)
    next(steps)
    _write_weights(model)
    assert list(steps) == [2, 3, 4, 5]
    failure = guard.check_now()
    assert failure is not None and failure.step == 2
    # The guard went inert at the failure: later steps were not checked.
    assert guard.step == 2


def test_a_patched_update_is_caught_at_its_step(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    sgd = importlib.import_module("torch.optim.sgd")
    original = sgd._single_tensor_sgd
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainguard.watch(model, optimizer, ledger=False, skip=["code"])
    steps = _steps(model, optimizer, 10)
    next(steps)

    def flipped(params, grads, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(params, [-g for g in grads], *args, **kwargs)

    monkeypatch.setattr(sgd, "_single_tensor_sgd", flipped)
    with pytest.raises(IntegrityError) as caught:
        next(steps)
    assert (caught.value.check, caught.value.step) == ("update", 2)
    assert "direction flipped" in str(caught.value)


def test_closing_removes_the_hooks(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = trainguard.watch(model, optimizer, ledger=False)
    list(_steps(model, optimizer, 2))
    guard.close()
    guard.close()
    _write_weights(model)
    assert list(_steps(model, optimizer, 2)) == [1, 2]


def test_an_optimizer_it_cannot_recompute_gets_a_notice(model: nn.Module) -> None:
    guard = trainguard.watch(model, torch.optim.RMSprop(model.parameters()), ledger=False)
    assert any("RMSprop is not covered" in notice for notice in guard.notices)
    guard.close()


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"checks": ["fingerprints"]}, "unknown check 'fingerprints'"),
        ({"actions": {"update": "panic"}}, "unknown action 'panic'"),
        ({"actions": {"update": "rollback"}}, "no rollback function"),
        ({"state_every": 0}, "state_every must be at least 1"),
        ({"summary_seconds": 0}, "summary_seconds must be positive"),
        ({"state_evry": 2}, "unknown setting 'state_evry'"),
    ],
)
def test_bad_settings_are_usage_errors(model: nn.Module, settings: dict[str, object], says: str) -> None:
    with pytest.raises(UsageError, match=says):
        trainguard.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), ledger=False, **settings)  # type: ignore[arg-type]


def test_the_readme_lists_every_watch_setting_and_no_other() -> None:
    import dataclasses
    import re

    from trainguard.monitor import GuardConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("| setting | default | what it does |", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert sorted(listed) == sorted({field.name for field in dataclasses.fields(GuardConfig)} | {"skip"})


def test_watch_is_reachable_from_the_package_without_importing_torch_first() -> None:
    code = (
        "import sys, trainguard\n"
        "assert 'torch' not in sys.modules\n"
        "import trainguard.monitor\n"
        "assert 'torch' not in sys.modules\n"
        "assert callable(trainguard.watch) and trainguard.IntegrityError\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_guard_is_the_public_type() -> None:
    assert trainguard.monitor.Guard is Guard


def test_the_guard_lives_on_without_a_reference_to_it(model: nn.Module) -> None:
    import gc

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainguard.watch(model, optimizer, ledger=False)
    gc.collect()
    steps = _steps(model, optimizer, 3)
    next(steps)
    _write_weights(model)
    with pytest.raises(IntegrityError):
        next(steps)


def test_fully_sharded_parameters_are_checked_by_shard_and_not_compared(tmp_path: Path) -> None:
    # FSDP2 on a real (one-process, gloo) group: every shard is a DTensor.
    code = f"""
import torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
import trainguard
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
guard = trainguard.watch(model, optimizer, ledger=False)
assert any("sharded" in notice for notice in guard.notices), guard.notices
for _ in range(5):
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
guard.close()
assert guard.step == 5 and guard.failure is None
dist.destroy_process_group()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_rollback_restores_the_newest_checkpoint_that_verifies(model: nn.Module, tmp_path: Path) -> None:
    from trainguard.monitor import rollback_to_verified
    from trainguard.provenance import PrivateKey

    key = PrivateKey.generate("ed25519")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rollback = rollback_to_verified(folder, model, optimizer, trusted=[key.public()])
    guard = trainguard.watch(
        model, optimizer, ledger=False, actions={"outside": "rollback"}, rollback=rollback
    )
    steps = _steps(model, optimizer, 6)
    next(steps)
    good = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    trainguard.save(good, folder / "step1.pt", key=key)
    next(steps)
    # A newer checkpoint the attacker planted, unsigned: refused, so the older one is restored.
    torch.save({"model": {k: v * 0 for k, v in model.state_dict().items()}}, folder / "step2.pt")
    _write_weights(model)
    restored: list[torch.Tensor] = []
    original = model.load_state_dict

    def spy(state, *args, **kwargs):  # type: ignore[no-untyped-def]
        restored.append(state["0.weight"].clone())
        return original(state, *args, **kwargs)

    model.load_state_dict = spy  # type: ignore[method-assign]
    assert list(steps) == [3, 4, 5, 6]
    assert len(restored) == 1 and torch.equal(restored[0], good["model"]["0.weight"])
    assert guard.failure is None


def test_a_failure_that_persists_after_rollbacks_stops(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[IntegrityError] = []
    trainguard.watch(
        model,
        optimizer,
        ledger=False,
        actions={"outside": "rollback"},
        rollback=calls.append,
        max_rollbacks=2,
    )
    steps = _steps(model, optimizer, 10)
    next(steps)
    with pytest.raises(IntegrityError, match="after 2 rollbacks the failure persists"):
        for _ in steps:
            _write_weights(model)
    assert len(calls) == 2


@pytest.mark.parametrize("positional", [True, False])
def test_a_step_closure_is_checked_after_it_has_run(model: nn.Module, positional: bool) -> None:
    # step(closure) runs forward and backward inside step(): the sampled re-computation must see this
    # step's gradients, not the last one's, or every honest step would fail.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = trainguard.watch(model, optimizer, ledger=False)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(6):
        loss = optimizer.step(closure) if positional else optimizer.step(closure=closure)
        assert isinstance(loss, torch.Tensor)
    assert guard.check_now() is None and guard.step == 6
    guard.close()


def test_read_one_step_late_the_failure_names_its_step_and_comes_a_step_later(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = trainguard.watch(model, optimizer, ledger=False, defer=True)
    assert guard.config.defer is True
    steps = _steps(model, optimizer, 10)
    next(steps)
    _write_weights(model)
    assert next(steps) == 2  # step 2's evidence is still on its way
    with pytest.raises(IntegrityError) as caught:
        next(steps)
    assert (caught.value.check, caught.value.step) == ("outside", 2)


def test_read_one_step_late_close_draws_the_last_verdict(model: nn.Module) -> None:
    import importlib

    sgd = importlib.import_module("torch.optim.sgd")
    original = sgd._single_tensor_sgd
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = trainguard.watch(model, optimizer, ledger=False, defer=True, skip=["code"])
    steps = _steps(model, optimizer, 3)
    next(steps)
    next(steps)

    def flipped(params, grads, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(params, [-g for g in grads], *args, **kwargs)

    sgd._single_tensor_sgd = flipped
    try:
        assert next(steps) == 3  # the last step: nothing later would draw its verdict
        with pytest.raises(IntegrityError) as caught:
            guard.close()
    finally:
        sgd._single_tensor_sgd = original
    assert (caught.value.check, caught.value.step) == ("update", 3)


def test_on_the_cpu_evidence_is_read_at_once(model: nn.Module) -> None:
    guard = trainguard.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), ledger=False)
    assert guard._defer is False
    guard.close()


@pytest.mark.parametrize("validated", [False, True])
def test_a_wait_between_steps_is_alerted_unless_the_stretch_held_a_validation(
    model: nn.Module, caplog: pytest.LogCaptureFixture, validated: bool
) -> None:
    # Validation reduces its metrics over the ranks: a rank waits there for a slower one (a garbage
    # collection), which is not a data wait. A sleep with no evaluation pass beside it is.
    import time

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = trainguard.watch(model, optimizer, ledger=False, skip=["step_time"])
    with caplog.at_level(logging.WARNING, logger="trainguard.monitor"):
        for step in _steps(model, optimizer, 16):
            if step == 12:
                if validated:
                    with torch.no_grad():
                        model(torch.randn(4, 8))
                time.sleep(0.3)
        guard.close()
    said = "off-CPU between steps" in caplog.text
    assert said is not validated, caplog.text


def _steps_until_caught(model: nn.Module, optimizer: torch.optim.Optimizer, limit: int) -> int:
    taken = 0
    with pytest.raises(IntegrityError) as caught:
        for taken in range(1, limit + 1):  # noqa: B007 - how many ran before the raise
            next(_steps(model, optimizer, 1))
    assert caught.value.check == "code", caught.value
    return taken


@pytest.mark.parametrize(("patched", "within"), [("relu", 1), ("silu", 8)])
def test_code_a_step_runs_is_compared_every_step_and_the_rest_in_turns(
    model: nn.Module, patched: str, within: int
) -> None:
    # The third step is profiled: what it ran (F.relu, through nn.ReLU) is compared at every step,
    # what it did not (F.silu) in `code_turns` turns.
    import torch.nn.functional as F

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = trainguard.watch(model, optimizer, ledger=False, code_turns=8)
    list(_steps(model, optimizer, 4))
    assert guard._code is not None and guard._code._namespaces.focused > 0
    original = getattr(F, patched)
    try:
        setattr(F, patched, lambda *a, **k: original(*a, **k))
        # In one process the verdict is drawn at once: raised at the end of the first step after.
        taken = _steps_until_caught(model, optimizer, within)
    finally:
        setattr(F, patched, original)
    if patched == "relu":
        assert taken == 1
    assert sys.getprofile() is None


def test_a_profiler_already_there_keeps_everything_compared_in_two_turns(model: nn.Module) -> None:
    def users_profiler(frame: object, event: str, arg: object) -> None:
        return None

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = trainguard.watch(model, optimizer, ledger=False, code_turns=8)
    sys.setprofile(users_profiler)
    try:
        list(_steps(model, optimizer, 4))
        assert sys.getprofile() is users_profiler
    finally:
        sys.setprofile(None)
    assert guard._code is not None and guard._code._namespaces.focused == 0
    assert guard._code._namespaces.turns == 2
    guard.close()
