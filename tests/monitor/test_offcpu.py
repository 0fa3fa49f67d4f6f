"""Off-CPU time from the scheduler's per-thread accounting, and the change-point rule."""

from __future__ import annotations

import sys
import time

import pytest

from trainguard.monitor._offcpu import ChangePoint, OffCpuClock


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="schedstat is Linux's")
def test_sleep_is_off_cpu_and_work_is_not() -> None:
    clock = OffCpuClock()
    assert clock.available
    clock.mark()
    time.sleep(0.05)
    slept = clock.mark()
    total = 0
    for number in range(200_000):
        total += number * number
    worked = clock.mark()
    assert slept >= 45_000_000
    # Busy work is on the CPU; what remains off it is scheduling noise, far below the sleep.
    assert worked < slept / 2


def test_change_point_learns_then_flags_a_jump() -> None:
    rule = ChangePoint(floor=50.0, warmup=5)
    assert not any(rule.observe(value) for value in [3, 5, 4, 6, 5, 4, 5])
    assert rule.observe(205)
    # A flagged value stays out of the history: a run of attacks cannot become the baseline.
    assert rule.observe(205)
    assert rule.baseline() == 5


def test_change_point_ignores_jumps_below_the_floor_and_within_the_spread() -> None:
    rule = ChangePoint(floor=50.0, spread=8.0, warmup=5)
    for value in [100, 140, 60, 120, 80, 100, 130]:
        rule.observe(value)
    assert not rule.observe(140)
    assert not rule.observe(149)


def test_nothing_is_flagged_during_warm_up() -> None:
    rule = ChangePoint(floor=1.0, warmup=5)
    assert not any(rule.observe(value) for value in [0, 1000, 0, 5000, 0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="schedstat is Linux's")
def test_a_thread_id_reused_after_its_thread_ended_reads_the_new_thread() -> None:
    # The kept descriptor names the thread that opened it: once that thread ended it reads zeros.
    import threading

    from trainguard.monitor import _offcpu

    ended = threading.Thread(target=_offcpu.own_time_ns)
    ended.start()
    ended.join()
    (stale,) = set(_offcpu._descriptors) - {threading.get_native_id()}
    fd = _offcpu._descriptors.pop(stale)
    _offcpu._descriptors[threading.get_native_id()] = fd  # as if this thread had been given its id
    ran, _ = _offcpu._schedstat()
    assert ran > 0  # the ended thread's descriptor reads 0: it was dropped and this thread's opened
