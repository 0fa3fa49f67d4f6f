"""The hooks digest that replicas compare at the start: the same code with another factor on one
replica is another hook; what legitimately differs between replicas (the rank, a counter) is not."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from trainguard.monitor._identity import hook_digest

pytestmark = pytest.mark.torch

Hook = Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]


def _digest_with(hook: Hook) -> int:
    model = torch.nn.Linear(2, 2)
    model.register_forward_hook(hook)
    return hook_digest(model.modules(), model.parameters())


def _scaling_by(factor: float) -> Hook:
    def scale(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * factor

    return scale


def _logging_on(rank: int, calls: list[int]) -> Hook:
    def log(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        calls[0] += rank
        return output

    return log


def _scale_given(module: torch.nn.Module, inputs: Any, output: torch.Tensor, factor: float) -> torch.Tensor:
    return output * factor


def test_a_hook_closing_over_another_factor_is_another_hook() -> None:
    assert _digest_with(_scaling_by(1.0)) == _digest_with(_scaling_by(1.0))
    assert _digest_with(_scaling_by(1.5)) != _digest_with(_scaling_by(1.0))


def test_a_hook_given_another_factor_by_partial_or_default_is_another_hook() -> None:
    by_partial = [functools.partial(_scale_given, factor=f) for f in (1.0, 1.5)]
    assert _digest_with(by_partial[0]) != _digest_with(by_partial[1])

    def with_default(factor: float) -> Hook:
        def scale(
            module: torch.nn.Module, inputs: Any, output: torch.Tensor, f: float = factor
        ) -> torch.Tensor:
            return output * f

        return scale

    assert _digest_with(with_default(1.0)) != _digest_with(with_default(1.5))


def test_a_hook_capturing_its_rank_or_a_counter_is_the_same_hook_on_every_replica() -> None:
    assert _digest_with(_logging_on(0, [0])) == _digest_with(_logging_on(3, [7]))
