"""Runs that fell silent: a job that stops talking to the server without having ended is an alarm.

A saboteur who kills a job's supervisor, its reporting rank or its delivery thread leaves no event behind
to say so. What the server can see is the silence. A job's delivery thread talks to the server at least
once a minute (a batch of events, or a bodyless ``POST /api/v1/runs/{run}/alive`` when it has none: see
`trainguard.relay._delivery`); each such request stamps the run's row in ``server_run_contact`` with the
database's clock (`stamp`).

Every worker runs a `SilenceWatch`: it looks for runs whose last contact is older than `silent_after_s`,
that started (``run.start`` or ``monitor.start``: a `trainguard sign` reporting on its own is no job to
fall silent) and that have not ended (no ``run.end`` or ``monitor.end``). It appends a
``server.run_silent`` event to each, signed like every entry: the run reads "alarmed" on the dashboard,
the webhooks that ask for alerts get it, and the log keeps it. The event's key is ``server:silent:`` and
the last contact's time in microseconds, so workers or hosts judging the same silence append one event;
a run heard from again and silent again gets a second. Jobs cannot send keys starting ``server:`` or
types starting ``server.``.

A worker judges only once it has itself been up for `silent_after_s`: a server that was down, and so heard
nothing, must not take its own outage for the jobs' silence.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time

from trainguard.ledger._events import new_event
from trainguard.server._eventkeys import EventKeys, KeyConflict
from trainguard.server._eventtypes import END_TYPES, START_TYPES, any_of_query
from trainguard.server._periodic import Periodic
from trainguard.server._sidetables import CONTACT, SideDb

__all__ = [
    "RESERVED_KEY_PREFIX",
    "RESERVED_TYPE_PREFIX",
    "SILENT_TYPE",
    "SilenceWatch",
    "stamp",
]

_LOG = logging.getLogger("trainguard.server")
SILENT_TYPE = "server.run_silent"
RESERVED_KEY_PREFIX = "server:"
RESERVED_TYPE_PREFIX = "server."
_SWEEP_ROWS = 200
_TOKEN_ID = "server"
"""The token id recorded for the server's own entries: no token sent them."""


def stamp(db: SideDb, run: str, granularity_s: float) -> None:
    """Record that `run`'s job was heard from now; a stamp less than `granularity_s` old is left as it is,
    so a busy job costs a write every few seconds, not one per batch."""
    db.write(
        f"INSERT INTO {CONTACT} (run, last_contact, state) VALUES (?, {db.now}, 'heard')"
        f" ON CONFLICT (run) DO UPDATE SET last_contact = excluded.last_contact, state = 'heard'"
        f" WHERE {CONTACT}.last_contact < excluded.last_contact - ?",
        [run, granularity_s],
    )


class SilenceWatch:
    """One worker's judge of silent runs, on a daemon thread; `sweep()` is one look."""

    def __init__(self, db: SideDb, keys: EventKeys, silent_after_s: float) -> None:
        self._db = db
        self._keys = keys
        self.silent_after_s = silent_after_s
        self._started = time.monotonic()
        self._looked_at = self._marked = 0
        self._loop = Periodic("trainguard-silence", "silence watch", self._turn, self.period_s, _LOG)

    @property
    def period_s(self) -> float:
        """How often it looks: a silence is found within a quarter of `silent_after_s` (15 s at most)."""
        return min(15.0, max(0.25, self.silent_after_s / 4))

    @property
    def stamp_granularity_s(self) -> float:
        """How stale a stamp may be (see `stamp`): a tenth of `silent_after_s`, 5 s at most."""
        return min(5.0, self.silent_after_s / 10)

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._loop.stop(timeout)

    def _turn(self) -> bool:
        self.sweep()
        # A full look may have left runs: look again at once, unless a row could not be marked (it would
        # come back in the next look, and the loop would spin).
        return self._looked_at == _SWEEP_ROWS == self._marked

    def sweep(self) -> list[str]:
        """Judge the runs not heard from for `silent_after_s`; the runs found silent by this look."""
        if time.monotonic() - self._started < self.silent_after_s:
            return []
        db = self._db
        rows = db.rows(
            f"SELECT run, last_contact, {db.now} - last_contact FROM {CONTACT}"
            f" WHERE state = 'heard' AND last_contact < {db.now} - ? ORDER BY last_contact LIMIT ?",
            [self.silent_after_s, _SWEEP_ROWS],
        )
        self._looked_at, self._marked = len(rows), 0
        found: list[str] = []
        for run, last_contact, silent_for in rows:
            run, last_contact = str(run), float(last_contact)
            if self._has_any(run, END_TYPES) or not self._has_any(run, START_TYPES):
                state = "done"  # nothing to judge until the run is heard from again
            else:
                self._append_notice(run, last_contact, float(silent_for))
                state = "silent"
                found.append(run)
            # Only if no contact came in meanwhile: a stamp since then wins.
            self._marked += db.write(
                f"UPDATE {CONTACT} SET state = ? WHERE run = ? AND last_contact = ? AND state = 'heard'",
                [state, run, last_contact],
            )
        return found

    def _has_any(self, run: str, types: tuple[str, ...]) -> bool:
        return bool(self._db.rows(*any_of_query(run, types)))

    def _append_notice(self, run: str, last_contact: float, silent_for: float) -> None:
        heard = datetime.datetime.fromtimestamp(last_contact, datetime.UTC)
        event = new_event(
            SILENT_TYPE,
            {
                "last_contact": heard.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "silent_for_s": round(silent_for, 1),
                "silent_after_s": self.silent_after_s,
                "message": f"no word from the run's job for {silent_for:.0f} s, and it has not ended: "
                "its supervisor, reporting rank or delivery may have been killed or cut off",
            },
            run_id=run,
        )
        key = f"{RESERVED_KEY_PREFIX}silent:{round(last_contact * 1_000_000)}"
        # KeyConflict: another worker judged the same silence first, at another moment; one notice is enough.
        with contextlib.suppress(KeyConflict):
            self._keys.append(run, [(key, event.canonical())], _TOKEN_ID)
        _LOG.warning("run %r is silent: %s", run, event.payload["message"])
