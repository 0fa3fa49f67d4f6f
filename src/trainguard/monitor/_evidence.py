"""A step's evidence: what the guard reads from the device, packed, copied to the host without
waiting, and judged once the copy has arrived (at once on a CPU, one step late on a GPU).

    captured = evidence.capture(report, step, grad_norm, loss, batches)   # in the step post-hook
    report = evidence.complete(captured)                                  # now, or a step later

The vector holds the fingerprints whose turn it is, the digests of the step's input batches and the
bits of the gradient norm and the loss; the update check's samples travel beside it. Completing it
fills the fingerprint caches (so that tensors out of turn keep their last value, equally on every
replica) and runs the checks that need the values: NaN/Inf, spikes, the re-computed update.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Sequence
from typing import Any

import torch

from trainguard.monitor._checks import Check
from trainguard.monitor._config import GuardConfig
from trainguard.monitor._fingerprint import Fingerprinter
from trainguard.monitor._offcpu import ChangePoint
from trainguard.monitor._recompute import Samples, UpdateCheck
from trainguard.monitor._tensors import local
from trainguard.monitor._verdict import RankReport

__all__ = ["Captured", "Evidence", "gradient_norm"]

# Layouts of the optimizer state kept from one turn to the next (one per turn of `state_every`).
_STATE_LAYOUTS_KEPT = 16


@dataclasses.dataclass(slots=True)
class Captured:
    """One step's report and device-side evidence, its copy to the host under way."""

    report: RankReport
    words: torch.Tensor  # fingerprints in turn, batch digests, gradient norm and loss bits
    param_turn: list[int]
    state_turn: list[int]
    batches: int
    grad: bool
    loss: bool
    samples: Samples
    event: Any


