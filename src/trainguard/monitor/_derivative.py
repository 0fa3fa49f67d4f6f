"""The gradient against the forward pass: a backward pass that lies is found by finite differences.

Every other gradient check starts from what the backward pass produced: the gradient path checks that
it reaches the step unchanged, the update check that the step applied it by the optimizer's rule. A
backward pass that lies from inside (a custom autograd Function in the model's code that flips what
flows through it, a hook on a parameter, a module or an output registered before watch(), a patched
autograd kernel) would be vouched for by all of them. This check asks the forward pass instead.

At secret steps (each one with probability 1/`derivative_every`, the same steps on every rank), the
guard keeps the step's last forward pass as it ran: its inputs, its random-number state, and the
gradient that reached each of the model's outputs from the loss (read by a hook the guard puts on the
output first, before any other). It also reads 256 secret elements of every gradient (drawn afresh
for each probe) as that pass's backward pass begins (when the loss's gradient reaches the output) and
as it left them on this rank (before DDP's all-reduce): their difference c is what this rank's last
backward pass contributed. At the optimizer step, before anything changes, it moves those elements of
up to 16 tensors (a secret draw) by a small step d along the sign of c and runs the forward pass
twice more, at theta+d and theta-d, without gradient, in the parameters' own precision (autocast
off), with the same random numbers and with the buffers restored after each pass. For
F = sum <output gradient, output>, the central difference F(+) - F(-) must equal sum 2*d*c within a
tolerance of sum |2*d*c| (5%, 10% after autocast or TF32) plus the rounding of F, at the step and at an
eighth of it: a flipped gradient misses by 2, one scaled by 0.5 by 1. Each tensor's terms are brought
to the lower quartile's, so that a tensor with a small gradient still counts. On a mismatch, parts of
the direction are probed alone, down to single tensors, which are named.

What it does not see: a loss function outside the model that lies about its own gradient (the
gradient that reaches the outputs is taken as the loss's word; torch's losses are watched by the code
check); code that behaves only when it is not being probed (the probe's passes run without gradient,
which code in the forward pass can test); tampering at steps it does not probe (each step escapes with
probability 1 - 1/`derivative_every`, an attack held for k steps with (1 - 1/every)^k).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from trainguard.monitor._tensors import tensors_in

__all__ = ["DerivativeProbe"]

# The step along each element, relative to its tensor's scale (the RMS of its sampled elements, at
# least _FLOOR). A mismatch is probed again at an eighth of the step, and only one that stays over the
# tolerance at both is a lie: a ReLU network has kinks near any step, and a central difference across
# one is off by up to the step's own share. Measured, clean, in float32 (`tests/monitor`): a tiny GPT
# agrees to 5e-4 at most, an MLP with ReLU to 1e-4, a convolutional network with BatchNorm and ReLU to
# 1.3e-2; with the backward pass under bf16 autocast, the GPT to about 1e-3.
_STEP = 1e-3
_SHRINK = 8.0
_FLOOR = 1e-2
_ELEMENTS = 256
# At most this many tensors are moved at once (a secret draw among them at each probe), their terms
# brought to the lower quartile's: a flip in any one of them then shows as an eighth of the sum.
_TENSORS = 16
_BOOST = 8.0
_TOLERANCE = 0.05
_TOLERANCE_REDUCED = 0.1
# The rounding of F(+) - F(-) allowed, as a share of sum |output gradient * output|: two float32
# epsilons (measured on a tiny GPT: about 4e-9; the two passes round alike).
_ROUNDING = 2.4e-7
# A probe whose rounding allowance is over this share of its terms' sum cannot tell a flip: unjudged.
_JUDGEABLE = 0.25
# On a mismatch, at most this many re-runs (of two passes each) look for the tensors at fault.
_LOCATE = 24
_NAMED = 8
# An autograd graph walked to tell the model's own outputs from the loss's is cut off here.
_GRAPH_NODES = 200_000
_CHUNK = 1 << 22

_Move = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # parameter, elements, this pass's contribution


class _Pass:
    """One training forward pass under probe: what it needs to be run again, and what backward left."""

    def __init__(self, args: Any, kwargs: Any, reduced: bool) -> None:
        self.args = args
        self.kwargs = kwargs
        # The sampled gradient elements when this pass's backward began (a zero_grad() may come
        # between the forward and the backward pass).
        self.before: dict[int, torch.Tensor] | None = None
        # The backward pass ran in reduced precision (autocast, TF32): a looser tolerance.
        self.reduced = reduced
        self.rng = torch.get_rng_state()
        self.device_rng: dict[int, torch.Tensor] = {}
        # Where in the output the guard's hooks are (not the tensors: the graph would stay alive).
        self.outputs: set[int] = set()
        self.grads: dict[int, torch.Tensor] = {}
        self.mixed = False
        # The forward the module had as the pass began, if set on the instance: Lightning points
        # it at training_step for one call only, and a re-run would find another.
        self.forward: object = None


class DerivativeProbe:
    """`arm()` at each step's end; `before_forward`/`after_forward` in the forward hooks; `verdict()`
    at the optimizer step returns why the gradient disagrees with the forward pass, if it does. While
    armed, `index_of(param)` names the elements whose local gradient the gradient path keeps in
    `local()`."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        local: Callable[[], dict[int, torch.Tensor]],
        *,
        schedule_seed: int,
        element_seed: int,
        every: int,
        rewritten: Sequence[torch.Tensor] = (),
    ) -> None:
        self._model = model
        self._params = [p for p in params if p.requires_grad]
        self._names = {id(p): name for name, p in zip(names, params, strict=True)}
        self._local = local
        # The same secret schedule on every rank (a probe's passes may hold collectives); each rank's
        # own secret elements.
        self._schedule = random.Random(schedule_seed ^ 0x5DE417)
        self._generator = torch.Generator().manual_seed(element_seed ^ 0x5DE417)
        self._every = every
        self._index: dict[int, torch.Tensor] = {}
        # Weights their own module rewrites in the forward pass: not moved, and restored after a probe.
        self._rewritten = list(rewritten)
        self._rewritten_ids = {id(p) for p in rewritten}
        self._pass: _Pass | None = None
        self.armed = False
        self.probing = False
        self.probes = 0
        self.unjudged = 0
        self.notice: str | None = _unsupported(model, self._params)

    @property
    def active(self) -> bool:
        return self.notice is None

    def arm(self) -> None:
        """Decide, secretly, whether the next step is probed, and draw the elements it reads."""
        self._pass = None
        self.armed = self.active and self._schedule.random() * self._every < 1.0
        self._index = {}
        if self.armed:
            for param in self._params:
                if id(param) not in self._rewritten_ids and param.numel() > 0:
                    count = min(_ELEMENTS, param.numel())
                    drawn = torch.randint(param.numel(), (count,), generator=self._generator).unique()  # type: ignore[no-untyped-call]
                    self._index[id(param)] = drawn.to(param.device)

    def index_of(self, param: torch.Tensor) -> torch.Tensor | None:
        return self._index.get(id(param))

    # -- the forward pass, as it ran ---------------------------------------------------------------

    def before_forward(self, args: Any, kwargs: Any) -> None:
        if not self.armed or self.probing:
            return
        record = _Pass(args, kwargs, _reduced_precision(self._params))
        record.forward = vars(self._model).get("forward")
        for device in _cuda_devices(self._params):
            record.device_rng[device] = torch.cuda.get_rng_state(device)
        self._pass = record

    def after_forward(self, output: object) -> None:
        record = self._pass
        if not self.armed or self.probing or record is None or record.outputs:
            return
        tensors = list(tensors_in(output))
        for position in _roots(tensors):
            record.outputs.add(position)
            tensors[position].register_hook(self._receiver(record, position))  # type: ignore[no-untyped-call]

    def _receiver(self, record: _Pass, position: int) -> Callable[[torch.Tensor], None]:
        def receive(grad: torch.Tensor) -> None:
            # A gradient for an earlier pass's output, or a second one for this pass's: one backward
            # pass then holds several forward passes' contributions, which one re-run cannot match.
            if record is not self._pass or position in record.grads:
                if self._pass is not None:
                    self._pass.mixed = True
                return
            if record.before is None:
                # The loss's gradient reaches the output before any parameter's gradient is made.
                record.before = self._gradients_now()
            record.grads[position] = grad.detach()

        return receive

    def _gradients_now(self) -> dict[int, torch.Tensor]:
        # What the gradient path keeps from now on is this backward pass's, on top of these.
        self._local().clear()
        now: dict[int, torch.Tensor] = {}
        for param in self._params:
            index = self._index.get(id(param))
            if index is not None:
                grad = param.grad
                now[id(param)] = (
                    torch.zeros(index.shape, dtype=torch.float64, device=index.device)
                    if grad is None
                    else torch.take(grad.detach(), index).to(torch.float64)
                )
        return now

    # -- the probe --------------------------------------------------------------------------------

    def verdict(self) -> str | None:
        """Run the probe if this step is armed and its last forward pass had a backward pass."""
        record, self._pass = self._pass, None
        if not self.armed or record is None or record.mixed or record.before is None:
            return None
        if vars(self._model).get("forward") is not record.forward:
            self.notice = (
                "the model's forward is redirected for each step (as Lightning runs training_step "
                "through it) and cannot be re-run as it ran: the gradient is not checked against the "
                "forward pass"
            )
            return None
        local = self._local()
        moves: list[_Move] = []
        for param in self._params:
            key = id(param)
            index = self._index.get(key)
            if index is None or key not in local or key not in record.before:
                continue
            contribution = local[key].to(torch.float64) - record.before[key]
            if not bool(torch.isfinite(contribution).all()):
                return None  # an overflow (a GradScaler skips this step) is the nonfinite check's
            moves.append((param, index, contribution))
        if not moves:
            return None
        if len(moves) > _TENSORS:
            chosen = torch.randperm(len(moves), generator=self._generator)[:_TENSORS].tolist()
            moves = [moves[i] for i in sorted(chosen)]
        self.probes += 1
        with self._probing():
            try:
                found = self._judge(record, moves)
                if found is None:
                    self.unjudged += 1
                    return None
                fails, difference, expected = found
                if not fails:
                    return None
                culprits = self._locate(record, moves, [_LOCATE])
            except Exception as exc:  # the model's own code, run again: anything may come out
                self.notice = (
                    f"re-running the forward pass raised {type(exc).__name__}: {exc}; the gradient is no "
                    "longer checked against the forward pass"
                )
                return None
        where = f" in {', '.join(culprits[:_NAMED])}" if culprits else ""
        if len(culprits) > _NAMED:
            where += f" and {len(culprits) - _NAMED} more"
        return (
            f"the gradient its backward pass produced disagrees with its forward pass{where}: along a "
            f"secret direction the forward pass changes by {difference:.4g} where the gradient says "
            f"{expected:.4g} (a custom autograd function, a hook on a parameter, module or output, or a "
            "patched kernel that changes the gradient)"
        )

    def _locate(self, record: _Pass, moves: list[_Move], budget: list[int]) -> list[str]:
        """The tensors whose gradient disagrees, found by probing parts of a failing direction."""
        if len(moves) == 1:
            return [self._names.get(id(moves[0][0]), "?")]
        parts = [moves[i :: min(8, len(moves))] for i in range(min(8, len(moves)))]
        named: list[str] = []
        for part in parts:
            if budget[0] <= 0:
                break
            budget[0] -= 1
            # A part holds fewer terms over the same rounding: a longer step (still linear).
            found = self._judge(record, part, _STEP * _BOOST)
            if found is not None and found[0]:
                named.extend(self._locate(record, part, budget))
        return named

    def _judge(
        self, record: _Pass, moves: list[_Move], step: float = _STEP
    ) -> tuple[bool, float, float] | None:
        """(whether the gradient lies along these moves, F(+) - F(-), what the gradient says it is):
        a lie misses at the full step and at an eighth of it."""
        first = self._compare(record, moves, step)
        if first is None:
            return None
        difference, expected, allowed = first
        if abs(difference - expected) <= allowed:
            return False, difference, expected
        second = self._compare(record, moves, step / _SHRINK)
        if second is None:
            return None
        difference, expected, allowed = second
        return abs(difference - expected) > allowed, difference, expected

    def _compare(
        self, record: _Pass, moves: list[_Move], step_size: float
    ) -> tuple[float, float, float] | None:
        """(F(+) - F(-), what the gradient says it is, the difference allowed between them), or None
        when the rounding of F could hide a flip."""
        originals = []
        steps = []
        for param, index, contribution in moves:
            values = torch.take(param.detach(), index)
            exact = values.to(torch.float64)
            scale = max(float(exact.pow(2).mean().sqrt()), _FLOOR)
            steps.append(step_size * scale * torch.sign(contribution))
            originals.append(values)
        # Every tensor's terms are brought to the lower quartile's (a small tensor's step grows by
        # _BOOST at most): a lie in any one tensor must stand out of the sum.
        shares = [float((step * c).abs().sum()) for step, (_, _, c) in zip(steps, moves, strict=True)]
        positive = sorted(share for share in shares if share > 0)
        if not positive:
            return None
        target = positive[len(positive) // 4]
        ups, downs = [], []
        for step, share, values in zip(steps, shares, originals, strict=True):
            if share > 0:
                step = step * min(target / share, _BOOST)
            exact = values.to(torch.float64)
            ups.append((exact + step).to(values.dtype))
            downs.append((exact - step).to(values.dtype))
        try:
            up_value, size = self._objective(record, moves, ups)
            down_value, _ = self._objective(record, moves, downs)
        finally:
            for (param, index, _), values in zip(moves, originals, strict=True):
                param.data.put_(index, values)
        if up_value is None or down_value is None or not math.isfinite(up_value - down_value):
            return None
        expected = 0.0
        terms_size = 0.0
        for (_, _, contribution), up, down in zip(moves, ups, downs, strict=True):
            # What actually moved, after rounding to the parameter's dtype.
            terms = (up.to(torch.float64) - down.to(torch.float64)) * contribution
            expected += float(terms.sum())
            terms_size += float(terms.abs().sum())
        rounding = _ROUNDING * size
        if terms_size == 0.0 or rounding > _JUDGEABLE * terms_size:
            return None
        tolerance = _TOLERANCE_REDUCED if record.reduced else _TOLERANCE
        return up_value - down_value, expected, tolerance * terms_size + rounding

    def _objective(
        self, record: _Pass, moves: list[_Move], placed: list[torch.Tensor]
    ) -> tuple[float | None, float]:
        """sum <output gradient, output> with the given elements in place, and sum |...|."""
        for (param, index, _), values in zip(moves, placed, strict=True):
            param.data.put_(index, values)
        tensors = list(tensors_in(self._rerun(record)))
        value = 0.0
        size = 0.0
        for position, grad in record.grads.items():
            if position >= len(tensors) or tensors[position].shape != grad.shape:
                return None, 0.0
            flat, weights = tensors[position].detach().reshape(-1), grad.reshape(-1)
            for start in range(0, flat.numel(), _CHUNK):
                part, weight = flat[start : start + _CHUNK], weights[start : start + _CHUNK]
                product = part.to(torch.float64) * weight.to(torch.float64)
                value += float(product.sum())
                size += float(product.abs().sum())
        return value, size

    def _rerun(self, record: _Pass) -> object:
        buffers = [(buffer, buffer.detach().clone()) for buffer in self._model.buffers()]
        rewritten = [(param, param.detach().clone()) for param in self._rewritten]
        devices = list(record.device_rng)
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), _autocast_off(self._params):
                torch.set_rng_state(record.rng)
                for device, state in record.device_rng.items():
                    torch.cuda.set_rng_state(state, device)
                return self._model(*record.args, **record.kwargs)
        finally:
            for buffer, saved in buffers:
                buffer.data.copy_(saved)
            for param, saved in rewritten:
                param.data.copy_(saved)

    @contextlib.contextmanager
    def _probing(self) -> Iterator[None]:
        self.probing = True
        try:
            yield
        finally:
            self.probing = False


