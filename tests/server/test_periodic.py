"""The background loop the server's workers run (webhook delivery, silence watch): a failing turn is
logged once per kind of failure and never ends the loop; a busy turn is followed at once by another."""

from __future__ import annotations

import logging
import threading

import pytest

from trainguard.errors import StoreError
from trainguard.server._periodic import Periodic

LOG = logging.getLogger("tests.periodic")


def test_failures_are_logged_once_per_kind_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    script: list[object] = [
        StoreError("database down"),
        StoreError("database down"),
        ValueError("a bug"),
        StoreError("database down"),
        True,
        True,
        False,
    ]
    turns: list[object] = []
    done = threading.Event()

    def turn() -> bool:
        step = script[len(turns)] if len(turns) < len(script) else False
        turns.append(step)
        if len(turns) == len(script):
            done.set()
        if isinstance(step, Exception):
            raise step
        return bool(step)

    loop = Periodic("test-loop", "test loop", turn, 0.01, LOG)
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        loop.start()
        assert done.wait(60), f"the loop stopped after {len(turns)} turns"
        loop.stop()
    assert loop.stopping
    said = [record.getMessage() for record in caplog.records]
    assert said == ["test loop: database down", "test loop: ValueError", "test loop: database down"]


def test_a_busy_turn_is_followed_at_once_and_stop_ends_a_pause() -> None:
    busy_turns = 50
    turns: list[int] = []
    done = threading.Event()

    def turn() -> bool:
        turns.append(1)
        if len(turns) > busy_turns:
            done.set()
        return len(turns) <= busy_turns

    # A pause of an hour: every turn but the last must follow without one, or the test would time out.
    loop = Periodic("test-loop", "test loop", turn, 3600.0, LOG)
    loop.start()
    assert done.wait(60)
    loop.stop(timeout=60)
    assert loop._thread is not None and not loop._thread.is_alive()
    assert len(turns) == busy_turns + 1
