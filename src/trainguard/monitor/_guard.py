"""The guard: hooks on a model and its optimizer that check every step, on every rank.

A step, as the guard sees it:

    forward pre-hook    parameters unchanged since the last check? (every pass: a bypassed step
                        leaves no other trace); off-CPU time since the last step (data loading)
    forward hook        off-CPU time in the forward pass
    step pre-hook       (a step with no forward pass) the verdict; the gradient norm; the secretly
                        sampled elements, taken where they are (after the step's closure, if any)
    step post-hook      off-CPU time in the optimizer and the code snapshot, on the host; the
                        fingerprints, the samples after the step, the norms and batch digests packed
                        on the device and copied to the host; the report completed from those copies
                        (NaN/Inf, spikes, the re-computed update) and an all-gather of every rank's
                        report started

On a GPU (`defer`) the copies are read one step late, when they have long arrived, so that no step
waits for the device: step N's report is completed and sent at step N+1's end.

The verdict on step N is a pure function of the gathered reports, so every rank draws the same one.
It is drawn when step N+1 reaches its optimizer, before that step changes anything: by then the ranks
have met in the gradient all-reduce, so the gather has finished and no rank waits for another (a
single process decides at once). `close()` draws the last step's verdict. The stretches timed for
stalls hold no collective: off-CPU time there is the rank's own.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from trainguard.envcheck._inprocess import CodeSnapshot
from trainguard.errors import IntegrityError
from trainguard.monitor._checks import Action, Check
from trainguard.monitor._code import CodeWatch
from trainguard.monitor._config import GuardConfig
from trainguard.monitor._derivative import DerivativeProbe
from trainguard.monitor._distributed import Channel, Gathering
from trainguard.monitor._evidence import Captured, Evidence, gradient_norm
from trainguard.monitor._fingerprint import Fingerprinter
from trainguard.monitor._gradpath import GradientPath
from trainguard.monitor._heartbeat import HeartbeatSender
from trainguard.monitor._hyper import HyperParameters
from trainguard.monitor._identity import compare_identity, digest, hook_digest
from trainguard.monitor._offcpu import ChangePoint, OffCpuClock, own_elapsed_us, own_time_ns
from trainguard.monitor._recompute import UpdateCheck, coverage
from trainguard.monitor._sampler import SamplerWatch
from trainguard.monitor._signals import SignalEvent, watch_signals
from trainguard.monitor._sink import open_sink
from trainguard.monitor._tensors import tensors_in
from trainguard.monitor._verdict import Failure, RankReport, decide, report_length, slow_ranks

__all__ = ["Guard"]

_LOG = logging.getLogger("trainguard.monitor")
# A timing verdict (a compute stall, a straggler) needs the slowness twice within this many steps:
# a stall planted at every 16th step or more often stops the job at its second occurrence.
_SLOW_WINDOW = 16
_HINT = "the ledger holds this alert; `trainguard ledger show` lists the run's events"


class Guard:
    """Checks a model and its optimizer at every step; `close()` (or leaving a `with`) removes it."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: GuardConfig) -> None:
        self.config = config
        self.step = 0
        self._notices: list[str] = []
        self._model = _inner(model)
        self._optimizer = optimizer
        self._channel = Channel(config.collective_timeout, single_process=config.single_process)
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
            fixed_elements=config.fixed_elements,
        )
        self._gradpath = GradientPath(model, self._params, self._names, self._update.index_of)
        if config.enabled(Check.GRADIENT_PATH) and self._gradpath.active:
            self._update.arrivals = self._gradpath.take
        self._reductions = 0
        self._rewritten = _rewritten_in_forward(self._model)
        self._derivative = DerivativeProbe(
            self._model,
            self._params,
            self._names,
            lambda: self._gradpath.local,
            schedule_seed=seed,
            element_seed=seed ^ (self.rank + 1),
            every=config.derivative_every,
            rewritten=list(self._rewritten.values()),
        )
        self._hyper = HyperParameters(optimizer, config.schedulers)
        self._samplers = SamplerWatch(config.samplers, rank=self.rank, world=self.world_size)
        self._hyper_changes: list[list[Any]] = []
        self._update.rewritten_in_forward = {id(p) for p in self._rewritten.values()}
        self._slot_names = self._names + [f"optimizer state of {name}" for name in self._names]
        self._evidence = Evidence(self._params, optimizer, self._update, self._fingerprinter, config)
        rewritten = {id(p) for p in self._rewritten.values()}
        self._evidence.uncompared = {i for i, p in enumerate(self._params) if id(p) in rewritten}
        self._replica_groups = self._replicas(model)
        self._clock = OffCpuClock()
        floor = config.stall_floor_ms * 1000
        self._stalls = {
            window: ChangePoint(floor=floor) for window in ("data", "forward", "optimizer", "compute")
        }
        self._compute_start: tuple[int, int, int] | None = None
        # The thread's CPU time as the optimizer's own update began: a busy-wait there is compute too.
        self._optimizer_cpu_start: int | None = None
        # Whether this rank's compute, and which ranks' against their peers, were slow at recent
        # steps: a timing verdict needs the slowness to come back within _SLOW_WINDOW steps.
        self._compute_slow: collections.deque[bool] = collections.deque(maxlen=_SLOW_WINDOW - 1)
        self._slow_recently: collections.deque[frozenset[int]] = collections.deque(maxlen=_SLOW_WINDOW - 1)
        self._report = RankReport(step=0)
        self._report_length = 0
        self._batches: list[torch.Tensor] = []
        self._pending: Gathering | None = None
        self._loss: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self._deferred: Captured | None = None
        on_gpu = bool(self._params) and self._params[0].device.type == "cuda"
        # On a GPU the evidence is read one step late, so that no step waits for the device.
        self._defer = on_gpu if config.defer is None else config.defer
        self._between_steps = True
        # An evaluation pass between two steps (validation): that stretch holds the evaluation's own
        # collectives (metrics reduced over ranks), where a rank waits for a slower one, so its
        # off-CPU time is not judged as a data wait.
        self._evaluated = False
        self._judge_data = True
        self._in_step = False
        self._summaries: list[list[Any]] = []
        self._summaries_since = time.monotonic()
        self._sink = open_sink(self.run_id) if config.ledger and self.rank == 0 else None
        self._closed = False
        self._active = True
        self._rollbacks = 0
        self.failure: IntegrityError | None = None
        if config.enabled(Check.UPDATE) and (notice := coverage(optimizer)) is not None:
            self._notice(notice)
        if config.enabled(Check.STEP_TIME) and not self._clock.available:
            self._notice(
                "off-CPU step timing needs Linux's /proc/thread-self/schedstat; stalls are not timed"
            )
        self._handles = self._install_hooks()
        # Under `trainguard run`: beats that say this rank is alive, and who sends it signals.
        self._heartbeat = HeartbeatSender.from_environment(self.rank)
        _watch_signals(self)
        self._snapshot = CodeSnapshot.take(model, optimizer) if config.enabled(Check.CODE) else None
        self._code = CodeWatch(config.code_turns) if config.enabled(Check.CODE) else None
        if self._code is not None and (found := self._code.before_watch()):
            # Patched before watch(): the snapshot took the patch as it found it.
            self._report.fail(Check.CODE, found)
        if config.enabled(Check.GRADIENT_PATH):
            if self._gradpath.problem is not None:
                self._report.fail(Check.GRADIENT_PATH, f"on rank {self.rank}: {self._gradpath.problem}")
            elif self._gradpath.notice is not None:
                self._notice(self._gradpath.notice)
        if config.enabled(Check.DERIVATIVE):
            if not self._gradpath.active:
                self._derivative.notice = (
                    "the gradient is not checked against the forward pass where its path is not"
                )
            elif self._derivative.notice is not None:
                self._notice(self._derivative.notice)
        self._arm_probe()
        for name in self._rewritten:
            self._notice(
                f"{name} is renormalised by its own module in the forward pass (max_norm) from each "
                "rank's batch: its replicas diverge by design and are not compared; writes to it outside "
                "the forward pass are still checked"
            )
        self._versions = self._param_versions()
        self._report_length, failures = compare_identity(
            self._channel,
            config,
            report_length(len(self._slot_names)),
            hooks=hook_digest(model.modules(), self._params),
            replica_groups=self._replica_groups,
        )
        self._act(failures)
        self._record("monitor.start", self._start_payload())
        self._clock.reset()

    # -- public ---------------------------------------------------------------------------------

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Give the guard this step's loss (optional: gradients are checked without it)."""
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))

    def check_now(self) -> IntegrityError | None:
        """Draw the verdict on the last step now (waiting for the other ranks' reports) and return
        the failure that stops the job, if any: the framework callbacks stop through the framework at
        the very step. With `raise_errors` (the default) a failure is raised instead."""
        if self._active:
            self._resolve()
        return self.failure

    @property
    def notices(self) -> tuple[str, ...]:
        """What the guard could not cover here (an optimizer it cannot re-compute, no schedstat...)."""
        return tuple(self._notices)

    def close(self) -> None:
        """Remove the hooks, draw the verdict on the last step (raising IntegrityError if it failed)
        and write the last summaries to the ledger."""
        if self._closed:
            return
        for handle in self._handles:
            handle.remove()
        self._gradpath.close()
        try:
            if self._active:
                self._resolve()
                if self._deferred is not None:
                    # Every rank closes at the same point: the last step's report goes out now.
                    deferred, self._deferred = self._deferred, None
                    self._send(self._evidence.complete(deferred))
                    self._resolve()
        finally:
            self._active = False
            self._closed = True
            self._finish()

    def _finish(self) -> None:
        _LIVE.discard(self)
        if self._code is not None:
            self._code.close()
        if self._heartbeat is not None:
            self._heartbeat.close()
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
        # The hooks hold the guard: `trainguard.watch(model, optimizer)` without keeping the result
        # must go on guarding until close().
        def forward_pre(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            self._forward_pre(args, kwargs)

        def forward_post(module: torch.nn.Module, args: Any, output: Any) -> None:
            self._forward_post(output)

        def step_pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
            # `args` are step()'s own, the optimizer first. A closure (Lightning always passes one)
            # runs the forward and backward passes inside step(): the step's own work is checked once
            # it has run, or the gradients read would be the last step's.
            closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
            if closure is None:
                self._step_pre()
                return None

            def closure_then_check() -> Any:
                result = closure()
                self._step_pre()
                return result

            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure_then_check}
            return (args[0], closure_then_check, *args[2:]), kwargs

        def step_post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._step_post()

        return [
            self._model.register_forward_pre_hook(forward_pre, prepend=True, with_kwargs=True),
            # First among the forward hooks: the hook it puts on the output sees the loss's gradient
            # before any hook that another forward hook adds there.
            self._model.register_forward_hook(forward_post, prepend=True),
            self._optimizer.register_step_pre_hook(step_pre),
            self._optimizer.register_step_post_hook(step_post),
        ]

    def _forward_pre(self, args: Any = (), kwargs: Any = None) -> None:
        if not self._active or self._derivative.probing:
            return
        elapsed = self._clock.mark()
        # Evaluation passes (no gradient) are not part of a training step: they neither time nor
        # count as data, though the weights must still be as the last step left them.
        training = torch.is_grad_enabled()
        first = training and self._between_steps
        if not training and self._between_steps:
            self._evaluated = True
        if first:
            # The first forward pass after a checked step (later ones are gradient accumulation).
            self._between_steps = False
            self._report.data_us += elapsed // 1000
            self._judge_data, self._evaluated = not self._evaluated, False
            # Last step's verdict, before this step runs any collective: a rank that stops here
            # leaves no other rank waiting in the gradient all-reduce.
            self._resolve()
            # The rank's own compute starts now, after the wait for its peers' reports.
            self._compute_start = own_time_ns()
        if training:
            self._derivative.before_forward(args, kwargs or {})
            tensors = list(tensors_in((args, kwargs or {})))
            if tensors:
                # Read at the step's end, so that a GPU is not made to wait here.
                self._batches.append(self._fingerprinter.of(tensors).sum())
        # Every pass: a step whose hooks were bypassed leaves no other trace.
        if self.config.enabled(Check.OUTSIDE) and self._param_versions() != self._versions:
            self._outside_change(bypassed=training and not first)
        self._clock.mark()

    def _forward_post(self, output: object = None) -> None:
        if not self._active or self._derivative.probing:
            return
        self._report.forward_us += self._clock.mark() // 1000
        if torch.is_grad_enabled():
            self._derivative.after_forward(output)
        if self.config.enabled(Check.OUTSIDE):
            versions = self._param_versions()
            if versions != self._versions:
                self._forward_writes(versions)
        self._clock.mark()

    def _forward_writes(self, versions: list[int]) -> None:
        """Weights written during the forward pass: only a module that renormalises its own may."""
        allowed = {id(p) for p in self._rewritten.values()}
        for name, param, before, after in zip(
            self._names, self._params, self._versions, versions, strict=True
        ):
            if before != after and id(param) not in allowed:
                self._report.fail(
                    Check.OUTSIDE, f"{name} of rank {self.rank} was written during the forward pass"
                )
                break
        self._versions = versions

    def _step_pre(self) -> None:
        if not self._active:
            return
        self._clock.mark()
        # A step with no forward pass since the last one: its verdict is drawn here instead.
        self._resolve()
        self._in_step = True
        self._report.compute_us = self._compute_time()
        self._step_loss, self._loss = self._loss, None
        self._grad_norm = gradient_norm(self._params)
        self._settings_checks(self._report)
        if self.config.enabled(Check.GRADIENT_PATH):
            tampering = self._gradpath.tampering(self._reductions)
            self._reductions = self._gradpath.reductions
            if tampering is not None:
                self._report.fail(Check.GRADIENT_PATH, f"on rank {self.rank}: {tampering}")
        if self._derivative.probing:
            # Only the probe's own passes run with the flag set: set from outside, it hides the
            # forward hooks' checks.
            self._report.fail(
                Check.DERIVATIVE, f"on rank {self.rank}: the guard's probe flag was set from outside"
            )
            self._derivative.probing = False
        if self.config.enabled(Check.DERIVATIVE):
            if self._derivative.active and (found := self._derivative.verdict()) is not None:
                self._report.fail(Check.DERIVATIVE, f"on rank {self.rank}: {found}")
            # Said once, whoever turned the probe off (the probe itself, or code that set its notice).
            elif (said := self._derivative.notice) is not None and said not in self._notices:
                self._notice(said)
        if any(self.config.enabled(c) for c in (Check.UPDATE, Check.OUTSIDE, Check.GRADIENT_PATH)):
            self._update.before()
        self._clock.mark()
        self._optimizer_cpu_start = time.thread_time_ns()

    def _arm_probe(self) -> None:
        """Decide, secretly and alike on every rank, whether the next step's gradient is checked
        against its forward pass; the gradient path then keeps each rank's own contribution."""
        if self.config.enabled(Check.DERIVATIVE):
            self._derivative.arm()
        self._gradpath.keep_local = self._derivative.index_of if self._derivative.armed else None

    def _compute_time(self) -> int:
        """Own microseconds from the step's first forward pass until its gradient was complete: the
        last bucket handed to the all-reduce under DDP (before any wait for the other ranks), else now."""
        start, self._compute_start = self._compute_start, None
        end, self._gradpath.last_bucket = self._gradpath.last_bucket, None
        if start is None:
            return 0
        if end is None or end[1] < start[1]:
            end = own_time_ns()
        return own_elapsed_us(start, end)

    def _optimizer_cpu_us(self, compute_us: int) -> int:
        """CPU microseconds the optimizer's own update took, for a step whose compute was timed: its
        off-CPU time is judged on its own, but a busy-wait there never leaves the CPU (only CPU time:
        an optimizer that waits for its peers, as ZeRO's does, would otherwise look slow)."""
        start, self._optimizer_cpu_start = self._optimizer_cpu_start, None
        if start is None or not compute_us:
            return 0
        return max(0, time.thread_time_ns() - start) // 1000

    def _step_post(self) -> None:
        if not self._active or not self._in_step:
            return
        self._in_step = False
        report = self._report
        report.optimizer_us = self._clock.mark() // 1000
        report.compute_us += self._optimizer_cpu_us(report.compute_us)
        self.step += 1
        report.step = self.step
        self._host_checks(report)
        captured = self._capture(report)
        ready: Captured | None = captured
        if self._defer:
            # One step late: last step's copies have long arrived, this step's are under way.
            ready, self._deferred = self._deferred, captured
        if ready is not None:
            self._send(self._evidence.complete(ready))
        if self._heartbeat is not None:
            self._heartbeat.set_step(self.step)
        self._report = RankReport(step=self.step)
        self._versions = self._param_versions()
        self._between_steps = True
        self._arm_probe()
        if not self._channel.distributed:
            self._resolve()
        self._clock.mark()

    def _send(self, report: RankReport) -> None:
        self._pending = self._channel.start_gather(report.pack(self._report_length))
        if self._heartbeat is not None:
            # The same findings leave the process: the supervisor judges them where no patch reaches.
            failed = [check for check in Check if report.failed(check)]
            stop = [c.value for c in failed if self.config.actions.get(c) is not Action.ALERT]
            self._heartbeat.send(
                "report",
                {
                    "step": report.step,
                    "stop": stop,
                    "alert": [c.value for c in failed if c.value not in stop],
                    "detail": next(iter(report.details.values()), "")[:400],
                    "checks": sorted(check.value for check in self.config.checks),
                },
            )

    def _resolve(self) -> None:
        """Draw the verdict on the last step from every rank's report, and act on it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            reports = [RankReport.unpack(words) for words in pending.wait()]
        except RuntimeError as exc:
            self._peer_lost(exc)
            return
        slow: tuple[int, ...] = ()
        if self.config.enabled(Check.STEP_TIME):
            slow = slow_ranks(reports, int(self.config.stall_floor_ms * 1000))
        before = frozenset().union(*self._slow_recently)
        self._slow_recently.append(frozenset(slow))
        failures = decide(
            reports,
            replica_groups=self._replica_groups if self.config.enabled(Check.FINGERPRINT) else [],
            slot_names=self._slot_names,
            actions=dict(self.config.actions),
            stragglers=[rank for rank in slow if rank in before],
        )
        self._summarize(reports)
        self._act([f for f in failures if self.config.enabled(f.check)])

    # -- checks -----------------------------------------------------------------------------------

    def _host_checks(self, report: RankReport) -> None:
        """The checks that read nothing from a device: code, and time off the CPU."""
        config = self.config
        if self._snapshot is not None:
            changes = self._snapshot.changes()
            if changes:
                report.fail(Check.CODE, changes[0].message)
        if self._code is not None and (found := self._code.check(self.step)):
            report.fail(Check.CODE, found)
        if config.enabled(Check.STEP_TIME) and self._clock.available:
            for window, microseconds in (("forward", report.forward_us), ("optimizer", report.optimizer_us)):
                if self._stalls[window].observe(microseconds):
                    baseline = (self._stalls[window].baseline() or 0) / 1000
                    report.fail(
                        Check.STEP_TIME,
                        f"{microseconds / 1000:.0f} ms off-CPU in the {window} "
                        f"(its median is {baseline:.0f} ms)",
                    )
            slow = bool(report.compute_us) and self._stalls["compute"].observe(report.compute_us)
            # Own time: a busy-wait counts, a neighbour taking the cores does not. Twice within
            # _SLOW_WINDOW steps: a one-off (a garbage collection, a background thread) is no attack.
            if slow and any(self._compute_slow):
                baseline = (self._stalls["compute"].baseline() or 0) / 1000
                report.fail(
                    Check.STEP_TIME,
                    f"rank {self.rank} took {report.compute_us / 1000:.0f} ms from the first forward pass "
                    f"to a complete gradient (with its optimizer's CPU time), and far above its median at a "
                    f"step just before (its median is {baseline:.0f} ms): a busy-wait or a sleep in the "
                    "forward or backward pass, or a busy-wait in the optimizer step",
                )
            self._compute_slow.append(slow)
        if (
            config.enabled(Check.DATA_WAIT)
            and self._clock.available
            and self._judge_data
            and self._stalls["data"].observe(report.data_us)
        ):
            baseline = (self._stalls["data"].baseline() or 0) / 1000
            report.fail(
                Check.DATA_WAIT,
                f"{report.data_us / 1000:.0f} ms off-CPU between steps (its median is {baseline:.0f} ms)",
            )

    def _settings_checks(self, report: RankReport) -> None:
        """Hyper-parameters and data samplers, read before the step uses them."""
        if self.config.enabled(Check.HYPERPARAMETERS):
            changes, refusal = self._hyper.observe()
            if refusal is not None:
                report.fail(Check.HYPERPARAMETERS, f"on rank {self.rank}: {refusal}")
            self._hyper_changes.extend([self.step + 1, *change] for change in changes)
            report.hyper_digest = self._hyper.digest
        if self.config.enabled(Check.SAMPLER):
            report.sampler_digest, problem = self._samplers.observe()
            if problem is not None:
                report.fail(Check.SAMPLER, f"on rank {self.rank}: {problem}")

    def _capture(self, report: RankReport) -> Captured:
        batches, self._batches = self._batches, []
        grad_norm, loss, self._grad_norm, self._step_loss = self._grad_norm, self._step_loss, None, None
        return self._evidence.capture(report, self.step, grad_norm, loss, batches)

    def _replicas(self, model: torch.nn.Module) -> list[list[int]]:
        if self.config.replica_groups is not None:
            return [list(group) for group in self.config.replica_groups]
        if _sharded(model):
            # Each rank holds its own shard: without the replica layout there is nothing equal to compare.
            self._notice(
                "the model's parameters are sharded (FSDP or DTensor): replicas are not compared; "
                "pass replica_groups=[[ranks holding the same shard], ...] to compare them"
            )
            return []
        return [list(range(self.world_size))]

    def _param_versions(self) -> list[int]:
        return [param._version for param in self._params]

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
            self.failure = _integrity_error(stops)
            # Checks end here: every rank has the same verdict and stops at this step.
            self._active = False
            if self._code is not None:
                self._code.close()
            if self.config.raise_errors:
                raise self.failure
            return
        if rollbacks and self.config.rollback is not None:
            error = _integrity_error(rollbacks)
            self._rollbacks += 1
            if self._rollbacks > self.config.max_rollbacks:
                self.failure = IntegrityError(
                    f"{error.message} (after {self.config.max_rollbacks} rollbacks the failure persists)",
                    check=error.check,
                    ranks=error.ranks,
                    step=error.step,
                    hint=_HINT,
                )
                self._active = False
                if self.config.raise_errors:
                    raise self.failure
                return
            self._record(
                "monitor.rollback", {"check": error.check, "step": error.step, "count": self._rollbacks}
            )
            self.config.rollback(error)
            self._versions = self._param_versions()
            self._update.forget()
            self._hyper.rebase()

    def _outside_change(self, *, bypassed: bool) -> None:
        changes = self._snapshot.changes() if self._snapshot is not None else []
        cause = f"; {changes[0].message}" if changes else ""
        message = (
            f"the parameters of rank {self.rank} changed without passing the guard's optimizer hooks: "
            f"the step was bypassed or the weights were written directly{cause}"
        )
        self._report.fail(Check.OUTSIDE, message)
        self._versions = self._param_versions()
        if bypassed:
            # No checked step since the last forward pass, yet the weights moved: this rank's step
            # hooks no longer run. It sends, now, the report its next step would have sent (the other
            # ranks gather it when they reach this point), and all stop together.
            if self._deferred is not None:
                # One step late, the others send the report this rank still holds: send it, marked.
                report = self._evidence.complete(self._deferred)
                self._deferred = None
                report.fail(Check.OUTSIDE, message)
            else:
                self.step += 1
                self._report.step = self.step
                self._grad_norm = gradient_norm(self._params)
                report = self._evidence.complete(self._capture(self._report))
            self._report = RankReport(step=self.step)
            self._send(report)
            self._resolve()

    def _peer_lost(self, exc: RuntimeError) -> None:
        message = (
            f"a rank left the monitor's all-gather at step {self.step} ({str(exc).splitlines()[0]}); "
            "`trainguard run` names the rank that died and who killed it"
        )
        # Raises, unless failures are kept for a framework callback to stop on.
        self._act([Failure(Check.LOST, (), self.step, message, Action.STOP)])

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
                first.step,  # the step the reports are of: on GPUs they are judged a step late
                _finite(first.loss),
                _finite(first.grad_norm),
                [round(r.optimizer_us / 1000, 1) for r in reports],
                [round(r.forward_us / 1000, 1) for r in reports],
                [round(r.data_us / 1000, 1) for r in reports],
                [f"{r.data_digest & (2**64 - 1):016x}" for r in reports],
                self._hyper_changes,
            ]
        )
        self._hyper_changes = []
        waited = time.monotonic() - self._summaries_since
        if len(self._summaries) >= self.config.summary_every or waited >= self.config.summary_seconds:
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
                "data_order_digest",
                "hyperparameter_changes",
            ]
            self._record("monitor.steps", {"columns": columns, "rows": self._summaries})
            self._summaries = []
        self._summaries_since = time.monotonic()

    def _start_payload(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "checks": sorted(check.value for check in self.config.checks),
            "replica_groups": self._replica_groups,
            "parameters": len(self._params),
            "elements": sum(p.numel() for p in self._params),
            "optimizer": type(self._optimizer).__name__,
            "config_digest": f"{digest(self.config.run_config or {}) & (2**64 - 1):016x}",
            "notices": self._notices,
        }

    def _on_signal(self, event: SignalEvent) -> None:
        """Runs on the signal thread before the signal takes effect: say who sent it, while we can."""
        sender = f"pid {event.sender_pid}, uid {event.sender_uid}"
        if event.sender_cmdline:
            sender += f": {event.sender_cmdline}"
        _LOG.warning("trainguard: rank %d received %s from %s", self.rank, event.name, sender)
        if self._heartbeat is not None:
            self._heartbeat.send("signal", event.payload())
        if self._sink is not None:
            self._sink.put("monitor.signal", {"rank": self.rank, "step": self.step, **event.payload()})
            # The default action may end the process next: the evidence is written first.
            self._sink.flush(timeout=5.0)

    def _notice(self, message: str) -> None:
        self._notices.append(message)
        if self.rank == 0:
            _LOG.warning("trainguard: notice: %s", message)


_LIVE: weakref.WeakSet[Guard] = weakref.WeakSet()
_SIGNALS = threading.Lock()
_signals_watched = False


def _watch_signals(guard: Guard) -> None:
    """One signal watcher per process, reporting to every guard still open."""
    global _signals_watched
    _LIVE.add(guard)
    with _SIGNALS:
        if not _signals_watched:
            _signals_watched = watch_signals(_report_signal)


def _report_signal(event: SignalEvent) -> None:
    for guard in list(_LIVE):
        guard._on_signal(event)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    # DDP's forward runs collectives (buffer broadcast); the wrapped module's forward does not.
    parallel = torch.nn.parallel.DistributedDataParallel
    return model.module if isinstance(model, parallel) else model


def _rewritten_in_forward(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters their own module writes in its forward pass: embeddings with max_norm renormalise
    the rows they look up."""
    kinds = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    return {
        f"{path}.weight" if path else "weight": module.weight
        for path, module in model.named_modules()
        if isinstance(module, kinds) and module.max_norm is not None
    }


def _sharded(model: torch.nn.Module) -> bool:
    for module in model.modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "FSDPModule") or any(
            type(base).__name__ == "FSDPModule" for base in type(module).__mro__
        ):
            return True
    return any(type(param).__name__ == "DTensor" for param in model.parameters())


def _integrity_error(failures: Sequence[Failure]) -> IntegrityError:
    first = failures[0]
    message = first.message
    if len(failures) > 1:
        message += "; also: " + "; ".join(f.message for f in failures[1:3])
    return IntegrityError(message, check=first.check.value, ranks=first.ranks, step=first.step, hint=_HINT)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