def _roots(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The outputs whose gradient comes from outside the model: those with a graph, less any that
    another output was computed from (a loss computed in forward, from the logits it also returns)."""
    candidates = [i for i, t in enumerate(tensors) if t.requires_grad and t.grad_fn is not None]
    if len(candidates) < 2:
        return candidates
    seen: set[object] = set()
    stack = [node for i in candidates for node, _ in tensors[i].grad_fn.next_functions if node is not None]  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > _GRAPH_NODES:
            return []
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return [i for i in candidates if tensors[i].grad_fn not in seen]


def _reduced_precision(params: Sequence[torch.Tensor]) -> bool:
    device = params[0].device.type if params else "cpu"
    if torch.is_autocast_enabled(device):
        return True
    return device == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def _cuda_devices(params: Sequence[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _autocast_off(params: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager[Any]:
    device = params[0].device.type if params else "cpu"
    return torch.autocast(device_type=device, enabled=False)


def _unsupported(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> str | None:
    if not params:
        return "the model has no trainable parameters: the gradient is not checked against the forward pass"
    if any(type(p).__name__ == "DTensor" for p in params):
        return "sharded parameters: the gradient is not checked against the forward pass"
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        return (
            "SyncBatchNorm's forward pass holds collectives: the gradient is not checked against the "
            "forward pass"
        )
    if any(p.dtype not in (torch.float32, torch.float64) for p in params):
        return (
            "parameters in half precision round a small step away: the gradient is not checked against "
            "the forward pass"
        )
    return None
