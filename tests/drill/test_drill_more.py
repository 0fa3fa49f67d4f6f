"""The incident's attacks added to groups b and f, played by `trainguard drill` as a user runs it: a
gradient flipped before the all-reduce, busy-waits in the optimizer step, the guard switched off from
inside, and the ledger rolled back under a running witness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from trainguard.drill._attacks import build, select

pytestmark = pytest.mark.torch

MORE = [
    "grad-flipped-before-allreduce-one-rank",
    "busy-wait-one-rank",
    "guard-switched-off",
    "ledger-rolled-back",
]
# The drill's run (its exit status and output) and its scorecard's attacks by name.
Drill = tuple[subprocess.CompletedProcess[str], dict[str, Any]]


def test_the_attacks_sit_in_their_groups() -> None:
    attacks = build(2)
    names = [a.name for a in attacks]
    assert [a.name for a in select(attacks, MORE)] == MORE
    assert {a.group for a in select(attacks, MORE)} == {"b", "f"}
    # Group b's attacks stand together; the rollback comes after the truncation.
    b = [i for i, a in enumerate(attacks) if a.group == "b"]
    assert b == list(range(b[0], b[-1] + 1))
    assert names.index("ledger-rolled-back") == names.index("ledger-truncated") + 1


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Drill:
    out = tmp_path_factory.mktemp("report")
    home = tmp_path_factory.mktemp("user-home")
    command = [sys.executable, "-m", "trainguard", "drill", "--steps", "16", "--out", str(out), "--attacks"]
    done = subprocess.run(
        [*command, *MORE],
        capture_output=True,
        text=True,
        env={**os.environ, "TRAINGUARD_HOME": str(home)},
        timeout=1200,
        check=False,
    )
    report = json.loads((out / "drill.json").read_text())
    return done, {a["name"]: a for a in report["attacks"]}


def test_gradient_flipped_before_the_all_reduce_is_named_at_the_step_it_acts(
    drill: Drill,
) -> None:
    # The guard's hook state and its copy both set to -world: the hook divides by the group's own size
    # (nothing is flipped) and the state, compared with that size, names the rank at once.
    done, by_name = drill
    flipped = by_name["grad-flipped-before-allreduce-one-rank"]
    assert flipped["caught"] is True, done.stderr[-4000:]
    assert flipped["detected_by"] == "monitor: gradient_path"
    assert flipped["named"] == "rank(s) 1"
    assert flipped["steps_to_detection"] == 0
    assert "set to divide by -2" in flipped["details"]
    assert flipped["evidence"]["inclusion_proof_verified"] is True


def test_busy_waits_in_the_optimizer_step_are_named_by_the_compute_time(
    drill: Drill,
) -> None:
    # Spinning never leaves the CPU: the optimizer's CPU time, now part of the rank's compute, stops
    # the job at the busy-wait's second occurrence (steps 6 and 7 with the plant's seeded chance).
    done, by_name = drill
    busy = by_name["busy-wait-one-rank"]
    assert busy["caught"] is True, done.stderr[-4000:]
    assert busy["detected_by"] == "monitor: step_time"
    assert busy["named"] == "rank(s) 1"
    assert 0 <= busy["steps_to_detection"] <= 2
    assert "optimizer's CPU time" in busy["details"]


def test_guard_silenced_on_one_rank_cannot_hide_its_sabotage_from_the_peers(
    drill: Drill,
) -> None:
    # RankReport.fail made a no-op on rank 1 drops every finding of its own checks, and its learning
    # rate is then negated: its peers see its replica leave theirs at that very step, and with three
    # replicas their majority names it. (Silenced alone, it changes nothing the peers could see.)
    done, by_name = drill
    silenced = by_name["guard-switched-off"]
    assert silenced["caught"] is True, done.stderr[-4000:]
    assert silenced["named"] == "rank(s) 1"
    assert silenced["steps_to_detection"] == 0
    assert silenced["evidence"]["inclusion_proof_verified"] is True


def test_ledger_rolled_back_is_caught_by_the_running_witness(
    drill: Drill,
) -> None:
    done, by_name = drill
    rolled = by_name["ledger-rolled-back"]
    assert rolled["caught"] is True, done.stderr[-4000:]
    assert rolled["detected_by"] == "ledger verify against a running witness"
    assert rolled["named"].startswith("rollback: the witness has cosigned size ")
    assert "first bad index: " in rolled["named"]
    # Consistent inside: verify alone passes; only the witness sees it.
    assert "verify alone exit 0, with the witness exit 1" in rolled["details"]
    assert "4 of 4 attacks caught, 0 false alarm(s)" in done.stdout
    assert done.returncode == 0
