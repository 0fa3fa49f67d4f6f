"""The guard: hooks on a model and its optimizer that check every step, on every rank.

A step, as the guard sees it:

    forward pre-hook    (first forward after a step) parameters unchanged since the last check?
                        off-CPU time since the last step (data loading)
    forward hook        off-CPU time in the forward pass
    step pre-hook       gradient norm, NaN/Inf; copy the secretly sampled elements
    step post-hook      off-CPU time in the optimizer; re-compute the sampled update; code snapshot;
                        fingerprints; one all-gather of every rank's report; the verdict; the ledger

The verdict is a pure function of the gathered reports, so every rank stops at the same step. The
stretches timed for stalls hold no collective: off-CPU time there is the rank's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from trainguard.envcheck._inprocess import CodeSnapshot
from trainguard.errors import IntegrityError
from trainguard.monitor._checks import Action, Check
from trainguard.monitor._config import GuardConfig
from trainguard.monitor._distributed import Channel
from trainguard.monitor._fingerprint import Fingerprinter
from trainguard.monitor._offcpu import ChangePoint, OffCpuClock
from trainguard.monitor._recompute import UpdateCheck, coverage
from trainguard.monitor._sink import LedgerSink
from trainguard.monitor._verdict import Failure, RankReport, decide

__all__ = ["Guard"]

_LOG = logging.getLogger("trainguard.monitor")
_HINT = "the ledger holds this alert; `trainguard ledger show` lists the run's events"


class Guard:
    """Checks a model and its optimizer at every step; `close()` (or leaving a `with`) removes it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: GuardConfig) -> None:
        self.config = config
        self.step = 0
        self._model = _inner(model)
        self._optimizer = optimizer
        self._channel = Channel(config.collective_timeout)
        self.rank = self._channel.rank
        self.world_size = self._channel.world
        seed, run = self._channel.shared_secret()
        self.run_id = os.environ.get("TRAINGUARD_RUN_ID") or f"run-{run:016x}"
        self._names = [name for name, _ in self._model.named_parameters()]
        self._params = [param for _, param in self._model.named_parameters()]
        by_id = {id(param): name for name, param in zip(self._names, self._params, strict=True)}
        self._fingerprinter = Fingerprinter(seed)
        self._update = UpdateCheck(
            optimizer,
            by_id,
            seed=seed ^ (self.rank + 1),
            tensors_per_step=config.sample_tensors,
            elements_per_tensor=config.sample_elements,
        )
        self._slot_names = self._names + [f"optimizer state of {name}" for name in self._names]
        self._replica_groups = [list(g) for g in config.replica_groups or [range(self.world_size)]]
        self._clock = OffCpuClock()
        floor = config.stall_floor_ms * 1000
        self._stalls = {window: ChangePoint(floor=floor) for window in ("data", "forward", "optimizer")}
        self._grad_history = ChangePoint(floor=math.log(config.spike_ratio), warmup=10)
        self._loss_history = ChangePoint(floor=math.log(config.spike_ratio), warmup=10)
        self._report = RankReport(step=0)
        self._loss: torch.Tensor | None = None
        self._between_steps = True
        self._in_step = False
        self._state_fingerprints: list[int] = [0] * len(self._params)
        self._summaries: list[list[Any]] = []
        self._sink = LedgerSink(self.run_id) if config.ledger and self.rank == 0 else None
        self._closed = False
        self._notices: list[str] = []
        if config.enabled(Check.UPDATE) and (notice := coverage(optimizer)) is not None:
            self._notice(notice)
        if config.enabled(Check.STEP_TIME) and not self._clock.available:
            self._notice(
                "off-CPU step timing needs Linux's /proc/thread-self/schedstat; stalls are not timed"
            )
        self._handles = self._install_hooks()
        self._snapshot = CodeSnapshot.take(model, optimizer) if config.enabled(Check.CODE) else None
        self._versions = self._param_versions()
        self._check_identity()
        self._record("monitor.start", self._start_payload())
        self._clock.reset()

    # -- public ---------------------------------------------------------------------------------

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Give the guard this step's loss (optional: gradients are checked without it)."""
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))

    @property
    def notices(self) -> tuple[str, ...]:
        """What the guard could not cover here (an optimizer it cannot re-compute, no schedstat...)."""
        return tuple(self._notices)

    def close(self) -> None:
        """Remove the hooks and write the last summaries to the ledger."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._flush_summaries()
        self._record("monitor.end", {"steps": self.step})
        if self._sink is not None:
            self._sink.close()
        self._channel.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hooks ------------------------------------------------------------------------------------

    def _install_hooks(self) -> list[Any]:
        this = weakref.ref(self)

        def forward_pre(module: torch.nn.Module, args: Any) -> None:
            guard = this()
            if guard is not None:
                guard._forward_pre()

        def forward_post(module: torch.nn.Module, args: Any, output: Any) -> None:
            guard = this()
            if guard is not None:
                guard._forward_post()

        def step_pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            guard = this()
            if guard is not None:
                guard._step_pre()

        def step_post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            guard = this()
            if guard is not None:
                guard._step_post()

        return [
            self._model.register_forward_pre_hook(forward_pre, prepend=True),
            self._model.register_forward_hook(forward_post),
            self._optimizer.register_step_pre_hook(step_pre),
            self._optimizer.register_step_post_hook(step_post),
        ]

    def _forward_pre(self) -> None:
        if self._closed:
            return
        elapsed = self._clock.mark()
        if self._between_steps:
            # The first forward pass after a checked step (later ones are gradient accumulation).
            self._between_steps = False
            self._report.data_us += elapsed // 1000
        # Every pass: a step whose hooks were bypassed leaves no other trace.
        if self.config.enabled(Check.OUTSIDE) and self._param_versions() != self._versions:
            self._outside_change()

    def _forward_post(self) -> None:
        if not self._closed:
            self._report.forward_us += self._clock.mark() // 1000

    def _step_pre(self) -> None:
        if self._closed:
            return
        self._in_step = True
        self._clock.mark()
        report = self._report
        if self._loss is not None:
            report.loss = float(self._loss)
            if self.config.enabled(Check.NONFINITE) and not math.isfinite(report.loss):
                report.fail(Check.NONFINITE, f"loss is {report.loss}")
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            report.grad_norm = float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
        if self.config.enabled(Check.NONFINITE) and not math.isfinite(report.grad_norm) and grads:
            report.fail(Check.NONFINITE, f"gradient norm is {report.grad_norm}")
        if self.config.enabled(Check.UPDATE):
            self._update.before()
        self._clock.mark()

    def _step_post(self) -> None:
        if self._closed or not self._in_step:
            return
        self._in_step = False
        report = self._report
        report.optimizer_us = self._clock.mark() // 1000
        self.step += 1
        report.step = self.step
        self._local_checks(report)
        report.fingerprints = self._fingerprints() if self.config.enabled(Check.FINGERPRINT) else ()
        try:
            reports = [RankReport.unpack(words) for words in self._channel.gather(report.pack())]
        except RuntimeError as exc:
            self._peer_lost(exc)
        failures = decide(
            reports,
            replica_groups=self._replica_groups if self.config.enabled(Check.FINGERPRINT) else [],
            slot_names=self._slot_names,
            actions=dict(self.config.actions),
        )
        failures = [f for f in failures if self.config.enabled(f.check)]
        self._summarize(reports)
        self._report = RankReport(step=self.step)
        self._loss = None
        self._act(failures)
        self._versions = self._param_versions()
        self._between_steps = True
        self._clock.mark()

    # -- checks -----------------------------------------------------------------------------------

    def _local_checks(self, report: RankReport) -> None:
        config = self.config
        if config.enabled(Check.UPDATE):
            mismatches = self._update.after()
            if mismatches:
                report.fail(Check.UPDATE, mismatches[0].describe())
        if self._snapshot is not None:
            changes = self._snapshot.changes()
            if changes:
                report.fail(Check.CODE, changes[0].message)
        if config.enabled(Check.SPIKE):
            for what, value, history in (
                ("gradient norm", report.grad_norm, self._grad_history),
                ("loss", report.loss, self._loss_history),
            ):
                if math.isfinite(value) and value > 0 and history.observe(math.log(value)):
                    median = math.exp(history.baseline() or 0.0)
                    report.fail(Check.SPIKE, f"{what} {value:.4g} against a recent median of {median:.4g}")
        if config.enabled(Check.STEP_TIME) and self._clock.available:
            for window, microseconds in (("forward", report.forward_us), ("optimizer", report.optimizer_us)):
                if self._stalls[window].observe(microseconds):
                    baseline = (self._stalls[window].baseline() or 0) / 1000
                    report.fail(
                        Check.STEP_TIME,
                        f"{microseconds / 1000:.0f} ms off-CPU in the {window} "
                        f"(its median is {baseline:.0f} ms)",
                    )
        if (
            config.enabled(Check.DATA_WAIT)
            and self._clock.available
            and self._stalls["data"].observe(report.data_us)
        ):
            baseline = (self._stalls["data"].baseline() or 0) / 1000
            report.fail(
                Check.DATA_WAIT,
                f"{report.data_us / 1000:.0f} ms off-CPU between steps (its median is {baseline:.0f} ms)",
            )

    def _fingerprints(self) -> list[int]:
        params = self._fingerprinter.of(self._params)
        if self.step % self.config.state_every == 0:
            self._state_fingerprints = self._state_fingerprint_values()
        return [*params.tolist(), *self._state_fingerprints]

    def _state_fingerprint_values(self) -> list[int]:
        values = []
        for param in self._params:
            state = self._optimizer.state.get(param, {})
            tensors = [state[key] for key in sorted(state) if isinstance(state[key], torch.Tensor)]
            if not tensors:
                values.append(0)
                continue
            prints = self._fingerprinter.of(tensors)
            # Position in the state dict matters: exp_avg and exp_avg_sq swapped must show.
            weights = torch.arange(1, len(tensors) + 1, dtype=torch.int64, device=prints.device) * 2 + 1
            values.append(int((prints * weights).sum()))
        return values

    def _param_versions(self) -> list[int]:
        return [param._version for param in self._params]

    def _check_identity(self) -> None:
        if not self.config.enabled(Check.IDENTITY):
            return
        fields = {
            "seed": torch.initial_seed(),
            "config": _digest(self.config.run_config or {}),
            "environment": _environment_digest(),
        }
        values = self._channel.gather(list(fields.values()))
        for position, name in enumerate(fields):
            column = [row[position] for row in values]
            if len(set(column)) == 1:
                continue
            majority = max(set(column), key=column.count)
            odd = (
                tuple(r for r, v in enumerate(column) if v != majority)
                if column.count(majority) * 2 > len(column)
                else ()
            )
            who = (
                f"rank {odd[0]}"
                if len(odd) == 1
                else ("ranks " + ", ".join(map(str, odd)) if odd else "the ranks")
            )
            failure = Failure(
                Check.IDENTITY,
                odd,
                0,
                f"the {name} of {who} differs from the other ranks' at the start of the run",
                self.config.actions.get(Check.IDENTITY, Action.STOP),
            )
            self._act([failure])

    # -- outcomes -----------------------------------------------------------------------------------

    def _act(self, failures: Sequence[Failure]) -> None:
        if not failures:
            return
        for failure in failures:
            self._record(
                "monitor.alert",
                {
                    "check": failure.check.value,
                    "ranks": list(failure.ranks),
                    "step": failure.step,
                    "message": failure.message,
                    "action": failure.action.value,
                },
            )
            if self.rank == 0 or self.rank in failure.ranks:
                _LOG.warning("trainguard: %s", failure.message)
        stops = [f for f in failures if f.action is Action.STOP]
        rollbacks = [f for f in failures if f.action is Action.ROLLBACK]
        if stops:
            self._flush_summaries()
            if self._sink is not None:
                self._sink.flush()
            raise _integrity_error(stops)
        if rollbacks and self.config.rollback is not None:
            self.config.rollback(_integrity_error(rollbacks))
            self._versions = self._param_versions()

    def _outside_change(self) -> None:
        changes = self._snapshot.changes() if self._snapshot is not None else []
        cause = f"; {changes[0].message}" if changes else ""
        step = self.step + 1
        message = (
            f"the parameters of rank {self.rank} changed at step {step} without passing the guard's "
            f"optimizer hooks: the step was bypassed or the weights were written directly{cause}"
        )
        failure = Failure(Check.OUTSIDE, (self.rank,), step, message, self.config.actions[Check.OUTSIDE])
        if failure.action is Action.STOP:
            # The optimizer hooks may never run again, so this rank cannot wait for the next gather.
            self._channel.leave_note(message)
            self._record(
                "monitor.alert",
                {
                    "check": "outside",
                    "ranks": [self.rank],
                    "step": self.step,
                    "message": message,
                    "action": "stop",
                },
            )
            if self._sink is not None:
                self._sink.flush()
            _LOG.warning("trainguard: %s", message)
            raise _integrity_error([failure])
        self._report.fail(Check.OUTSIDE, message)
        self._versions = self._param_versions()

    def _peer_lost(self, exc: RuntimeError) -> None:
        notes = self._channel.notes()
        notes.pop(self.rank, None)
        if notes:
            ranks = tuple(sorted(notes))
            message = f"{notes[ranks[0]]} (rank {self.rank} stops with it)"
            check = Check.OUTSIDE
        else:
            ranks = ()
            message = (
                f"a rank left the monitor's all-gather at step {self.step} ({str(exc).splitlines()[0]}); "
                "`trainguard run` names the rank that died and who killed it"
            )
            check = Check.LOST
        failure = Failure(check, ranks, self.step, message, Action.STOP)
        self._record(
            "monitor.alert",
            {
                "check": check.value,
                "ranks": list(ranks),
                "step": self.step,
                "message": message,
                "action": "stop",
            },
        )
        if self._sink is not None:
            self._sink.flush()
        raise _integrity_error([failure]) from exc

    # -- ledger -------------------------------------------------------------------------------------

    def _record(self, event_type: str, payload: dict[str, Any]) -> None:
        if self._sink is not None:
            self._sink.put(event_type, payload)

    def _summarize(self, reports: Sequence[RankReport]) -> None:
        if self._sink is None:
            return
        first = reports[0]
        self._summaries.append(
            [
                self.step,
                _finite(first.loss),
                _finite(first.grad_norm),
                [round(r.optimizer_us / 1000, 1) for r in reports],
                [round(r.forward_us / 1000, 1) for r in reports],
                [round(r.data_us / 1000, 1) for r in reports],
            ]
        )
        if len(self._summaries) >= self.config.summary_every:
            self._flush_summaries()

    def _flush_summaries(self) -> None:
        if self._summaries:
            columns = [
                "step",
                "loss",
                "grad_norm",
                "optimizer_off_cpu_ms",
                "forward_off_cpu_ms",
                "data_off_cpu_ms",
            ]
            self._record("monitor.steps", {"columns": columns, "rows": self._summaries})
            self._summaries = []

    def _start_payload(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "checks": sorted(check.value for check in self.config.checks),
            "replica_groups": self._replica_groups,
            "parameters": len(self._params),
            "elements": sum(p.numel() for p in self._params),
            "optimizer": type(self._optimizer).__name__,
            "config_digest": f"{_digest(self.config.run_config or {}) & (2**64 - 1):016x}",
            "notices": self._notices,
        }

    def _notice(self, message: str) -> None:
        self._notices.append(message)
        if self.rank == 0:
            _LOG.warning("trainguard: notice: %s", message)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    # DDP's forward runs collectives (buffer broadcast); the wrapped module's forward does not.
    parallel = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, parallel) else model


def _integrity_error(failures: Sequence[Failure]) -> IntegrityError:
    first = failures[0]
    message = first.message
    if len(failures) > 1:
        message += "; also: " + "; ".join(f.message for f in failures[1:3])
    return IntegrityError(message, check=first.check.value, ranks=first.ranks, step=first.step, hint=_HINT)


def _digest(value: object) -> int:
    text = json.dumps(value, sort_keys=True, default=repr).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)


def _environment_digest() -> int:
    """The environment digest `trainguard run` verified, else the versions this process runs."""
    given = os.environ.get("TRAINGUARD_ENV_DIGEST")
    if given:
        return _digest(given)
    return _digest([sys.version, torch.__version__, sorted(_loaded_versions())])


def _loaded_versions() -> Iterator[str]:
    for name in ("numpy", "transformers", "lightning", "pytorch_lightning", "accelerate", "trainguard"):
        module = sys.modules.get(name)
        if module is not None:
            yield f"{name}=={getattr(module, '__version__', '?')}"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
