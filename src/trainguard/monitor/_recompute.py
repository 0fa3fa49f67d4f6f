"""Sampled re-computation of the optimizer's update on secretly chosen elements.

Before `optimizer.step()` the check copies a few elements of a few parameters (chosen by a generator
seeded from a secret, so nobody can know which ones) with their gradients and optimizer state; after
it, it recomputes the update of those elements in float64 from the textbook rule and compares. A
patched optimizer that flips the update's direction, rescales it or adds noise fails on the first step
it does so, even when every rank runs the same patch and the replicas stay equal.

The rules are torch's own for SGD (momentum, dampening, Nesterov, weight decay, maximize), Adam and
AdamW (coupled and decoupled weight decay, AMSGrad, maximize), in their single-tensor, foreach and
fused forms, which round differently by a few units in the last place; the tolerance is eight of those
plus 0.1% of the expected update. Any other optimizer, and capturable, differentiable, complex or
sparse cases, are reported once as not covered rather than passed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from trainguard.monitor._tensors import local

__all__ = ["Mismatch", "Samples", "UpdateCheck", "coverage"]

_SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
_UNSUPPORTED_FLAGS = ("capturable", "differentiable")
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
# Units in the last place of the parameter's dtype, and the share of the update, that rounding may cost.
_ULPS = 8.0
_RELATIVE = 1e-3


@dataclasses.dataclass(frozen=True, slots=True)
class Mismatch:
    """One sampled element whose update is not the one its optimizer's rule gives."""

    parameter: str
    index: int
    field: str
    before: float
    expected: float
    actual: float
    # True when the value changed between two steps (read at one step's end, again at the next start).
    between: bool = False

    def describe(self) -> str:
        if self.field == "gradient":
            return (
                f"{self.parameter}[{self.index}] left the backward pass (or the all-reduce) as "
                f"{self.before:+.6e}, the step found {self.actual:+.6e}"
            )
        if self.between:
            what = "weight" if self.field == "update" else self.field
            return (
                f"{what} {self.parameter}[{self.index}] changed between steps, outside the optimizer's "
                f"step: {self.before:+.6e} at the last step's end, {self.actual:+.6e} now"
            )
        change = self.actual - self.before
        expected_change = self.expected - self.before
        direction = ""
        if expected_change and change and (change > 0) != (expected_change > 0):
            direction = " (direction flipped)"
        return (
            f"{self.field} of {self.parameter}[{self.index}] moved by {change:+.3e}, "
            f"expected {expected_change:+.3e}{direction}"
        )


def coverage(optimizer: torch.optim.Optimizer) -> str | None:
    """None when the check covers this optimizer, else why not (for a one-time notice)."""
    kind = _kind(optimizer)
    if kind is None:
        name = type(optimizer).__name__
        return f"{name} is not covered by the update re-computation (SGD, Adam and AdamW are)"
    for group in optimizer.param_groups:
        for flag in _UNSUPPORTED_FLAGS:
            if group.get(flag):
                return (
                    f"{type(optimizer).__name__} with {flag}=True is not covered by the update re-computation"
                )
    return None


@dataclasses.dataclass(slots=True)
class _Sample:
    name: str
    param: torch.Tensor
    group: Mapping[str, Any]
    index: torch.Tensor
    values: dict[str, torch.Tensor]
    step: float | torch.Tensor
    dtype: torch.dtype
    actual: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # The same elements as the last step left them (the fixed samples only), and whether the
    # optimizer's rule is re-computed for this sample.
    previous: dict[str, torch.Tensor] | None = None
    rule: bool = True


