"""The gradient's path from the backward pass to the optimizer step, in one process: clipping by
norm or value, a GradScaler-style unscaling and accumulation pass; noise, a flip, a scale-up or one
element changed after backward is caught; the guard's own hooks removed is named."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from trainguard.monitor._gradpath import GradientPath  # noqa: E402
from trainguard.monitor._recompute import UpdateCheck  # noqa: E402

pytestmark = pytest.mark.torch

Tamper = Callable[[nn.Module], None]


def _steps(tamper: Tamper | None, *, accumulate: int = 1, steps: int = 6) -> list[str]:
    """What the check said at each step; `tamper` runs between backward and step from step 4 on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    check = UpdateCheck(optimizer, dict(zip(map(id, params), names, strict=True)), seed=5, fixed_elements=8)
    path = GradientPath(model, params, names, check.index_of)
    check.arrivals = path.take
    said = []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        for _ in range(accumulate):
            model(torch.randn(4, 8)).pow(2).mean().backward()
        if tamper is not None and step >= 4:
            with torch.no_grad():
                tamper(model)
        check.before()
        optimizer.step()
        found = [m for m in check.after() if m.field == "gradient"]
        said.append(found[0].describe() if found else "")
    path.close()
    return said


def _each_grad(change: Callable[[torch.Tensor], None]) -> Tamper:
    def tamper(model: nn.Module) -> None:
        for param in model.parameters():
            assert param.grad is not None
            change(param.grad)

    return tamper


@pytest.mark.parametrize(
    "clip",
    [
        lambda m: nn.utils.clip_grad_norm_(m.parameters(), 1e-3),
        lambda m: nn.utils.clip_grad_norm_(m.parameters(), 1e-3, foreach=True),
        lambda m: nn.utils.clip_grad_value_(m.parameters(), 1e-3),
        lambda m: (
            nn.utils.clip_grad_value_(m.parameters(), 1e-2),
            nn.utils.clip_grad_norm_(m.parameters(), 1e-3),
        ),
        _each_grad(lambda g: g.mul_(1 / 65536.0)),  # a GradScaler's unscale_
    ],
    ids=["norm", "norm-foreach", "value", "value-then-norm", "unscale"],
)
def test_clipping_and_unscaling_pass(clip: Tamper) -> None:
    assert _steps(clip) == [""] * 6


def test_the_clips_above_bite() -> None:
    # The clipping tests are worth something only if the clip changes the gradient: it does.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))
    model(torch.randn(4, 8)).pow(2).mean().backward()
    largest = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    assert float(nn.utils.clip_grad_norm_(model.parameters(), 1e-3)) > 1e-3
    assert largest > 1e-2


def test_accumulated_micro_batches_pass() -> None:
    assert _steps(None, accumulate=3) == [""] * 6


@pytest.mark.parametrize(
    "tamper",
    [
        _each_grad(lambda g: g.add_(torch.randn_like(g) * g.abs().mean())),
        _each_grad(lambda g: g.neg_()),
        _each_grad(lambda g: g.mul_(2.0)),
        _each_grad(lambda g: g.data.mul_(-0.5)),
    ],
    ids=["noise", "flip", "scale-up", "through-data"],
)
def test_gradient_changed_after_backward_is_caught_at_once(tamper: Tamper) -> None:
    said = _steps(tamper)
    assert said[:3] == ["", "", ""] and all(said[3:]), said
    assert "left the backward pass" in said[3]


def test_one_element_changed_is_caught_when_it_is_a_secret_one() -> None:
    # The attacker does not know the fixed elements; when a change touches one, it shows.
    said = _steps(_each_grad(lambda g: g.view(-1)[:].add_(1e-3)))
    assert all(said[3:]), said


def test_removed_hook_is_named() -> None:
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    check = UpdateCheck(optimizer, {}, seed=1)
    path = GradientPath(model, params, ["weight", "bias"], check.index_of)
    assert path.tampering(0) is None
    for hooks in (params[1]._post_accumulate_grad_hooks or {},):
        hooks.clear()
    assert path.tampering(0) == "the guard's gradient hook on bias was removed"