class Evidence:
    """Captures and completes the device-side evidence of the steps of one model and optimizer."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        update: UpdateCheck,
        fingerprinter: Fingerprinter,
        config: GuardConfig,
    ) -> None:
        self._params = list(params)
        self._optimizer = optimizer
        self._update = update
        self._fingerprinter = fingerprinter
        self.config = config
        self._param_fingerprints: list[int] = [0] * len(self._params)
        self._state_fingerprints: list[int] = [0] * len(self._params)
        self._data_digest = 0
        self._state_layouts: dict[
            tuple[tuple[int, ...], torch.device], tuple[torch.Tensor, torch.Tensor]
        ] = {}
        # Parameters whose replicas diverge by design (renormalised in the forward pass from each
        # rank's own batch): their fingerprints are sent as 0, so they are not compared. Their optimizer
        # state comes from the reduced gradient, the same on every replica, and is compared.
        self.uncompared: set[int] = set()
        self._grad_history = ChangePoint(floor=math.log(config.spike_ratio), warmup=10)
        self._loss_history = ChangePoint(floor=math.log(config.spike_ratio), warmup=10)

    def capture(
        self,
        report: RankReport,
        step: int,
        grad_norm: torch.Tensor | None,
        loss: torch.Tensor | None,
        batches: Sequence[torch.Tensor],
    ) -> Captured:
        """This step's device-side evidence, packed in one vector whose copy to the host starts now."""
        device = self._params[0].device if self._params else torch.device("cpu")
        parts: list[torch.Tensor] = []
        param_turn: list[int] = []
        state_turn: list[int] = []
        if self.config.enabled(Check.FINGERPRINT):
            # Each tensor in its turn, the same turns on every replica: all parameters every
            # `params_every` steps (every step by default), the optimizer state every `state_every`.
            # A difference between replicas never heals by itself (the moments decay it, the bits
            # stay apart), so it shows at the tensor's next turn; an update tampered on one rank
            # touches every tensor, and shows at once.
            count = len(self._params)
            param_turn = [
                i for i in range(count) if i % self.config.params_every == step % self.config.params_every
            ]
            state_turn = [
                i for i in range(count) if i % self.config.state_every == step % self.config.state_every
            ]
            if param_turn:
                parts.append(self._fingerprinter.of([self._params[i] for i in param_turn]).to(device))
            if state_turn:
                parts.append(self._fingerprint_states([self._params[i] for i in state_turn], device))
        parts.extend(batch.to(device).reshape(1) for batch in batches)
        for value in (grad_norm, loss):
            number = torch.full((1,), math.nan, dtype=torch.float64, device=device)
            if value is not None:
                number = value.detach().to(device=device, dtype=torch.float64).reshape(1)
            parts.append(number.view(torch.int64))
        words = torch.cat([part.reshape(-1) for part in parts]).to("cpu", non_blocking=True)
        checked = any(self.config.enabled(c) for c in (Check.UPDATE, Check.OUTSIDE, Check.GRADIENT_PATH))
        samples = self._update.capture().to_host() if checked else Samples()
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()
        return Captured(
            report,
            words,
            param_turn,
            state_turn,
            len(batches),
            grad_norm is not None,
            loss is not None,
            samples,
            event,
        )

    def complete(self, captured: Captured) -> RankReport:
        """The report on a captured step, once its copies have arrived: the checks that need them."""
        if captured.event is not None:
            captured.event.synchronize()
        report, values = captured.report, captured.words.tolist()
        params, states = len(captured.param_turn), len(captured.state_turn)
        for position, value in zip(captured.param_turn, values[:params], strict=True):
            self._param_fingerprints[position] = value
        for position, value in zip(captured.state_turn, values[params : params + states], strict=True):
            self._state_fingerprints[position] = value
        if self.config.enabled(Check.FINGERPRINT):
            compared = [0 if i in self.uncompared else v for i, v in enumerate(self._param_fingerprints)]
            report.fingerprints = [*compared, *self._state_fingerprints]
        report.data_digest = self._data_order(values[params + states : params + states + captured.batches])
        report.grad_norm, report.loss = (_bits_float(bits) for bits in values[-2:])
        if self.config.enabled(Check.NONFINITE):
            # The loss first: NaN spreads to every rank's gradient, a rank's own loss shows where from.
            measured = (
                ("loss", report.loss, captured.loss),
                ("gradient norm", report.grad_norm, captured.grad),
            )
            for what, value, present in measured:
                if present and not math.isfinite(value):
                    report.fail(Check.NONFINITE, f"{what} is {value}")
        if self.config.enabled(Check.SPIKE):
            for what, value, history in (
                ("gradient norm", report.grad_norm, self._grad_history),
                ("loss", report.loss, self._loss_history),
            ):
                if math.isfinite(value) and value > 0 and history.observe(math.log(value)):
                    median = math.exp(history.baseline() or 0.0)
                    report.fail(Check.SPIKE, f"{what} {value:.4g} against a recent median of {median:.4g}")
        mismatches = captured.samples.judge()
        written = [m for m in mismatches if m.between and m.field == "update"]
        if written and self.config.enabled(Check.OUTSIDE):
            report.fail(Check.OUTSIDE, written[0].describe())
        changed = [m for m in mismatches if m.field == "gradient"]
        if changed and self.config.enabled(Check.GRADIENT_PATH):
            report.fail(Check.GRADIENT_PATH, changed[0].describe())
        others = [m for m in mismatches if not (m.between and m.field == "update") and m.field != "gradient"]
        if others and self.config.enabled(Check.UPDATE):
            report.fail(Check.UPDATE, others[0].describe())
        return report

    def _fingerprint_states(self, params: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """One fingerprint per parameter of all its optimizer state (0 for none), taken together."""
        tensors: list[torch.Tensor] = []
        counts: list[int] = []
        for param in params:
            state = self._optimizer.state.get(param, {})
            found = [state[key] for key in sorted(state) if isinstance(state[key], torch.Tensor)]
            tensors.extend(found)
            counts.append(len(found))
        totals = torch.zeros(len(params), dtype=torch.int64, device=device)
        if not tensors:
            return totals
        weights, owners = self._state_layout(tuple(counts), device)
        prints = self._fingerprinter.of(tensors).to(device)
        return totals.index_add_(0, owners, prints * weights)

    def _state_layout(
        self, counts: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each state tensor's weight (its position in its parameter's state: exp_avg and exp_avg_sq
        swapped must show) and owner; made once per layout, since a copy to a GPU would wait."""
        layout = self._state_layouts.get((counts, device))
        if layout is None:
            weights = [2 * position + 1 for count in counts for position in range(1, count + 1)]
            owners = [slot for slot, count in enumerate(counts) for _ in range(count)]
            layout = (
                torch.tensor(weights, dtype=torch.int64).to(device),
                torch.tensor(owners, dtype=torch.int64).to(device),
            )
            if len(self._state_layouts) >= _STATE_LAYOUTS_KEPT:
                del self._state_layouts[next(iter(self._state_layouts))]
            self._state_layouts[(counts, device)] = layout
        return layout

    def _data_order(self, batches: Sequence[int]) -> int:
        """The running data-order digest, extended by a step's batches: exact, and signed int64."""
        digest = self._data_digest
        for batch in batches:
            digest = (digest * 0x100000001B3 + batch) % (1 << 64)
        self._data_digest = digest
        return digest - (1 << 64) if digest >= 1 << 63 else digest


def gradient_norm(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The gradient's norm, left on its device."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    norm: torch.Tensor = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return norm


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])
