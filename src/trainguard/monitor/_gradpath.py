"""The gradient's path from the backward pass to the optimizer: what arrived is what the step uses.

The update re-computation starts from the gradient as the optimizer finds it, so a gradient changed
between the backward pass and the step (noise added on every rank, a flip after the all-reduce) would
be vouched for. This records the secret fixed elements of every gradient where the gradient is
final: in a data-parallel job, in a communication hook the guard registers on DDP (it reduces the
gradient exactly as DDP's default does, and no other hook can be registered after it); in a single
process, in each parameter's post-accumulate-grad hook. At the optimizer step the same elements must
hold the same values, up to one common factor in (0, 1] (gradient clipping by norm, a GradScaler's
unscaling) and a common clamp (clipping by value).

A hook already registered on DDP before watch() reduces the gradient in a way the guard cannot see:
a torch hook (fp16 compression, PowerSGD) is a notice, any other a failure at the first step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from trainguard.monitor._live import live_instances
from trainguard.monitor._offcpu import own_time_ns

__all__ = ["GradientPath"]

_TORCH_HOOKS = "torch.distributed.algorithms.ddp_comm_hooks"


class _HookState:
    """What the guard's communication hook needs. DDP keeps a hook for its lifetime, so a later
    watch() of the same model (after close(), or a new block of steps) takes over this state
    rather than registering a second hook, which DDP refuses."""

    def __init__(self, group: Any, world: int) -> None:
        self.group = group
        self.world = world
        self.recorder: GradientPath | None = None


# The hook states this module registered, by DDP: only these are the guard's own.
_REGISTERED: weakref.WeakKeyDictionary[torch.nn.Module, _HookState] = weakref.WeakKeyDictionary()


class GradientPath:
    """Records each sampled gradient as backward (or the all-reduce) left it; `take()` hands the
    step's arrivals to the update check, which compares them with the gradient at the step."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        index_of: Callable[[torch.Tensor], torch.Tensor | None],
    ) -> None:
        self._index_of = index_of
        self._names = {id(param): name for name, param in zip(names, params, strict=True)}
        self._arrived: dict[int, torch.Tensor] = {}
        self._handles: dict[int, Any] = {}
        self._params = list(params)
        self._ddp = _wrapper(model)
        self._recording = True
        self._hooks_seen = 0
        self._state: _HookState | None = None
        self.reductions = 0
        # While set, the elements it names of each gradient as this rank's backward pass left them
        # (before the all-reduce), for the derivative check: `local`, by parameter id.
        self.keep_local: Callable[[torch.Tensor], torch.Tensor | None] | None = None
        self.local: dict[int, torch.Tensor] = {}
        # When this rank's backward pass handed its last bucket to the all-reduce (own_time_ns()):
        # the end of its own compute, before any wait for the other ranks.
        self.last_bucket: tuple[int, int, int] | None = None
        self.problem: str | None = None
        self.notice: str | None = None
        if self._ddp is not None:
            self._install_comm_hook(self._ddp)
        elif _distributed():
            # The gradient is reduced somewhere the guard was not shown (a hand-written all-reduce):
            # what backward leaves is not what the step should find.
            self.notice = (
                "no DistributedDataParallel wraps the model: the gradient's path from the backward pass "
                "to the optimizer is not checked"
            )
        elif not _sharded(params):
            for param in self._params:
                if param.requires_grad:
                    handle = param.register_post_accumulate_grad_hook(self._accumulated)  # type: ignore[no-untyped-call]
                    self._handles[id(param)] = handle
        else:
            self.notice = "the gradient's path to the optimizer is not checked for sharded parameters"

    @property
    def active(self) -> bool:
        return self.problem is None and self.notice is None

    def close(self) -> None:
        """Stop recording; a communication hook stays registered (DDP cannot remove one) and only
        reduces from now on."""
        self._recording = False
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._arrived.clear()

    def take(self) -> Mapping[int, torch.Tensor]:
        """This step's arrivals by parameter id, and forget them (a parameter not in this step's
        backward pass has none, and its gradient is not judged)."""
        arrived, self._arrived = self._arrived, {}
        return arrived

    def tampering(self, reductions_before: int) -> str | None:
        """Why the guard's own recording can no longer be trusted, if it cannot: a hook removed or
        added, or a step whose gradient did not pass the guard's communication hook."""
        if not self.active:
            return None
        if self._ddp is not None:
            hooks = getattr(self._ddp, "_comm_hooks", [])
            if len(hooks) != self._hooks_seen:
                hook = hooks[-1][0] if hooks else None
                return f"a communication hook ({_describe(hook)}) was registered on DDP after watch()"
            if (changed := self._state_changed(hooks)) is not None:
                return changed
            if self.reductions == reductions_before and _has_gradients(self._params):
                return "the gradient reached the optimizer step without passing the guard's all-reduce hook"
            return None
        for param in self._params:
            handle = self._handles.get(id(param))
            hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
            if handle is not None and handle.id not in hooks:
                return f"the guard's gradient hook on {self._names.get(id(param), '?')} was removed"
        return None

    # -- recording --------------------------------------------------------------------------------

    def _accumulated(self, param: torch.Tensor) -> None:
        if not self._recording or param.grad is None:
            return
        index = self._index_of(param)
        if index is not None:
            self._arrived[id(param)] = _take(param.grad, index)
        if self.keep_local is not None and (elements := self.keep_local(param)) is not None:
            self.local[id(param)] = _take(param.grad, elements)

    def _install_comm_hook(self, ddp: torch.nn.parallel.DistributedDataParallel) -> None:
        existing = list(getattr(ddp, "_comm_hooks", []))
        own = _REGISTERED.get(ddp)
        if own is not None and len(existing) == 1 and existing[0] == (_reduce_and_record, own):
            self._take_over(own)
            return
        builtin = _builtin_hook(ddp)
        if existing or builtin:
            hooks = [hook for hook, _ in existing]
            if own is not None:
                # The guard's own hook is there beside another, or with a state it did not make.
                hooks = [hook for hook, state in existing if (hook, state) != (_reduce_and_record, own)]
            if hooks and all(_is_torch_hook(hook) for hook in hooks):
                self.notice = (
                    f"DDP reduces the gradient through torch's {_describe(hooks[0])}: the gradient's "
                    "path from the all-reduce to the optimizer is not checked"
                )
            elif builtin and not hooks:
                self.notice = (
                    f"DDP reduces the gradient through the built-in {builtin} hook: the gradient's path "
                    "from the all-reduce to the optimizer is not checked"
                )
            else:
                foreign = next(hook for hook in hooks if not _is_torch_hook(hook))
                self.problem = (
                    f"a communication hook ({_describe(foreign)}) was registered on DDP before watch(): "
                    "it decides what every rank's gradient becomes, unseen"
                )
            return
        state = _HookState(ddp.process_group, dist.get_world_size(ddp.process_group))
        ddp.register_comm_hook(state, _reduce_and_record)
        _REGISTERED[ddp] = state
        self._take_over(state)

    def _state_changed(self, hooks: Sequence[Any]) -> str | None:
        """The guard's hook state altered in place: it reduces (divides by the world size, over its
        group) and records for this guard only while it is as the guard set it."""
        state, ddp = self._state, self._ddp
        if state is None or ddp is None:
            return None
        if not hooks or tuple(hooks[-1]) != (_reduce_and_record, state):
            return "the guard's communication hook on DDP was replaced"
        if state.recorder is not self:
            return "the guard's communication hook no longer records for this guard"
        # Against the group's own size, not a copy the guard keeps: code in the process that sets both
        # would otherwise flip this rank's share of the mean unseen (the hook divides by the group's size).
        if state.group is not ddp.process_group or state.world != dist.get_world_size(state.group):
            return (
                f"the guard's communication hook was set to divide by {state.world} or to reduce over "
                "another group"
            )
        return None

    def _take_over(self, state: _HookState) -> None:
        previous = state.recorder
        if previous is not None and previous is not self and previous._recording:
            # Two guards on one model: the newer one records; the older one says it no longer does.
            previous.close()
            previous.notice = "a later watch() of the same model took over the gradient's path"
        state.recorder = self
        self._state = state
        assert self._ddp is not None
        self._hooks_seen = len(getattr(self._ddp, "_comm_hooks", []))

    def _record_local(self, bucket: Any) -> None:
        assert self.keep_local is not None
        for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
            if (index := self.keep_local(param)) is not None:
                self.local[id(param)] = _take(grad, index)

    def _record_when_done(
        self, bucket: Any, future: torch.futures.Future[list[torch.Tensor]]
    ) -> torch.futures.Future[torch.Tensor]:
        pairs = [
            (id(param), grad, index)
            for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True)
            if (index := self._index_of(param)) is not None
        ]

        def record(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            # The gradients are views of the reduced buffer: read them as DDP will hand them over.
            for key, grad, index in pairs:
                self._arrived[key] = _take(grad, index)
            self.reductions += 1
            return done.value()[0]

        recorded: torch.futures.Future[torch.Tensor] = future.then(record)
        return recorded


def _reduce_and_record(state: _HookState, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP's default reduction (the mean over ranks), then, while a guard records, the sampled
    elements of each gradient as DDP will hand them to the optimizer."""
    buffer = bucket.buffer()
    recorder = state.recorder
    if recorder is not None and recorder._recording and recorder.keep_local is not None:
        recorder._record_local(bucket)
    # The group's own size: `state.world` is only a record, so setting it to -N flips nothing.
    buffer.div_(dist.get_world_size(state.group))
    if recorder is not None and bucket.is_last():
        recorder.last_bucket = own_time_ns()
    work = dist.all_reduce(buffer, group=state.group, async_op=True)
    assert work is not None  # async_op=True always returns one
    future = work.get_future()
    if recorder is None or not recorder._recording:
        reduced: torch.futures.Future[torch.Tensor] = future.then(_first)
        return reduced
    return recorder._record_when_done(bucket, future)


# DDP checks a hook's annotations against the real classes; postponed annotations are strings.
_reduce_and_record.__annotations__ = {}


def _first(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
    return done.value()[0]


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # A copy, in the gradient's own dtype: the update check makes it float64 with the others.
    return torch.take(tensor.detach(), index)


def _wrapper(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    """The DDP that reduces this model's gradient: the model itself, or one that wraps it (the
    Trainer and Lightning hand the callbacks the inner module)."""
    parallel = torch.nn.parallel.DistributedDataParallel
    if isinstance(model, parallel):
        return model
    if not _distributed():
        return None
    wrappers = [ddp for ddp in live_instances(parallel) if ddp.module is model]
    return wrappers[0] if len(wrappers) == 1 else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _has_gradients(params: Sequence[torch.Tensor]) -> bool:
    return any(param.grad is not None for param in params)


def _builtin_hook(ddp: torch.nn.parallel.DistributedDataParallel) -> str | None:
    try:
        name = ddp._get_ddp_logging_data().get("comm_hook")  # type: ignore[no-untyped-call]
    except (AttributeError, RuntimeError):
        return None
    return str(name) if name else None


def _is_torch_hook(hook: object) -> bool:
    return str(getattr(hook, "__module__", "")).startswith(_TORCH_HOOKS)


def _describe(hook: object) -> str:
    if hook is None:
        return "unknown"
    module = getattr(hook, "__module__", "?")
    name = getattr(hook, "__qualname__", type(hook).__name__)
    return f"{module}.{name}"


def _sharded(params: Sequence[torch.Tensor]) -> bool:
    return any(type(param).__name__ == "DTensor" for param in params)