_DDP_JOB = """
import torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
import trainguard
from trainguard.errors import IntegrityError
from trainguard.monitor import _gradpath
torch.manual_seed(0)
ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)))
optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
{setup}
ATTACK = {attack!r}
def step(tamper):
    optimizer.zero_grad()
    ddp(torch.randn(4, 8)).pow(2).mean().backward()
    if tamper:
        with torch.no_grad():
            for param in ddp.parameters():
                param.grad.add_(torch.randn_like(param.grad))
    optimizer.step()
try:
    for block in range(3):
        guard = trainguard.watch(ddp, optimizer, ledger=False)
        assert not any("gradient" in notice for notice in guard.notices), guard.notices
        if block == 1 and ATTACK:
            exec(ATTACK)
        for index in range(4):
            step(tamper=block == 2 and index == 2)
        guard.close()
        print("block", block, "clean")
except IntegrityError as error:
    print("caught:", error)
dist.destroy_process_group()
"""


def _ddp_job(tmp_path: Path, setup: str = "", attack: str = "") -> str:
    """Three blocks of four steps, each under a new watch(); the gradient is noised at block 2's third
    step; `setup` runs before the first watch(), `attack` right after block 1's."""
    code = _DDP_JOB.format(store=tmp_path / "store", setup=setup, attack=attack)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_model_watched_again_keeps_its_gradient_path_checked(tmp_path: Path) -> None:
    # DDP keeps a communication hook for its lifetime: the next watch() takes over the guard's own
    # hook, records through it, and still catches a gradient changed after the all-reduce.
    said = _ddp_job(tmp_path)
    assert "block 0 clean" in said and "block 1 clean" in said, said
    assert "block 2 clean" not in said and "caught:" in said, said
    assert "from the backward pass to the optimizer" in said, said


def test_the_guards_hook_registered_with_a_forged_state_is_foreign(tmp_path: Path) -> None:
    # The guard's hook function with a state the guard did not make reduces as its owner likes.
    forged = (
        "state = _gradpath._HookState(ddp.process_group, 1)\n"
        "ddp.register_comm_hook(state, _gradpath._reduce_and_record)\n"
    )
    said = _ddp_job(tmp_path, forged)
    assert "block 0 clean" not in said and "caught:" in said, said
    assert "registered on DDP before watch()" in said, said


@pytest.mark.parametrize(
    ("attack", "said"),
    [
        ("_gradpath._REGISTERED[ddp].recorder = None", "no longer records for this guard"),
        ("_gradpath._REGISTERED[ddp].world = -1", "set to divide by -1"),
        ("_gradpath._REGISTERED[ddp].group = dist.new_group([0])", "reduce over another group"),
    ],
    ids=["recorder-dropped", "divide-by-minus-one", "other-group"],
)
def test_the_guards_hook_state_changed_in_place_is_named(tmp_path: Path, attack: str, said: str) -> None:
    # Dividing by -1 flips every rank's gradient inside the guard's own hook, and what it records
    # agrees: only the state itself shows it, at the next step.
    output = _ddp_job(tmp_path, attack=attack)
    assert "block 0 clean" in output and "block 1 clean" not in output, output
    assert "caught:" in output and said in output, output


def test_grad_flipped_before_allreduce_one_rank_through_the_hook_state_and_its_copy(tmp_path: Path) -> None:
    # The drill's grad-flipped-before-allreduce-one-rank: the hook state's divisor negated together
    # with any copy the guard kept of it, so that the two agree. The hook divides by the group's own
    # size, so nothing is flipped, and the state is compared with that size: named at the next step.
    attack = "_gradpath._REGISTERED[ddp].world = -1\nguard._gradpath._world = -1"
    output = _ddp_job(tmp_path, attack=attack)
    assert "block 0 clean" in output and "block 1 clean" not in output, output
    assert "caught:" in output and "set to divide by -1" in output, output
