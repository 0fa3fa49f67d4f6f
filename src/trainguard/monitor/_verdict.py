"""Per-rank step reports as fixed-size integer vectors, and the verdict every rank draws from them.

Each rank packs what it saw in a step into one vector of int64 (no pickle crosses the wire); one
all-gather gives every rank every vector, and `decide` is a pure function of them, so every rank
reaches the same verdict at the same step and stops together. Standard library only.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import struct
from collections import Counter
from collections.abc import Sequence

from trainguard.monitor._checks import DEFAULT_ACTIONS, Action, Check

__all__ = ["Failure", "RankReport", "decide", "report_length", "slow_ranks"]

_HEADER = 12
_DETAIL_WORDS = 96
_PER_CHECK_BYTES = 240
_DETAIL_BYTES = _DETAIL_WORDS * 8
_NO_VALUE = struct.unpack("<q", struct.pack("<d", math.nan))[0]

_DESCRIBE = {
    Check.FINGERPRINT: "parameters or optimizer state differ from the other replicas",
    Check.GRADIENT: "the reduced gradient differs from the other replicas",
    Check.UPDATE: "the optimizer's update is not what its rule gives",
    Check.CODE: "critical code or hooks were changed",
    Check.OUTSIDE: "parameters were changed outside a checked optimizer step",
    Check.NONFINITE: "NaN or Inf in the loss or gradient",
    Check.STEP_TIME: "a rank took unexplained time in its step (an off-CPU stall, or compute far above "
    "its history or its peers)",
    Check.DATA_WAIT: "unexplained off-CPU time between steps (data loading, I/O, a sleep)",
    Check.SPIKE: "loss or gradient norm far above its recent median",
    Check.IDENTITY: "the run config or environment differ from the other ranks",
    Check.SEED: "torch's initial seed differs from the other ranks",
    Check.LOST: "a rank left the monitor's all-gather",
    Check.HYPERPARAMETERS: "the optimizer's hyper-parameters changed outside a scheduler or differ",
    Check.SAMPLER: "a data sampler's seed or settings changed or differ between ranks",
    Check.GRADIENT_PATH: "the gradient was tampered with on its way from the backward pass to the optimizer",
    Check.DERIVATIVE: "the gradient of a rank's backward pass disagrees with its forward pass",
}
# When replicas disagree without a majority, a rank that failed one of these is the likely culprit.
_LOCAL_EVIDENCE = (
    Check.UPDATE,
    Check.CODE,
    Check.OUTSIDE,
    Check.NONFINITE,
    Check.STEP_TIME,
    Check.HYPERPARAMETERS,
    Check.SAMPLER,
    Check.GRADIENT_PATH,
    Check.DERIVATIVE,
)
# Digests every replica must share, each compared under its own check.
_AGREED = (
    (Check.HYPERPARAMETERS, "hyper_digest", "optimizer hyper-parameters"),
    (Check.SAMPLER, "sampler_digest", "data samplers' seed, epoch and settings"),
)
_TIMING = (Check.STEP_TIME, Check.DATA_WAIT)


def report_length(fingerprints: int) -> int:
    return _HEADER + _DETAIL_WORDS + fingerprints


@dataclasses.dataclass(slots=True)
class RankReport:
    """What one rank saw in one step."""

    step: int
    flags: int = 0
    grad_norm: float = math.nan
    loss: float = math.nan
    data_us: int = 0
    # A running digest of every input batch this rank has seen: its data order, for the ledger.
    data_digest: int = 0
    forward_us: int = 0
    optimizer_us: int = 0
    details: dict[Check, str] = dataclasses.field(default_factory=dict)
    fingerprints: Sequence[int] = ()
    hyper_digest: int = 0
    sampler_digest: int = 0
    # Own time (wall less waiting for a CPU) from the step's first forward pass until its gradient
    # was complete, before any wait for the other ranks, and the CPU time of the optimizer's update:
    # a straggler's is the longest.
    compute_us: int = 0

    def fail(self, check: Check, detail: str) -> None:
        self.details.setdefault(check, detail)
        self.flags |= check.bit

    def failed(self, check: Check) -> bool:
        return bool(self.flags & check.bit)

    def pack(self, length: int = 0) -> list[int]:
        """The report as int64 words, zero-padded to `length` (ranks guarding models of different
        shapes, pipeline stages say, must still send vectors of one length)."""
        # Each failed check's detail, cut to a fixed share: "check<US>text<RS>...".
        entries = [
            check.value.encode() + b"\x1f" + text.encode("utf-8", "replace")[:_PER_CHECK_BYTES]
            for check, text in self.details.items()
        ]
        raw = b"\x1e".join(entries)[:_DETAIL_BYTES].ljust(_DETAIL_BYTES, b"\0")
        header = [
            self.step,
            self.flags,
            _float_bits(self.grad_norm),
            _float_bits(self.loss),
            self.data_us,
            self.data_digest,
            self.forward_us,
            self.optimizer_us,
            len(self.fingerprints),
            self.hyper_digest,
            self.sampler_digest,
            self.compute_us,
        ]
        words = header + list(struct.unpack(f"<{_DETAIL_WORDS}q", raw)) + list(self.fingerprints)
        return words + [0] * (length - len(words))

    @classmethod
    def unpack(cls, words: Sequence[int]) -> RankReport:
        (
            step,
            flags,
            grad,
            loss,
            data_us,
            data_digest,
            forward_us,
            optimizer_us,
            count,
            hyper,
            sampler,
            compute,
        ) = words[:_HEADER]
        raw = struct.pack(f"<{_DETAIL_WORDS}q", *words[_HEADER : _HEADER + _DETAIL_WORDS])
        start = _HEADER + _DETAIL_WORDS
        return cls(
            step=step,
            flags=flags,
            grad_norm=_bits_float(grad),
            loss=_bits_float(loss),
            data_us=data_us,
            data_digest=data_digest,
            forward_us=forward_us,
            optimizer_us=optimizer_us,
            details=_details(raw.rstrip(b"\0")),
            fingerprints=tuple(words[start : start + count]),
            hyper_digest=hyper,
            sampler_digest=sampler,
            compute_us=compute,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """A check that failed at a step, the ranks at fault (empty when none can be singled out)."""

    check: Check
    ranks: tuple[int, ...]
    step: int
    message: str
    action: Action


def decide(
    reports: Sequence[RankReport],
    *,
    replica_groups: Sequence[Sequence[int]],
    slot_names: Sequence[str],
    actions: dict[Check, Action] | None = None,
    stragglers: Sequence[int] = (),
) -> list[Failure]:
    """Every failure in one step's reports, most specific first; the same on every rank.

    `stragglers` are the ranks the caller found slow against their peers (`slow_ranks()`) at this
    step and at a recent one: a one-off (a garbage collection, a background thread's burst) is not
    an attack on the job, a stall planted in its forward or backward pass comes back."""
    actions = {**DEFAULT_ACTIONS, **(actions or {})}
    step = max(report.step for report in reports)
    failures: list[Failure] = []
    for check in Check:
        if check in (Check.FINGERPRINT, Check.GRADIENT, Check.IDENTITY, Check.SEED):
            continue
        ranks = tuple(rank for rank, report in enumerate(reports) if report.failed(check))
        if not ranks:
            continue
        action = actions[check]
        if check is Check.NONFINITE:
            # NaN spreads to every rank through the gradient all-reduce; a rank whose own loss was not
            # finite is where it came from.
            origin = tuple(r for r in ranks if not math.isfinite(reports[r].loss))
            ranks = origin or ranks
        detail = reports[ranks[0]].details.get(check, "")
        message = f"{_DESCRIBE[check]} on {_ranks_phrase(ranks)} at step {step}: {detail}"
        if check in _TIMING and len(ranks) == len(reports) > 1:
            # Every rank slowed together: the machine or the network, not one rank's doing.
            action = Action.ALERT
            message = f"every rank slowed down together at step {step}: {detail}"
        failures.append(Failure(check, ranks, step, message, action))
    timed = next((f for f in failures if f.check is Check.STEP_TIME), None)
    if timed is None or timed.action is Action.ALERT:
        failures.extend(_stragglers(reports, step, tuple(stragglers), actions[Check.STEP_TIME]))
    evidence = {rank for rank, report in enumerate(reports) if any(report.failed(c) for c in _LOCAL_EVIDENCE)}
    for group in replica_groups:
        failures.extend(_compare_replicas(reports, group, slot_names, step, evidence, actions))
    order = {check: position for position, check in enumerate(Check)}
    return sorted(failures, key=lambda failure: order[failure.check])


def slow_ranks(reports: Sequence[RankReport], floor_us: int) -> tuple[int, ...]:
    """The ranks whose own compute took over three times their peers' median, and a floor more: a
    rank slowed on purpose (a busy-wait or a sleep in its forward or backward pass) holds every rank.
    One sort for all ranks: a job of thousands must not sort its peers once per rank."""
    times = [report.compute_us for report in reports]
    if len(times) < 2 or min(times) <= 0:
        return ()
    ordered = sorted(times)
    return tuple(
        rank
        for rank, own in enumerate(times)
        if own > 3 * (peers := _median_without(ordered, own)) and own - peers > floor_us
    )


def _median_without(ordered: Sequence[int], value: int) -> float:
    """The median of sorted `ordered` with one occurrence of `value` taken out."""
    gone = bisect.bisect_left(ordered, value)
    left = len(ordered) - 1

    def at(index: int) -> int:
        return ordered[index if index < gone else index + 1]

    middle = left // 2
    return float(at(middle)) if left % 2 else (at(middle - 1) + at(middle)) / 2


def _stragglers(
    reports: Sequence[RankReport], step: int, ranks: tuple[int, ...], action: Action
) -> list[Failure]:
    if not ranks:
        return []
    times = [report.compute_us for report in reports]
    own = times[ranks[0]]
    peers = _median_without(sorted(times), own)
    message = (
        f"{_ranks_phrase(ranks)} computed step {step} far slower than its peers, and did at a step just "
        f"before: {own / 1000:.0f} ms from the first forward pass to a complete gradient (with the "
        f"optimizer's CPU time), against a median of {peers / 1000:.0f} ms on the other ranks (a busy-wait "
        "or a sleep in the forward or backward pass, or a busy-wait in the optimizer step)"
    )
    return [Failure(Check.STEP_TIME, ranks, step, message, action)]


def _compare_replicas(
    reports: Sequence[RankReport],
    group: Sequence[int],
    slot_names: Sequence[str],
    step: int,
    evidence: set[int],
    actions: dict[Check, Action],
) -> list[Failure]:
    if len(group) < 2:
        return []
    failures = _compare_agreed(reports, group, step, actions)
    fingerprint_odd: dict[int, list[str]] = {}
    tied: list[str] = []
    first = reports[group[0]].fingerprints
    # Equal on every replica (the usual case, compared at C speed): no slot has an odd one out.
    differ = any(reports[rank].fingerprints != first for rank in group[1:])
    for slot, name in enumerate(slot_names if differ else ()):
        values = [_slot(reports[rank], slot) for rank in group]
        odd = _odd_ones(values)
        if odd is None:
            tied.append(name)
            continue
        for position in odd:
            fingerprint_odd.setdefault(group[position], []).append(name)
    if fingerprint_odd or tied:
        total = len(slot_names)
        failures.append(_fingerprint_failure(group, fingerprint_odd, tied, total, step, evidence, actions))
    norms = [_float_bits(reports[rank].grad_norm) for rank in group]
    odd = _odd_ones(norms)
    if odd is None or odd:
        ranks = tuple(group[p] for p in odd) if odd else tuple(sorted(evidence & set(group)))
        message = f"{_DESCRIBE[Check.GRADIENT]} on {_ranks_phrase(ranks)} at step {step}"
        if odd is None and not ranks:
            everyone = _ranks_phrase(tuple(group))
            message = f"the reduced gradient differs between {everyone} at step {step}, no majority"
        failures.append(Failure(Check.GRADIENT, ranks, step, message, actions[Check.GRADIENT]))
    return failures


def _compare_agreed(
    reports: Sequence[RankReport], group: Sequence[int], step: int, actions: dict[Check, Action]
) -> list[Failure]:
    failures = []
    for check, field, what in _AGREED:
        if any(reports[rank].failed(check) for rank in group):
            continue  # the rank that changed its own already said so, by name
        odd = _odd_ones([getattr(reports[rank], field) for rank in group])
        if odd == []:
            continue
        ranks = tuple(group[p] for p in odd) if odd else ()
        who = _ranks_phrase(ranks) if ranks else "the ranks (no majority)"
        message = f"the {what} of {who} differ from the other replicas' at step {step}"
        failures.append(Failure(check, ranks, step, message, actions[check]))
    return failures


def _fingerprint_failure(
    group: Sequence[int],
    odd: dict[int, list[str]],
    tied: list[str],
    total: int,
    step: int,
    evidence: set[int],
    actions: dict[Check, Action],
) -> Failure:
    if odd:
        ranks = tuple(sorted(odd))
        names = odd[ranks[0]]
        what = f"{len(names)} of {total} tensors, first {names[0]}"
        message = f"{_DESCRIBE[Check.FINGERPRINT]} on {_ranks_phrase(ranks)} at step {step} ({what})"
        return Failure(Check.FINGERPRINT, ranks, step, message, actions[Check.FINGERPRINT])
    suspects = tuple(sorted(evidence & set(group)))
    everyone = _ranks_phrase(tuple(group))
    message = f"replicas {everyone} disagree at step {step} ({len(tied)} tensors, first {tied[0]})"
    if suspects:
        message += f", and {_ranks_phrase(suspects)} also failed a local check"
    else:
        message += "; no majority names one rank"
    return Failure(Check.FINGERPRINT, suspects, step, message, actions[Check.FINGERPRINT])


def _odd_ones(values: Sequence[int]) -> list[int] | None:
    """Positions that differ from the strict majority; None when there is no strict majority."""
    counts = Counter(values)
    value, count = counts.most_common(1)[0]
    if count == len(values):
        return []
    if count * 2 <= len(values):
        return None
    return [position for position, v in enumerate(values) if v != value]


def _details(raw: bytes) -> dict[Check, str]:
    details: dict[Check, str] = {}
    for entry in raw.split(b"\x1e"):
        name, _, text = entry.partition(b"\x1f")
        try:
            check = Check(name.decode("ascii", "replace"))
        except ValueError:
            continue
        details[check] = text.decode("utf-8", "replace")
    return details


def _slot(report: RankReport, slot: int) -> int:
    return report.fingerprints[slot] if slot < len(report.fingerprints) else _NO_VALUE


def _ranks_phrase(ranks: tuple[int, ...]) -> str:
    if not ranks:
        return "no single rank"
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(str(rank) for rank in ranks)


def _float_bits(value: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])
