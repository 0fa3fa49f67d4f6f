"""The sampled re-computation of the optimizer's update: silent on honest steps of every variant of
SGD, Adam and AdamW, loud on a flipped, scaled or noisy update."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from trainguard.monitor._recompute import UpdateCheck, coverage  # noqa: E402

pytestmark = pytest.mark.torch

Factory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Factory] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-momentum-nesterov-decay": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "sgd-dampening-maximize": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, dampening=0.3, maximize=True
    ),
    "sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, foreach=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adam-decay-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, amsgrad=True),
    "adam-maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, maximize=True, weight_decay=0.01),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=3e-3, amsgrad=True, weight_decay=0.05),
    "adamw-tensor-lr": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3)),
}


def _train(
    factory: Factory, attack: Callable[[torch.Tensor, torch.Tensor], None] | None, steps: int = 16
) -> list[int]:
    """Steps (1-based) at which the check found a mismatch; the attack acts from step 9 on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = factory(model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    check = UpdateCheck(optimizer, names, seed=3, tensors_per_step=4, elements_per_tensor=32)
    flagged = []
    for step in range(1, steps + 1):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        check.before()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        if attack is not None and step >= 9:
            with torch.no_grad():
                for param, old in zip(model.parameters(), before, strict=True):
                    attack(param, old)
        if check.after():
            flagged.append(step)
    return flagged


def _flip(param: torch.Tensor, old: torch.Tensor) -> None:
    param.copy_(2 * old - param)


def _scale(param: torch.Tensor, old: torch.Tensor) -> None:
    param.copy_(old + 1.05 * (param - old))


def _noise(param: torch.Tensor, old: torch.Tensor) -> None:
    param.add_(torch.randn_like(param) * 1e-3)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_honest_steps_pass(name: str) -> None:
    assert _train(OPTIMIZERS[name], None) == []


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("attack", [_flip, _scale, _noise], ids=["flip", "scale-5%", "noise"])
def test_tampered_update_is_caught_at_its_first_step(
    name: str, attack: Callable[[torch.Tensor, torch.Tensor], None]
) -> None:
    assert _train(OPTIMIZERS[name], attack) == list(range(9, 17))


def test_flip_is_described_as_a_flip() -> None:
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(64))
    optimizer = torch.optim.SGD([param], lr=0.1)
    check = UpdateCheck(optimizer, {id(param): "w"}, seed=1)
    param.grad = torch.ones(64)
    check.before()
    old = param.detach().clone()
    optimizer.step()
    with torch.no_grad():
        param.copy_(2 * old - param)
    mismatches = check.after()
    assert mismatches and "w[" in mismatches[0].describe()
    assert "direction flipped" in mismatches[0].describe()


def test_other_optimizers_are_reported_not_covered() -> None:
    param = nn.Parameter(torch.randn(4))
    assert "RMSprop is not covered" in (coverage(torch.optim.RMSprop([param])) or "")
    assert "capturable=True" in (coverage(torch.optim.Adam([param], capturable=True)) or "")
    assert coverage(torch.optim.AdamW([param])) is None


def test_a_subclass_is_not_assumed_to_follow_its_parents_rule() -> None:
    class Custom(torch.optim.SGD):
        pass

    param = nn.Parameter(torch.randn(4))
    assert coverage(Custom([param], lr=0.1)) is not None


@pytest.mark.parametrize("kind", ["adamw", "adam-amsgrad", "sgd-nesterov"])
def test_the_batched_verdict_is_the_per_sample_one(kind: str) -> None:
    # Groups with their own hyper-parameters, a tensor whose step count lags (no gradient at some
    # steps), attacks on one tensor's update and on weights and state between steps: whatever the
    # per-sample judgement finds, the batched one finds the same, and it passes what that passes.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.Linear(4, 4))
    first, second, third = model[0], model[2], model[3]
    groups: list[dict[str, object]] = [
        {"params": first.parameters(), "lr": 1e-3, "weight_decay": 0.0},
        {"params": second.parameters(), "lr": 3e-3, "weight_decay": 0.05},
        {"params": third.parameters(), "lr": 2e-3, "weight_decay": 0.01},
    ]
    if kind == "adamw":
        groups[2]["betas"] = (0.8, 0.99)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups)
    elif kind == "adam-amsgrad":
        optimizer = torch.optim.Adam(groups, amsgrad=True)
    else:
        optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
    names = {id(p): n for n, p in model.named_parameters()}
    check = UpdateCheck(optimizer, names, seed=7, tensors_per_step=4, elements_per_tensor=16)
    generator = torch.Generator().manual_seed(1)
    verdicts = []
    for step in range(1, 41):
        optimizer.zero_grad(set_to_none=True)
        out = model[:3](torch.randn(8, 16))
        if step % 3:  # the last layer's parameters step less often
            out = third(out)
        out.pow(2).mean().backward()
        check.before()
        old = first.weight.detach().clone()
        optimizer.step()
        attack = int(torch.randint(6, (1,), generator=generator))
        with torch.no_grad():
            if attack == 1:
                first.weight.copy_(2 * old - first.weight)
            elif attack == 2:
                first.weight.mul_(1.0001)
        samples = check.capture().to_host()
        batched, each = samples.judge(), samples.judge_each()
        assert batched == each, (step, batched, each)
        verdicts.append(bool(each))
        with torch.no_grad():
            if attack == 3:
                second.bias.add_(1e-3)
            elif attack == 4:
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor) and value.dim() > 0:
                            value.mul_(1.5)
    # Both outcomes occurred: the comparison above was made on honest steps and on caught ones.
    assert any(verdicts) and not all(verdicts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_parameters_in_other_dtypes_are_judged_in_their_own_precision(dtype: torch.dtype) -> None:
    # Elements are taken in the tensor's own dtype and made float64 where judged: honest steps pass
    # in bf16 and float64, a flipped update does not. (Pure float16 Adam overflows to Inf at its
    # first step, as torch runs it; that is reported as an update that is not the rule's.)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    check = UpdateCheck(optimizer, names, seed=3, tensors_per_step=4, elements_per_tensor=32)
    flagged = []
    for step in range(1, 13):
        optimizer.zero_grad()
        model(torch.randn(8, 16, dtype=dtype)).pow(2).mean().backward()
        check.before()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        if step >= 9:
            with torch.no_grad():
                for param, old in zip(model.parameters(), before, strict=True):
                    param.copy_(2 * old - param)
        samples = check.capture().to_host()
        found = samples.judge()
        assert found == samples.judge_each()
        if found:
            flagged.append(step)
    assert flagged == [9, 10, 11, 12]
