"""The guard's settings: which checks run, what each failure does, and the few numbers that tune them."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from trainguard.errors import UsageError
from trainguard.monitor._checks import DEFAULT_ACTIONS, Action, Check

if TYPE_CHECKING:
    from trainguard.errors import IntegrityError

__all__ = ["GuardConfig"]


@dataclasses.dataclass(frozen=True, slots=True)
class GuardConfig:
    """Every check is on by default, at every world size: an attack that waits for a large job meets
    the same checks as a small one."""

    checks: frozenset[Check] = frozenset(Check)
    actions: Mapping[Check, Action] = dataclasses.field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    # Ranks holding the same shard (hybrid sharding); None means every rank is a replica (DDP).
    replica_groups: Sequence[Sequence[int]] | None = None
    # Tensors are fingerprinted in turns: all parameters every `params_every` steps (1: each step) and
    # all optimizer state every `state_every`.
    params_every: int = 1
    state_every: int = 4
    # Sampled per step for the update re-computation: a flip shows in any element it touches.
    sample_tensors: int = 2
    sample_elements: int = 32
    # Fixed secret elements of every tensor, checked at every step: compared with what the last step
    # left (a write between steps, tampered optimizer state) and re-computed by the optimizer's rule.
    fixed_elements: int = 4
    # Each step is probed with this chance in 1 (the same secret steps on every rank): its gradient is
    # checked against finite differences of its forward pass, at the cost of two forward passes.
    derivative_every: int = 32
    # Callables a step runs (seen by profiling the third step) are compared at every step; the rest
    # of the watched namespaces in this many turns, one slice per step (two turns until then).
    code_turns: int = 8
    # Learning-rate schedulers and DistributedSamplers of the job; by default those alive at watch().
    schedulers: Sequence[object] = ()
    samplers: Sequence[object] = ()
    # Off-CPU time above a rank's own median that counts as a stall, in milliseconds.
    stall_floor_ms: float = 50.0
    # A loss or gradient norm this many times its recent median is a spike.
    spike_ratio: float = 10.0
    # Per-step summaries go to the ledger in batches of this many steps, or of this many seconds,
    # whichever comes first: a rank killed mid-run loses at most the last batch's verdicts.
    summary_every: int = 100
    summary_seconds: float = 10.0
    collective_timeout: datetime.timedelta = datetime.timedelta(minutes=5)
    ledger: bool = True
    # Read the device-side evidence (fingerprints, samples, norms) one step late, so that no step
    # waits for the device: None decides by the parameters' device (on for CUDA).
    defer: bool | None = None
    # False for framework callbacks: a failure is kept in `guard.failure` and the callback stops the
    # framework's loop, instead of an exception from inside optimizer.step().
    raise_errors: bool = True
    run_config: Mapping[str, object] | None = None
    rollback: Callable[[IntegrityError], None] | None = None
    # After this many rollbacks a failure stops the job: an attack that persists would loop forever.
    max_rollbacks: int = 3
    # This process trains on its own although a launcher set WORLD_SIZE above 1 (a sweep under torchrun,
    # a child of a rank): without it, such a process with no process group is refused.
    single_process: bool = False

    def __post_init__(self) -> None:
        for name in (
            "params_every",
            "state_every",
            "sample_tensors",
            "sample_elements",
            "fixed_elements",
            "code_turns",
            "derivative_every",
            "summary_every",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"watch(): {name} must be at least 1, not {getattr(self, name)}")
        if not self.summary_seconds > 0:
            raise UsageError(f"watch(): summary_seconds must be positive, not {self.summary_seconds}")
        if self.stall_floor_ms <= 0 or self.spike_ratio <= 1:
            raise UsageError("watch(): stall_floor_ms must be positive and spike_ratio above 1")
        uses_rollback = any(self.actions.get(check) is Action.ROLLBACK for check in self.checks)
        if uses_rollback and self.rollback is None:
            raise UsageError(
                "watch(): an action is 'rollback' but no rollback function was given",
                hint="pass rollback=fn, where fn(error) restores the last verified checkpoint on every rank",
            )

    @classmethod
    def build(
        cls,
        *,
        checks: Iterable[str] | None = None,
        skip: Iterable[str] = (),
        actions: Mapping[str, str] | None = None,
        **settings: object,
    ) -> GuardConfig:
        """A config from plain names, as `watch()` takes them: checks=["fingerprint", ...], skip=[...],
        actions={"step_time": "alert"}."""
        chosen = frozenset(Check) if checks is None else frozenset(_check(name) for name in checks)
        chosen -= {_check(name) for name in skip}
        merged = dict(DEFAULT_ACTIONS)
        for name, action in (actions or {}).items():
            merged[_check(name)] = _action(name, action)
        known = {field.name for field in dataclasses.fields(cls)} - {"checks", "actions"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UsageError(
                f"watch(): unknown setting {unknown[0]!r}",
                hint="the settings are checks, skip, actions, " + ", ".join(sorted(known)),
            )
        return cls(checks=chosen, actions=merged, **settings)  # type: ignore[arg-type]

    def enabled(self, check: Check) -> bool:
        return check in self.checks


def _action(check: str, name: str) -> Action:
    try:
        return Action(name)
    except ValueError:
        choices = ", ".join(a.value for a in Action)
        raise UsageError(f"watch(): unknown action {name!r} for {check}; choose one of {choices}") from None


def _check(name: str) -> Check:
    try:
        return Check(name)
    except ValueError:
        choices = ", ".join(c.value for c in Check)
        raise UsageError(f"watch(): unknown check {name!r}; the checks are {choices}") from None