class Samples(list[_Sample]):
    """One step's samples, before and after, where they were taken (the device, on a GPU)."""

    def to_host(self) -> Samples:
        """Start copying everything to the host without waiting (a GPU's copies finish in order)."""
        if all(sample.index.device.type == "cpu" for sample in self):
            return self  # each value was taken as a new tensor: nothing is shared with training
        return Samples(
            dataclasses.replace(
                sample,
                index=_host(sample.index),
                values={k: _host(v) for k, v in sample.values.items()},
                actual={k: _host(v) for k, v in sample.actual.items()},
                previous=None
                if sample.previous is None
                else {k: _host(v) for k, v in sample.previous.items()},
            )
            for sample in self
        )

    def judge(self) -> list[Mismatch]:
        """Recompute the sampled updates (on the host) and return the elements that disagree.

        Every sample is judged at once, in a few batched operations; only when something disagrees
        are the samples judged one by one, to name the elements."""
        if _all_unchanged(self) and _all_within_rule(self):
            return _gradient_changes(self)
        return self.judge_each()

    def judge_each(self) -> list[Mismatch]:
        """The same verdict, sample by sample (slower, and what names each element)."""
        mismatches: list[Mismatch] = _gradient_changes(self)
        for sample in self:
            if sample.previous is not None:
                mismatches.extend(_changed_between(sample))
            if sample.rule:
                exact = _in_float64(sample)
                mismatches.extend(_compare(exact, _rule(exact), exact.actual))
        return mismatches


