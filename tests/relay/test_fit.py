"""Events larger than the server takes are split by their rows, or replaced by a stand-in that names them:
never sent whole to be refused again and again, holding up every event behind them."""

from __future__ import annotations

import hashlib

from trainguard.ledger import new_event
from trainguard.relay._fit import MAX_EVENT_BYTES, fit


def _steps(rows: int, width: int) -> list[list[object]]:
    return [[step, 0.5, ["%016x" % (step * 1000 + rank) for rank in range(width)]] for step in range(rows)]


def test_a_small_event_is_left_alone() -> None:
    event = new_event("monitor.steps", {"columns": ["step"], "rows": _steps(3, 2)}, run_id="r")
    assert fit(event) == [event]


def test_per_step_summaries_of_a_large_job_are_split_by_rows_in_order() -> None:
    rows = _steps(100, 128)  # 100 steps of 128 ranks: about 250 kB
    event = new_event(
        "monitor.steps", {"columns": ["step", "loss", "digests"], "rows": rows}, run_id="r", rank=0
    )
    assert len(event.canonical()) > MAX_EVENT_BYTES
    parts = fit(event)
    assert len(parts) > 1
    assert all(len(part.canonical()) <= MAX_EVENT_BYTES for part in parts)
    assert [row for part in parts for row in part.payload["rows"]] == rows
    assert [part.payload["part"] for part in parts] == [[i + 1, len(parts)] for i in range(len(parts))]
    assert all(part.payload["columns"] == ["step", "loss", "digests"] for part in parts)
    assert {(part.type, part.run_id, part.rank, part.actor, part.time) for part in parts} == {
        (event.type, event.run_id, event.rank, event.actor, event.time)
    }


def test_an_event_that_cannot_be_split_is_replaced_by_one_that_names_it() -> None:
    event = new_event("run.attest", {"attestation": {"blob": "x" * 100_000}}, run_id="r")
    (stand_in,) = fit(event)
    assert stand_in.type == "run.attest.too_large"
    assert stand_in.payload["bytes"] == len(event.canonical())
    assert stand_in.payload["sha256"] == hashlib.sha256(event.canonical()).hexdigest()
    # A single row too large: the rows cannot help either.
    huge_row = new_event("monitor.steps", {"rows": [["y" * 70_000], ["z"]]}, run_id="r")
    assert [part.type for part in fit(huge_row)] == ["monitor.steps.too_large"]
