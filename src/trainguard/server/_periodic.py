"""A worker's background loop: one turn of work on a daemon thread, again at once while the turn found work,
else after a pause. A failing turn (the database is down) is logged once per kind of failure and tried
again after the pause: the loop never ends before `stop()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from trainguard.errors import TrainguardError

__all__ = ["Periodic"]


class Periodic:
    """Runs `turn` (True: it had work, go again) on a thread named `name`; failures go to `log` as
    "`what`: problem"."""

    def __init__(
        self, name: str, what: str, turn: Callable[[], bool], pause_s: float, log: logging.Logger
    ) -> None:
        self._name = name
        self._what = what
        self._turn = turn
        self._pause_s = pause_s
        self._log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_problem: str | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._turn_logged():
                self._stop.wait(self._pause_s)

    def _turn_logged(self) -> bool:
        try:
            busy = self._turn()
        except Exception as exc:  # an outage must not end the loop: say so once, try again after the pause
            problem = exc.diagnostics() if isinstance(exc, TrainguardError) else f"{type(exc).__name__}"
            if problem != self._last_problem:
                self._log.error("%s: %s", self._what, problem)
                self._last_problem = problem
            return False
        self._last_problem = None
        return busy
