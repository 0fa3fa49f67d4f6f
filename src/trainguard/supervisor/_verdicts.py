"""The supervisor's own verdict on the guards' per-step reports: evidence that has left the job.

Every check of `trainguard.watch` runs inside the training process, where a saboteur can switch it off
(`guard._active = False`, `close()`, its hooks removed, its checks emptied) or patch the function that
draws the verdict. So each rank's guard also sends the supervisor, at every step, what it found: the
step, the checks that failed (by action), the first detail and the checks it runs. The supervisor, a
process the job's code cannot patch, records and judges that stream:

- a check whose action is "stop" failed on a rank: recorded at once (`run.guard_alarm`, naming the rank
  and the check); if the job is still stepping two steps later, the guard's own verdict was not carried
  out, and the supervisor stops the job;
- a rank runs fewer checks than it started with: stop;
- a rank's guard is closed while its peers' guards are further on: stop;
- a rank's guard falls behind its peers' and sends nothing for `max(min_silence_s, 3 step intervals)`:
  its guard was switched off, closed or hung; the peers are waiting for it in the guard's all-gather.
  Stop, naming the rank.

What an in-process saboteur can still do is written in the README: he can forge the stream as well as
silence it, but forging it means keeping every report clean and in step while the job goes on.
Standard library only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

__all__ = ["Alarm", "GuardVerdicts", "parse_report"]

_MAX_CHECKS = 32


@dataclasses.dataclass(frozen=True)
class Report:
    step: int
    stop: tuple[str, ...]
    alert: tuple[str, ...]
    detail: str
    checks: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Alarm:
    """One thing the supervisor saw in the guards' reports; `stop` says whether it stops the job."""

    kind: str  # "failed", "not-stopped", "checks-dropped", "closed", "silent"
    rank: int
    step: int
    check: str | None
    message: str
    stop: bool

    def payload(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "rank": self.rank,
            "step": self.step,
            "check": self.check,
            "message": self.message,
        }


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > _MAX_CHECKS or not all(isinstance(v, str) for v in value):
        raise ValueError("a report's check list is not a short list of names")
    return tuple(value)


def parse_report(payload: Mapping[str, object]) -> Report:
    """A guard report's payload; ValueError unless it has exactly the expected fields."""
    step, detail = payload.get("step"), payload.get("detail", "")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError("a report without a step")
    if not isinstance(detail, str):
        raise ValueError("a report's detail is not text")
    return Report(
        step,
        _names(payload.get("stop", [])),
        _names(payload.get("alert", [])),
        detail,
        frozenset(_names(payload.get("checks", []))),
    )


@dataclasses.dataclass
class _Guard:
    step: int
    last: float
    checks: frozenset[str]
    interval: float = 0.0  # smoothed seconds between reports
    silent_alarmed: bool = False


class GuardVerdicts:
    """Feed it reports (`observe`) and the time (`tick`); both return the alarms they raise."""

    def __init__(self, *, min_silence_s: float = 5.0) -> None:
        self._min_silence = min_silence_s
        self._guards: dict[int, _Guard] = {}
        self._failed: dict[tuple[int, str], int] = {}  # (rank, check) -> the step it failed at
        self._followed: set[tuple[int, str]] = set()
        self._closed: dict[int, int] = {}  # rank -> the step its guard was closed at

    def observe(self, rank: int, report: Report, now: float) -> list[Alarm]:
        alarms: list[Alarm] = []
        guard = self._guards.get(rank)
        if guard is None:
            guard = self._guards[rank] = _Guard(report.step, now, report.checks)
        else:
            if report.step > guard.step:
                gap = (now - guard.last) / (report.step - guard.step)
                guard.interval = gap if not guard.interval else 0.8 * guard.interval + 0.2 * gap
            guard.step, guard.last = max(guard.step, report.step), now
            guard.silent_alarmed = False
            dropped = sorted(guard.checks - report.checks)
            if dropped:
                guard.checks = report.checks
                names = ", ".join(dropped)
                message = f"the guard of rank {rank} stopped running checks {names} at step {report.step}"
                alarms.append(Alarm("checks-dropped", rank, report.step, dropped[0], message, True))
        for check in report.stop:
            if (rank, check) not in self._failed:
                self._failed[(rank, check)] = report.step
                message = f"rank {rank} failed the {check} check at step {report.step}: {report.detail}"
                alarms.append(Alarm("failed", rank, report.step, check, message, False))
        for check in report.alert:
            if (rank, check) not in self._failed:
                self._failed[(rank, check)] = -1  # alerts are recorded once, never stop
                message = f"rank {rank} raised the {check} alert at step {report.step}: {report.detail}"
                alarms.append(Alarm("failed", rank, report.step, check, message, False))
        alarms.extend(self._unheeded(report.step))
        alarms.extend(self._closed_behind())
        return alarms

    def _unheeded(self, step: int) -> list[Alarm]:
        """A stop that the guards in the job did not carry out: the job is two steps further on."""
        alarms = []
        for (rank, check), failed_at in self._failed.items():
            if failed_at >= 0 and step >= failed_at + 2 and (rank, check) not in self._followed:
                self._followed.add((rank, check))
                message = (
                    f"rank {rank} failed the {check} check at step {failed_at}, yet the job reached step "
                    f"{step}: the guard's own verdict was not carried out"
                )
                alarms.append(Alarm("not-stopped", rank, step, check, message, True))
        return alarms

    def closed(self, rank: int) -> list[Alarm]:
        """A rank's guard said goodbye: an alarm once a peer's guard is further on (now or later)."""
        guard = self._guards.get(rank)
        if guard is not None:
            self._closed[rank] = guard.step
        return self._closed_behind()

    def _closed_behind(self) -> list[Alarm]:
        alarms = []
        for rank, step in list(self._closed.items()):
            ahead = max((g.step for r, g in self._guards.items() if r != rank), default=step)
            if ahead > step:
                del self._closed[rank]
                self._guards[rank].silent_alarmed = True
                message = f"the guard of rank {rank} was closed at step {step}; others reached step {ahead}"
                alarms.append(Alarm("closed", rank, step, None, message, True))
        return alarms

    def tick(self, now: float, running: Sequence[int]) -> list[Alarm]:
        """Alarms for guards of running ranks that fell silent behind their peers."""
        alarms: list[Alarm] = []
        steps = [g.step for r, g in self._guards.items() if r in running]
        if len(steps) < 2:
            return alarms
        ahead = max(steps)
        for rank, guard in self._guards.items():
            if rank not in running or guard.step >= ahead or guard.silent_alarmed:
                continue
            patience = max(self._min_silence, 3 * guard.interval)
            silent = now - guard.last
            if silent >= patience:
                guard.silent_alarmed = True
                message = (
                    f"the guard of rank {rank} has sent nothing for {silent:.1f} s since step {guard.step}, "
                    f"while other ranks reached step {ahead}: it was switched off, closed or hung"
                )
                alarms.append(Alarm("silent", rank, guard.step, None, message, True))
        return alarms
