"""The gradient against the forward pass, in a single process: a backward pass that lies from inside
is caught and the tensors it lies about are named; a probe leaves training exactly as it found it;
clean shapes of training (dropout, BatchNorm, autocast, accumulation, a loss computed in forward)
raise nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import trainguard  # noqa: E402
from tests.monitor.jobkit import Flip  # noqa: E402
from trainguard.errors import IntegrityError  # noqa: E402
from trainguard.monitor import Guard  # noqa: E402
from trainguard.monitor._derivative import DerivativeProbe  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRAINGUARD_LEDGER", raising=False)


class Net(nn.Module):
    """An embedding, dropout, BatchNorm and a LayerNorm: random numbers and buffers in forward."""

    def __init__(self, *, loss_inside: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.dropout = nn.Dropout(0.2)
        self.batch_norm = nn.BatchNorm1d(16)
        self.body = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 8)
        self.loss_inside = loss_inside
        self.penalty = 0.0
        self.flip = False

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        hidden = self.batch_norm(self.dropout(self.embed(tokens).mean(dim=1)))
        hidden = self.norm(torch.tanh(self.body(hidden)))
        if self.flip:
            hidden = Flip.apply(hidden)
        logits = self.head(hidden)
        if not self.loss_inside:
            return logits
        # As a Hugging Face model does: the loss computed in forward, returned beside the logits.
        loss = F.cross_entropy(logits, labels)
        if self.penalty:
            loss = loss + self.penalty * sum(p.pow(2).sum() for p in self.parameters())
        return {"loss": loss, "logits": logits}


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, **settings: Any) -> Guard:
    # Timing is not what these tests are about, and a busy test machine makes its own stalls.
    skip = ["step_time", "data_wait", *settings.pop("skip", [])]
    return trainguard.watch(model, optimizer, ledger=False, derivative_every=1, skip=skip, **settings)


def batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 32, (8, 5), generator=generator), torch.randint(0, 8, (8,), generator=generator))
        for _ in range(count)
    ]


def train(
    model: Net,
    optimizer: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    after_forward: Callable[[torch.Tensor], None] | None = None,
    micro: int = 1,
    autocast: bool = False,
    zero_late: bool = False,
) -> None:
    for tokens, labels in data:
        if not zero_late:
            optimizer.zero_grad()
        for part_tokens, part_labels in zip(tokens.chunk(micro), labels.chunk(micro), strict=True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                output = model(part_tokens, part_labels)
            if model.loss_inside:
                loss = output["loss"]
            else:
                if after_forward is not None:
                    after_forward(output)
                loss = F.cross_entropy(output.float(), part_labels)
            if zero_late:
                optimizer.zero_grad()  # between the forward and the backward pass, as many loops do
            (loss / micro).backward()
        optimizer.step()


def fresh(**kwargs: Any) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net(**kwargs)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def caught(run: Callable[[], None]) -> IntegrityError:
    with pytest.raises(IntegrityError) as raised:
        run()
    assert raised.value.check == "derivative", raised.value
    return raised.value


def test_probing_every_step_leaves_training_exactly_as_an_unwatched_run() -> None:
    # The probe moves weights, re-runs dropout and BatchNorm: all of it must be put back exactly, the
    # random-number stream included, or the guard would change what it guards.
    data = batches(12)
    plain, plain_optimizer = fresh()
    torch.manual_seed(5)
    train(plain, plain_optimizer, data)
    watched, watched_optimizer = fresh()
    guard = watch(watched, watched_optimizer)
    torch.manual_seed(5)
    train(watched, watched_optimizer, data)
    guard.close()
    assert guard._derivative.probes == 12 and guard._derivative.unjudged == 0
    for (name, expected), actual in zip(
        plain.state_dict().items(), watched.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ("plain", {}),
        ("bf16 autocast", {"autocast": True}),
        ("two micro-batches", {"micro": 2}),
        ("zero_grad after the forward pass", {"zero_late": True}),
    ],
)
def test_clean_training_raises_nothing(shape: str, kwargs: dict[str, Any]) -> None:
    model, optimizer = fresh()
    guard = watch(model, optimizer)
    train(model, optimizer, batches(40), **kwargs)
    guard.close()
    assert guard.failure is None, shape
    assert guard._derivative.probes == 40 and guard._derivative.unjudged == 0, shape


def test_loss_computed_in_forward_is_the_output_that_counts() -> None:
    # The logits are returned too, but their gradient comes from the loss inside forward: only the
    # loss is an output whose gradient comes from outside the model.
    model, optimizer = fresh(loss_inside=True)
    guard = watch(model, optimizer)
    train(model, optimizer, batches(20))
    guard.close()
    assert guard.failure is None and guard._derivative.probes == 20
    model, optimizer = fresh(loss_inside=True)
    model.flip = True
    watch(model, optimizer)
    error = caught(lambda: train(model, optimizer, batches(3)))
    assert "norm.weight" in str(error)


def test_weight_penalty_returned_from_forward_is_counted() -> None:
    # A penalty that reaches the weights other than through the outputs would disagree with the
    # forward pass as a lie does; computed in forward and returned, it is part of what is re-run.
    model, optimizer = fresh(loss_inside=True)
    model.penalty = 1e-2
    guard = watch(model, optimizer)
    train(model, optimizer, batches(20))
    guard.close()
    assert guard.failure is None and guard._derivative.probes == 20


def test_two_forward_passes_under_one_backward_are_not_judged() -> None:
    # One backward pass then holds both passes' contributions: one re-run cannot match it, and the
    # probe says nothing rather than accuse.
    model, optimizer = fresh()
    guard = watch(model, optimizer)
    for tokens, labels in batches(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens), labels) + F.cross_entropy(model(tokens.flip(0)), labels)
        loss.backward()
        optimizer.step()
    guard.close()
    assert guard.failure is None


def test_autograd_function_in_the_model_flipping_the_gradient() -> None:
    model, optimizer = fresh()
    model.flip = True
    watch(model, optimizer)
    error = caught(lambda: train(model, optimizer, batches(3)))
    assert error.step == 1
    message = str(error)
    assert "norm.weight" in message and "body.weight" in message and "head.weight" not in message


def test_hook_on_one_small_tensor_flipping_its_gradient_is_named() -> None:
    # A LayerNorm bias: a small share of the whole direction, found and named on its own.
    model, optimizer = fresh()
    model.norm.bias.register_hook(lambda grad: -grad)
    watch(model, optimizer)
    error = caught(lambda: train(model, optimizer, batches(3)))
    assert "in norm.bias:" in str(error)


def test_module_backward_hook_scaling_the_gradient() -> None:
    model, optimizer = fresh()
    model.head.register_full_backward_hook(lambda module, grad_in, grad_out: (grad_in[0] * 3.0,))
    watch(model, optimizer)
    error = caught(lambda: train(model, optimizer, batches(3)))
    assert "norm.weight" in str(error)


def test_hook_on_the_output_flipping_the_loss_gradient() -> None:
    model, optimizer = fresh()
    watch(model, optimizer)

    def flip(output: torch.Tensor) -> None:
        output.register_hook(lambda grad: -grad)

    caught(lambda: train(model, optimizer, batches(3), after_forward=flip))


def test_gradient_noise_inside_backward_is_caught() -> None:
    # Noise the size of the gradient, added by a parameter hook: the forward pass disagrees.
    model, optimizer = fresh()
    noise = torch.Generator().manual_seed(3)
    model.body.weight.register_hook(lambda grad: grad + torch.randn(grad.shape, generator=noise) * grad.std())
    watch(model, optimizer)
    assert "body.weight" in str(caught(lambda: train(model, optimizer, batches(3))))


def test_the_check_can_be_skipped_and_half_precision_is_a_notice() -> None:
    model, optimizer = fresh()
    model.flip = True
    guard = watch(model, optimizer, skip=["derivative", "code"])
    train(model, optimizer, batches(3))
    guard.close()
    assert guard.failure is None
    torch.manual_seed(0)
    half = nn.Linear(4, 4).to(torch.bfloat16)
    guard = watch(half, torch.optim.SGD(half.parameters(), lr=0.1))
    assert any("half precision" in notice for notice in guard.notices)
    guard.close()


def test_schedule_is_secret_the_same_on_every_rank_and_one_step_in_every() -> None:
    def schedule(seed: int, element_seed: int) -> list[bool]:
        model = nn.Linear(4, 4)
        probe = DerivativeProbe(
            model, list(model.parameters()), ["weight", "bias"], dict, schedule_seed=seed,
            element_seed=element_seed, every=8,
        )  # fmt: skip
        armed = []
        for _ in range(4000):
            probe.arm()
            armed.append(probe.armed)
        return armed

    rank0, rank1, other_run = schedule(11, 1), schedule(11, 2), schedule(12, 1)
    assert rank0 == rank1 and rank0 != other_run
    # 4000 steps at 1 in 8: 500 expected, standard deviation about 21; six of them is 1 in 10^9.
    assert abs(sum(rank0) - 500) < 6 * math.sqrt(4000 * (1 / 8) * (7 / 8))


def test_probe_flag_forced_on_from_outside_is_caught() -> None:
    # The flag quiets the guard's forward hooks while its own passes run; forced on, it would quiet
    # them for good.
    model, optimizer = fresh()
    guard = watch(model, optimizer)
    guard._derivative.probing = True
    assert "probe flag was set from outside" in str(caught(lambda: train(model, optimizer, batches(2))))


def test_probe_turned_off_from_outside_is_said() -> None:
    # Code in the process can turn the probe off; it cannot do so silently.
    model, optimizer = fresh()
    guard = watch(model, optimizer)
    guard._derivative.notice = "switched off"
    model.flip = True
    train(model, optimizer, batches(3))
    guard.close()
    assert guard.notices == ("switched off",) and guard._derivative.probes == 0