class UpdateCheck:
    """Record a sample before a step with `before()`, then `after()` lists the elements that disagree."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        names: Mapping[int, str],
        *,
        seed: int,
        tensors_per_step: int = 4,
        elements_per_tensor: int = 16,
        fixed_elements: int = 4,
    ) -> None:
        self._optimizer = optimizer
        self._kind = _kind(optimizer)
        self._names = names
        self._generator = torch.Generator().manual_seed(seed)
        self._tensors = tensors_per_step
        self._elements = elements_per_tensor
        self._samples: list[_Sample] = []
        # Fixed secret elements of every tensor, checked at every step, and what the last step left there.
        self._fixed_count = fixed_elements
        self._fixed: dict[int, torch.Tensor] = {}
        self._last: dict[int, dict[str, torch.Tensor]] = {}
        # Tensors their own module rewrites in the forward pass (Embedding max_norm): their weights may
        # change between steps, their optimizer state may not.
        self.rewritten_in_forward: set[int] = set()
        # The fixed elements of each gradient as the backward pass or the all-reduce left them (filled
        # by the gradient path's hooks, taken at each step): the step must find them unchanged.
        self.arrivals: Callable[[], Mapping[int, torch.Tensor]] | None = None
        for group in optimizer.param_groups:
            for param in group["params"]:
                self.index_of(param)

    def index_of(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter's fixed secret elements (flat positions in its local shard)."""
        key = id(param)
        index = self._fixed.get(key)
        if index is None:
            shard = local(param)
            count = min(self._fixed_count, shard.numel())
            index = torch.randint(max(1, shard.numel()), (count,), generator=self._generator).to(shard.device)
            self._fixed[key] = index
        return index

    def forget(self) -> None:
        """Drop what the last step left (after a rollback restored other weights and state)."""
        self._last.clear()

    @property
    def covered(self) -> bool:
        return self._kind is not None and coverage(self._optimizer) is None

    def before(self) -> None:
        """Copy the chosen elements of parameters, gradients and state; call in a step pre-hook."""
        with torch.no_grad():
            self._before()

    def _before(self) -> None:
        arrived = self.arrivals() if self.arrivals is not None else {}
        covered = self.covered
        settings = {id(group): self._settings(group) for group in self._optimizer.param_groups}
        self._samples = [
            self._fixed_sample(settings[id(group)], param, arrived.get(id(param)), covered)
            for group in self._optimizer.param_groups
            for param in group["params"]
        ]
        if not covered:
            return
        candidates = [
            (group, param)
            for group in self._optimizer.param_groups
            for param in group["params"]
            if param.grad is not None and not param.grad.is_sparse and not param.is_complex()
        ]
        if not candidates:
            return
        for group, param in self._choose(candidates):
            shard = local(param)
            count = min(self._elements, shard.numel())
            if not count:
                continue
            index = torch.randint(shard.numel(), (count,), generator=self._generator).to(shard.device)
            state = self._optimizer.state.get(param, {})
            values = {"param": _take(param, index), "grad": _take(_grad(param), index)}
            for key in _STATE_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    values[key] = _take(value, index)
            step = state.get("step", 0.0)
            self._samples.append(
                _Sample(
                    name=self._names.get(id(param), f"parameter #{id(param):x}"),
                    param=param,
                    group=settings[id(group)],
                    index=index,
                    values=values,
                    step=float(step),
                    dtype=param.dtype,
                )
            )

    def _settings(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """A group's hyper-parameters as plain numbers, as they are at this step."""
        return {"_kind": self._kind, **{k: _scalar(group[k]) for k in group if k != "params"}}

    def capture(self) -> Samples:
        """Take the sampled elements as the step left them; call in a step post-hook. Nothing is read
        back from a GPU here: `Samples.to_host().judge()` does that when the copies are done."""
        samples, self._samples = Samples(self._samples), []
        with torch.no_grad():
            self._capture(samples)
        return samples

    def _capture(self, samples: Samples) -> None:
        for sample in samples:
            state = self._optimizer.state.get(sample.param, {})
            sample.actual["param"] = _take(sample.param, sample.index)
            for key in _STATE_KEYS:
                value = state.get(key)
                if isinstance(value, torch.Tensor):
                    sample.actual[key] = _take(value, sample.index)
            if sample.index is self._fixed.get(id(sample.param)):
                self._last[id(sample.param)] = sample.actual

    def _fixed_sample(
        self, settings: dict[str, Any], param: torch.Tensor, arrived: torch.Tensor | None, covered: bool
    ) -> _Sample:
        """The tensor's fixed elements: compared with what the last step left and with the gradient
        that arrived, and re-computed."""
        key = id(param)
        index = self.index_of(param)
        grad = param.grad
        rule = (
            covered
            and grad is not None
            and not grad.is_sparse
            and not param.is_complex()
            and index.numel() > 0
        )
        values = {"param": _take(param, index)}
        if grad is not None and not grad.is_sparse:
            values["grad"] = _take(grad, index)
            if arrived is not None and arrived.shape == index.shape:
                values["arrived"] = arrived
        state = self._optimizer.state.get(param, {})
        for name in _STATE_KEYS:
            value = state.get(name)
            if isinstance(value, torch.Tensor):
                values[name] = _take(value, index)
        previous = self._last.get(key)
        if previous is not None and key in self.rewritten_in_forward:
            previous = {k: v for k, v in previous.items() if k != "param"}
        return _Sample(
            name=self._names.get(key, f"parameter #{key:x}"),
            param=param,
            group=settings,
            index=index,
            values=values,
            step=float(state.get("step", 0.0)),
            dtype=param.dtype,
            previous=previous,
            rule=bool(rule),
        )

    def after(self) -> list[Mismatch]:
        """Recompute the sampled updates now and return those that disagree; call in a step post-hook."""
        return self.capture().to_host().judge()

    def _choose(
        self, candidates: Sequence[tuple[Mapping[str, Any], torch.Tensor]]
    ) -> Iterator[tuple[Any, Any]]:
        # Half the picks by size, so most elements are covered; half uniform, so small tensors are too.
        count = min(self._tensors, len(candidates))
        sizes = torch.tensor([float(local(param).numel()) + 1.0 for _, param in candidates])
        by_size = torch.multinomial(sizes, max(1, count // 2), generator=self._generator).tolist()
        uniform = torch.randint(len(candidates), (count - len(by_size),), generator=self._generator).tolist()
        for position in dict.fromkeys(by_size + uniform):
            yield candidates[position]


def _kind(optimizer: torch.optim.Optimizer) -> str | None:
    # Exact classes only: a subclass may override step() with a rule of its own.
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) is torch.optim.AdamW:
        return "adamw"
    if type(optimizer) is torch.optim.Adam:
        return "adamw" if optimizer.defaults.get("decoupled_weight_decay") else "adam"
    return None


def _grad(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    if grad is None:
        raise AssertionError("a sampled parameter lost its gradient")
    return grad


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # Flat positions of the tensor as laid out logically (torch.take, a copy), called under no_grad;
    # in the tensor's own dtype: made float64 where judged, a batch at a time.
    return torch.take(local(tensor), index)


def _in_float64(sample: _Sample) -> _Sample:
    return dataclasses.replace(
        sample,
        values={k: v.to(torch.float64) for k, v in sample.values.items()},
        actual={k: v.to(torch.float64) for k, v in sample.actual.items()},
    )


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device.type == "cpu" else tensor.to("cpu", non_blocking=True)


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, tuple):
        return tuple(_scalar(item) for item in value)
    return value


def _sgd(sample: _Sample) -> dict[str, torch.Tensor]:
    group = sample.group
    param = sample.values["param"]
    grad = -sample.values["grad"] if group["maximize"] else sample.values["grad"]
    if _nonzero(group["weight_decay"]):
        grad = grad + group["weight_decay"] * param
    expected: dict[str, torch.Tensor] = {}
    momentum = group["momentum"]
    if _nonzero(momentum):
        previous = sample.values.get("momentum_buffer")
        buffer = grad.clone() if previous is None else momentum * previous + (1 - group["dampening"]) * grad
        expected["momentum_buffer"] = buffer
        grad = grad + momentum * buffer if group["nesterov"] else buffer
    expected["param"] = param - group["lr"] * grad
    return expected


def _adam(sample: _Sample) -> dict[str, torch.Tensor]:
    decoupled = sample.group["_kind"] == "adamw"
    group = sample.group
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    param = sample.values["param"]
    grad = -sample.values["grad"] if group["maximize"] else sample.values["grad"]
    zeros = torch.zeros_like(param)
    exp_avg = sample.values.get("exp_avg", zeros)
    exp_avg_sq = sample.values.get("exp_avg_sq", zeros)
    step = sample.step + 1
    if _nonzero(decay):
        if decoupled:
            param = param * (1 - lr * decay)
        else:
            grad = grad + decay * param
    exp_avg = exp_avg + (1 - beta1) * (grad - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    second = exp_avg_sq
    if group["amsgrad"]:
        second = torch.maximum(sample.values.get("max_exp_avg_sq", zeros), exp_avg_sq)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = second.sqrt() / _sqrt(bias2) + eps
    new_param = param - (lr / bias1) * exp_avg / denom
    return {"param": new_param, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _changed_between(sample: _Sample) -> list[Mismatch]:
    """Elements whose value now is not what the last step left: written between two steps."""
    previous = sample.previous or {}
    for field, was in previous.items():
        now = sample.values.get(field)
        if now is None or now.shape != was.shape:
            continue
        same = (now == was) | (torch.isnan(now) & torch.isnan(was))
        if not bool(same.all()):
            position = int((~same).nonzero()[0])
            return [_mismatch(sample, field, position, was, was, now, between=True)]
    return []


def _gradient_changes(samples: Sequence[_Sample]) -> list[Mismatch]:
    """Gradients that changed between their arrival and the step, beyond what clipping does: one
    factor in (0, 1] common to every tensor (clipping by norm, a GradScaler's unscaling), and
    elements clamped to one common bound (clipping by value)."""
    pairs = [(s, s.values["arrived"], s.values["grad"]) for s in samples if "arrived" in s.values]
    if not pairs:
        return []
    arrived = torch.cat([a for _, a, _ in pairs]).to(torch.float64)
    now = torch.cat([g for _, _, g in pairs]).to(torch.float64)
    dtypes = {s.dtype for s, _, _ in pairs}
    ulps: torch.Tensor | float
    if len(dtypes) == 1:  # one tolerance for all: no tensor of it to build
        ulps = _ULPS * torch.finfo(dtypes.pop()).eps
    else:
        ulps = torch.cat(
            [torch.full_like(a, _ULPS * torch.finfo(s.dtype).eps, dtype=torch.float64) for s, a, _ in pairs]
        )
    judged = torch.isfinite(arrived)
    same = (arrived == now) | ~judged
    if bool(same.all()):
        return []
    nonzero = judged & (arrived != 0) & torch.isfinite(now)
    ratios = now[nonzero] / arrived[nonzero]
    factor = float(ratios.max()) if ratios.numel() else 1.0
    if not 0 < factor <= 1 + _ULPS * 1e-6:
        factor = 1.0
    scaled = factor * arrived
    fits = (now - scaled).abs() <= ulps * scaled.abs()
    # Clamped: smaller than the scaled value, the same sign, all at one bound.
    clamped = ~fits & (now.abs() < scaled.abs()) & (torch.sign(now) == torch.sign(arrived)) & (now != 0)
    if bool(clamped.any()):
        bounds = now[clamped].abs()
        if float(bounds.max() - bounds.min()) > float(bounds.max()) * _largest(ulps):
            clamped = torch.zeros_like(clamped)
    bad = judged & ~fits & ~clamped
    if not bool(bad.any()):
        return []
    position = int(bad.nonzero()[0])
    for sample, values, _ in pairs:
        if position < values.numel():
            exact = values.to(torch.float64)
            return [_mismatch(sample, "gradient", position, exact, exact * factor, sample.values["grad"])]
        position -= values.numel()
    return []


def _compare(
    sample: _Sample, expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]
) -> list[Mismatch]:
    mismatches: list[Mismatch] = []
    for field, (before, want, got, bad) in _outside_tolerance(sample, expected, actual).items():
        mismatches.extend(
            _mismatch(sample, field, position, before, want, got)
            for position in bad.nonzero().flatten().tolist()[:3]
        )
    return mismatches


def _outside_tolerance(
    sample: _Sample,
    expected: Mapping[str, torch.Tensor],
    actual: Mapping[str, torch.Tensor],
    *,
    slack: float = 1.0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """By field: the value before, the rule's, the step's, and which elements disagree."""
    ulp = torch.finfo(sample.dtype).eps
    found = {}
    for field, want in expected.items():
        got = actual.get(field)
        if got is None:
            continue
        before = sample.values.get(field, torch.zeros_like(want))
        scale = torch.maximum(torch.maximum(want.abs(), got.abs()), before.abs())
        tolerance = (_ULPS * ulp * scale + _RELATIVE * (want - before).abs()) * slack
        # A NaN or Inf gradient makes the rule's own result non-finite: the nonfinite check reports it.
        bad = ((got - want).abs() > tolerance) & torch.isfinite(want)
        bad |= ~torch.isfinite(got) & torch.isfinite(want)
        found[field] = (before, want, got, bad)
    return found


def _rule(sample: _Sample) -> dict[str, torch.Tensor]:
    return _sgd(sample) if sample.group["_kind"] == "sgd" else _adam(sample)


# The batched judgement may round a hyper-parameter's power differently from the per-sample one, by
# a few units in the last place of a float64: it passes an element only inside a tolerance narrowed
# by far more than that, and anything else goes to the per-sample judgement.
_BATCH_SLACK = 1.0 - 1e-6


def _all_within_rule(samples: Sequence[_Sample]) -> bool:
    """Whether every sample's update follows its rule, judged in one batch per kind of sample."""
    for batch in _batches([sample for sample in samples if sample.rule]):
        found = _outside_tolerance(batch, _rule(batch), batch.actual, slack=_BATCH_SLACK)
        if any(bool(bad.any()) for *_, bad in found.values()):
            return False
    return True


def _all_unchanged(samples: Sequence[_Sample]) -> bool:
    """Whether every fixed element holds what the last step left, compared in one batch per field."""
    pairs: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for sample in samples:
        for field, was in (sample.previous or {}).items():
            now = sample.values.get(field)
            if now is not None and now.shape == was.shape:
                before, after = pairs.setdefault(field, ([], []))
                before.append(was)
                after.append(now)
    for before, after in pairs.values():
        was, now = torch.cat(before), torch.cat(after)
        if not bool(((now == was) | (torch.isnan(now) & torch.isnan(was))).all()):
            return False
    return True


def _batches(samples: Sequence[_Sample]) -> Iterator[_Sample]:
    """The samples that share a rule's branches, the fields present and a dtype, as one sample
    each: a hyper-parameter they share stays a number, one that differs becomes a tensor with
    each element's value."""
    kinds: dict[tuple[Any, ...], list[_Sample]] = {}
    for sample in samples:
        group = sample.group
        branches = tuple(
            bool(group[key]) if key in group else None
            for key in ("maximize", "weight_decay", "amsgrad", "momentum", "nesterov")
        )
        # The gradient as it arrived is judged on its own (`_gradient_changes`), not by the rule: the
        # fixed samples, which have it, and the random ones, which do not, make one batch.
        fields = tuple(key for key in sample.values if key != "arrived")
        key = (group["_kind"], branches, fields, tuple(sample.actual), sample.dtype)
        kinds.setdefault(key, []).append(sample)
    for members in kinds.values():
        first = members[0]
        sizes = [member.index.numel() for member in members]
        # Only what the rule reads: a group may carry anything else (a name, a flag of the user's own).
        keys = ("_kind", *(_SGD_KEYS if first.group["_kind"] == "sgd" else _ADAM_KEYS))
        group = {
            key: _shared(first.group[key], [member.group[key] for member in members], sizes)
            for key in keys
            if key in first.group
        }
        steps = [member.step for member in members]
        yield _Sample(
            name="(batch)",
            param=first.param,
            group=group,
            index=torch.cat([member.index for member in members]),
            values={
                key: torch.cat([member.values[key] for member in members]).to(torch.float64)
                for key in first.values
                if key != "arrived"
            },
            step=_shared(first.step, steps, sizes),
            dtype=first.dtype,
            actual={
                key: torch.cat([member.actual[key] for member in members]).to(torch.float64)
                for key in first.actual
            },
        )


def _shared(first: Any, values: Sequence[Any], sizes: Sequence[int]) -> Any:
    """`first` when every member has the same value, else each element's value as a tensor (a
    tuple, like Adam's betas, element-wise)."""
    if all(value == first for value in values):
        return first
    if isinstance(first, tuple):
        return tuple(_shared(part, [value[i] for value in values], sizes) for i, part in enumerate(first))
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        counts = torch.tensor(sizes)
        return torch.tensor([float(value) for value in values], dtype=torch.float64).repeat_interleave(counts)
    raise AssertionError(f"a hyper-parameter that is not a number differs inside one batch: {first!r}")


def _largest(value: float | torch.Tensor) -> float:
    return float(value.max()) if isinstance(value, torch.Tensor) else float(value)


def _sqrt(value: float | torch.Tensor) -> float | torch.Tensor:
    return value.sqrt() if isinstance(value, torch.Tensor) else math.sqrt(value)


def _nonzero(value: Any) -> bool:
    # A tensor here holds each element's value of a hyper-parameter whose batch shares its branch.
    return isinstance(value, torch.Tensor) or bool(value)


def _mismatch(
    sample: _Sample,
    field: str,
    position: int,
    before: torch.Tensor,
    expected: torch.Tensor,
    actual: torch.Tensor,
    *,
    between: bool = False,
) -> Mismatch:
    return Mismatch(
        parameter=sample.name,
        index=int(sample.index[position]),
        field="update" if field == "param" else field,
        before=float(before[position]),
        expected=float(expected[position]),
        actual=float(actual[position]),
        between=between,
    )
