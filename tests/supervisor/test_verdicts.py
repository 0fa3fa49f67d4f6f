"""The supervisor's verdict on the guards' report stream, as a pure function of reports and time."""

from __future__ import annotations

import pytest

from trainguard.supervisor._verdicts import GuardVerdicts, parse_report

CHECKS = ["code", "update"]


def report(step: int, stop: list[str] | None = None, checks: list[str] = CHECKS) -> object:
    return parse_report({"step": step, "stop": stop or [], "alert": [], "detail": "d", "checks": checks})


def test_a_failed_stop_check_is_recorded_and_stops_only_if_the_job_goes_on() -> None:
    verdicts = GuardVerdicts()
    (alarm,) = verdicts.observe(1, report(10, ["code"]), 0.0)  # type: ignore[arg-type]
    assert (alarm.kind, alarm.rank, alarm.check, alarm.stop) == ("failed", 1, "code", False)
    assert verdicts.observe(0, report(11), 0.1) == []  # type: ignore[arg-type]
    (alarm,) = verdicts.observe(0, report(12), 0.2)  # type: ignore[arg-type]
    assert (alarm.kind, alarm.rank, alarm.stop) == ("not-stopped", 1, True)


def test_dropped_checks_stop() -> None:
    verdicts = GuardVerdicts()
    verdicts.observe(0, report(1), 0.0)  # type: ignore[arg-type]
    (alarm,) = verdicts.observe(0, report(2, checks=["update"]), 0.1)  # type: ignore[arg-type]
    assert (alarm.kind, alarm.check, alarm.stop) == ("checks-dropped", "code", True)


def test_a_guard_behind_its_peers_and_silent_is_named_after_its_patience() -> None:
    verdicts = GuardVerdicts(min_silence_s=5.0)
    for step in range(1, 10):
        verdicts.observe(0, report(step), step * 0.1)  # type: ignore[arg-type]
        verdicts.observe(1, report(step), step * 0.1)  # type: ignore[arg-type]
    verdicts.observe(0, report(10), 1.0)  # type: ignore[arg-type]
    assert verdicts.tick(5.0, [0, 1]) == []
    (alarm,) = verdicts.tick(6.0, [0, 1])
    assert (alarm.kind, alarm.rank, alarm.step, alarm.stop) == ("silent", 1, 9, True)
    assert verdicts.tick(7.0, [0, 1]) == []  # once
    assert verdicts.tick(7.0, [0]) == []


def test_a_guard_closed_while_a_peer_goes_on_is_named_and_a_common_end_is_not() -> None:
    verdicts = GuardVerdicts()
    verdicts.observe(0, report(9), 0.0)  # type: ignore[arg-type]
    verdicts.observe(1, report(9), 0.0)  # type: ignore[arg-type]
    assert verdicts.closed(1) == []
    (alarm,) = verdicts.observe(0, report(10), 0.1)  # type: ignore[arg-type]
    assert (alarm.kind, alarm.rank, alarm.step) == ("closed", 1, 9)
    ending = GuardVerdicts()
    for rank in (0, 1):
        ending.observe(rank, report(50), 1.0)  # type: ignore[arg-type]
    assert ending.closed(0) == [] and ending.closed(1) == []


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"step": -1},
        {"step": True},
        {"step": 1, "stop": "code"},
        {"step": 1, "stop": [1]},
        {"step": 1, "detail": 3},
    ],
)
def test_malformed_reports_are_refused(payload: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_report(payload)
