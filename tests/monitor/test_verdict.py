"""The verdict drawn from every rank's report: the same on every rank, naming the odd rank out."""

from __future__ import annotations

import math

from trainguard.monitor._checks import Action, Check
from trainguard.monitor._verdict import RankReport, decide, slow_ranks

NAMES = ["w", "b", "state of w", "state of b"]


def _reports(*fingerprints: tuple[int, ...], norm: float = 1.5) -> list[RankReport]:
    return [RankReport(step=7, grad_norm=norm, fingerprints=prints) for prints in fingerprints]


def _decide(reports: list[RankReport], groups: list[list[int]] | None = None) -> list:  # type: ignore[type-arg]
    return decide(reports, replica_groups=groups or [list(range(len(reports)))], slot_names=NAMES)


def test_reports_survive_packing() -> None:
    report = RankReport(step=3, grad_norm=2.5, loss=math.inf, data_us=9, forward_us=8, optimizer_us=7)
    report.fail(Check.UPDATE, "update of w[3] moved by +1")
    report.fail(Check.CODE, "é" * 500)
    report.fingerprints = (1, -2, 2**63 - 1, -(2**63))
    back = RankReport.unpack(report.pack())
    assert (back.step, back.grad_norm, back.loss, back.forward_us) == (3, 2.5, math.inf, 8)
    assert back.details[Check.UPDATE] == "update of w[3] moved by +1"
    assert back.details[Check.CODE].startswith("éé")
    assert back.fingerprints == report.fingerprints
    assert back.failed(Check.UPDATE) and back.failed(Check.CODE) and not back.failed(Check.OUTSIDE)
    assert len(report.pack()) == len(RankReport(step=1, fingerprints=(0, 0, 0, 0)).pack())


def test_equal_replicas_pass() -> None:
    assert _decide(_reports((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4))) == []


def test_the_odd_replica_is_named_by_majority() -> None:
    [failure] = _decide(_reports((1, 2, 3, 4), (1, 9, 3, 4), (1, 2, 3, 4)))
    assert (failure.check, failure.ranks, failure.step, failure.action) == (
        Check.FINGERPRINT,
        (1,),
        7,
        Action.STOP,
    )
    assert "rank 1" in failure.message and "first b" in failure.message


def test_two_disagreeing_replicas_name_the_one_with_local_evidence() -> None:
    reports = _reports((1, 2, 3, 4), (1, 9, 3, 4))
    reports[1].fail(Check.UPDATE, "direction flipped")
    failures = _decide(reports)
    assert [f.check for f in failures] == [Check.FINGERPRINT, Check.UPDATE]
    assert all(f.ranks == (1,) for f in failures)


def test_two_disagreeing_replicas_without_evidence_name_nobody() -> None:
    [failure] = _decide(_reports((1, 2, 3, 4), (1, 9, 3, 4)))
    assert failure.ranks == ()
    assert "no majority" in failure.message


def test_replicas_are_compared_only_within_their_group() -> None:
    # Hybrid sharding: ranks 0 and 1 hold one shard, 2 and 3 another.
    reports = _reports((1, 2, 3, 4), (1, 2, 3, 4), (5, 6, 7, 8), (5, 6, 7, 8))
    assert _decide(reports, [[0, 2], [1, 3]]) != []
    assert _decide(reports, [[0, 1], [2, 3]]) == []


def test_a_different_reduced_gradient_is_named() -> None:
    reports = _reports((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4))
    reports[2].grad_norm = 1.25
    [failure] = _decide(reports)
    assert (failure.check, failure.ranks) == (Check.GRADIENT, (2,))


def test_every_rank_stalling_together_is_only_an_alert() -> None:
    reports = _reports((), ())
    for report in reports:
        report.fail(Check.STEP_TIME, "300 ms off-CPU in the optimizer")
    [failure] = decide(reports, replica_groups=[], slot_names=[])
    assert failure.action is Action.ALERT
    assert "every rank slowed down together" in failure.message


def test_one_rank_stalling_is_named_with_its_detail() -> None:
    reports = _reports((), (), ())
    reports[1].fail(Check.STEP_TIME, "200 ms off-CPU in the optimizer")
    [failure] = decide(reports, replica_groups=[], slot_names=[])
    assert (failure.ranks, failure.action) == ((1,), Action.STOP)
    assert failure.message.endswith("200 ms off-CPU in the optimizer")


def test_nan_is_traced_to_the_rank_whose_loss_was_not_finite() -> None:
    reports = _reports((), (), norm=math.nan)
    for report in reports:
        report.fail(Check.NONFINITE, "gradient norm is nan")
    reports[1].loss = math.nan
    reports[0].loss = 0.5
    [failure] = decide(reports, replica_groups=[], slot_names=[])
    assert failure.ranks == (1,)


def test_actions_can_be_changed_per_check() -> None:
    reports = _reports((), ())
    reports[0].fail(Check.CODE, "hook added")
    [failure] = decide(reports, replica_groups=[], slot_names=[], actions={Check.CODE: Action.ALERT})
    assert failure.action is Action.ALERT


def _timed(*milliseconds: int) -> list[RankReport]:
    return [RankReport(step=4, compute_us=ms * 1000) for ms in milliseconds]


def test_compute_time_survives_packing() -> None:
    assert RankReport.unpack(RankReport(step=1, compute_us=123456).pack()).compute_us == 123456


def test_the_straggler_is_named_by_its_compute_against_its_peers_when_it_comes_back() -> None:
    for times, straggler in (((10, 400), 1), ((11, 12, 10, 300), 3), ((250, 9, 10), 0)):
        reports = _timed(*times)
        assert slow_ranks(reports, 50_000) == (straggler,)
        # Slow once: a garbage collection or a background thread's burst is not named.
        assert decide(reports, replica_groups=[], slot_names=[]) == []
        failures = decide(reports, replica_groups=[], slot_names=[], stragglers=[straggler])
        assert [(f.check, f.ranks, f.action) for f in failures] == [
            (Check.STEP_TIME, (straggler,), Action.STOP)
        ]
        assert f"rank {straggler} computed step 4 far slower than its peers" in failures[0].message


def test_ranks_within_three_times_or_the_floor_of_each_other_are_no_stragglers() -> None:
    for times in ((100, 250), (10, 55), (400, 400), (0, 900), (5,)):
        assert slow_ranks(_timed(*times), 50_000) == ()
    assert slow_ranks(_timed(10, 400), 500_000) == ()


def test_slow_ranks_sort_once_and_agree_with_each_ranks_own_peer_median() -> None:
    # Each rank's peers' median comes from one sorted list (a job of thousands must not sort its
    # peers once per rank): the same ranks as the median taken rank by rank, ties included.
    import random
    import statistics

    generator = random.Random(4)
    for _ in range(300):
        count = generator.randint(2, 40)
        times = [generator.choice([1, 5, 5, 9, 20, 400, 400, 2000]) * 1000 for _ in range(count)]
        expected = tuple(
            rank
            for rank, own in enumerate(times)
            if own > 3 * (peers := statistics.median(times[:rank] + times[rank + 1 :]))
            and own - peers > 50_000
        )
        assert slow_ranks(_timed(*(t // 1000 for t in times)), 50_000) == expected, times
