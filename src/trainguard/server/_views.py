"""What the dashboard shows, read from the ledger into plain view models, every read bounded.

A run's entries are found through ``server_event_keys(run, key, ledger_index)`` (indexed on run and
ledger_index) and those of one type through ``server_event_types(run, type, ledger_index)``
(_eventtypes.py), never by scanning the log or the run. Each read asks for at most a fixed number of rows
(`ViewLimits`), counts what it left out, and parses every entry strictly: an entry that no longer parses,
or whose type is no longer the one it was appended with (a row edited in the database), is shown as such,
never skipped.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trainguard.errors import StoreError, TrainguardError, UsageError
from trainguard.ledger._canonical import canonical_json
from trainguard.ledger._events import Event
from trainguard.ledger._keys import VerifierKey, b64decode_strict
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._note import Checkpoint
from trainguard.relay._fit import TOO_LARGE_SUFFIX
from trainguard.server._eventkeys import KEYS_TABLE
from trainguard.server._eventtypes import END_TYPES, START_TYPES, TYPES_TABLE, UNREADABLE, any_of_query

__all__ = [
    "ALARM_TYPES",
    "MAX_SHOWN",
    "EntryRow",
    "LedgerView",
    "RunSummary",
    "RunView",
    "ViewLimits",
    "alert_marks",
    "as_json_text",
    "key_fingerprint",
    "ledger_view",
    "proof_document",
    "run_view",
    "runs_page",
]

MAX_SHOWN = 1 << 16
"""Characters of an entry's text a page shows (the server appends events of at most 65535 bytes)."""
# Each type that makes a run "alarmed", and why.
_ALARMS = {
    "monitor.alert": "a check of the guard failed",
    "run.guard_alarm": "the supervisor judged a rank's evidence bad",
    "run.rank_lost": "a rank fell silent or died",
    "spool.gap": "the job's spool dropped events: evidence is missing",
    "run.spool_replaced": "the job's spool file was removed or replaced: evidence may be missing",
    "server.run_silent": "the run's job stopped reporting without ending (judged by the server)",
    UNREADABLE: "an entry of the run did not parse when the type table was filled",
}
CHECKPOINT_TYPES = ("provenance.sign", "provenance.verify")
SUMMARY_TYPE = "monitor.steps"
ATTEST_TYPE = "run.attest"
_NOTES = ("monitor.signal", "run.signal", "run.rank_exit", "run.exit", "run.kill")
# An event too large for the server reaches it as "<type>.too_large" with only its size and digest: the
# evidence itself is lost, so that of any type the pages read is on the timeline, and an alarm's is one.
ALARM_TYPES = {
    **_ALARMS,
    **{
        kind + TOO_LARGE_SUFFIX: f"{reason}, in an event too large to store (only its digest arrived)"
        for kind, reason in _ALARMS.items()
        if kind != UNREADABLE
    },
}
_READ = (*_ALARMS, *_NOTES, *END_TYPES, *CHECKPOINT_TYPES, SUMMARY_TYPE, ATTEST_TYPE, *START_TYPES)
# What the timeline shows: alarms, signals, exits, and every stand-in for a lost event.
TIMELINE_TYPES = (
    *ALARM_TYPES,
    *_NOTES,
    *(kind + TOO_LARGE_SUFFIX for kind in _READ if kind not in _ALARMS and kind != UNREADABLE),
)


@dataclasses.dataclass(frozen=True)
class ViewLimits:
    """How much one page may read: rows per query and points per plot."""

    runs_per_page: int = 50
    timeline: int = 500
    checkpoints: int = 200
    summary_events: int = 400
    plot_points: int = 1500
    entries_per_page: int = 50
    count_cap: int = 100_000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise UsageError(f"view limit {field.name} must be at least 1")


@dataclasses.dataclass(frozen=True)
class EntryRow:
    """One ledger entry as a page shows it: its text (the first MAX_SHOWN characters), and its event when
    the bytes still parse."""

    index: int
    text: str
    event: Event | None
    problem: str | None
    whole: bool = True

    @property
    def type(self) -> str:
        return self.event.type if self.event is not None else "(unreadable)"


@dataclasses.dataclass(frozen=True)
class RunSummary:
    run: str
    events: int
    status: str
    last_time: str
    last_index: int


@dataclasses.dataclass(frozen=True)
class Shown:
    """At most `limit` rows of `total`: `rows` is what a page shows."""

    rows: list[EntryRow]
    total: int
    capped: bool = False
    """Counting stopped at `total` (ViewLimits.count_cap): there may be more."""

    @property
    def left_out(self) -> int:
        return self.total - len(self.rows)


@dataclasses.dataclass(frozen=True)
class RunView:
    summary: RunSummary
    attestation: dict[str, Any] | None
    attestation_check: str
    starts: list[EntryRow]
    timeline: Shown
    checkpoints: Shown
    plots: dict[str, Any]
    fingerprint: dict[str, int]
    recent: list[EntryRow]
    summaries: Shown


@dataclasses.dataclass(frozen=True)
class LedgerView:
    checkpoint: Checkpoint | None
    head_problem: str | None
    verifier: str
    fingerprint: str
    size: int
    rows: list[EntryRow]
    start: int
    end: int
    per_page: int


def key_fingerprint(key: VerifierKey) -> str:
    """SHA-256 of the key's text form, hex: what a viewer compares against a key they got elsewhere."""
    return hashlib.sha256(key.text().encode("ascii")).hexdigest()


class _Reader:
    """SQL over the ledger's store, the event key table and the event type table."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.store = ledger.store

    def count_of(self, run: str, types: Sequence[str], cap: int) -> int:
        """How many entries of `types` the run holds, counting no further than `cap`."""
        marks = ",".join("?" * len(types))
        rows = self.store.read(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM {TYPES_TABLE} WHERE run = ? AND type IN ({marks})"
            " LIMIT ?) AS counted",
            [run, *types, cap],
        )
        return int(rows[0][0])

    def of_types(
        self, run: str, types: Sequence[str], limit: int, *, newest: bool = True, cap: int = 1
    ) -> Shown:
        """The run's entries of `types`, newest (or oldest) first, at most `limit`, and how many there are."""
        marks = ",".join("?" * len(types))
        order = "DESC" if newest else "ASC"
        rows = self.store.read(
            f"SELECT t.type, t.ledger_index, e.data FROM {TYPES_TABLE} t"
            " JOIN entries e ON e.idx = t.ledger_index"
            f" WHERE t.run = ? AND t.type IN ({marks}) ORDER BY t.ledger_index {order} LIMIT ?",
            [run, *types, limit],
        )
        shown = [_entry_row(int(index), bytes(data), appended_as=str(kind)) for kind, index, data in rows]
        if len(shown) < limit:
            return Shown(shown, len(shown))
        total = self.count_of(run, types, max(cap, limit))
        return Shown(shown, total, capped=total == max(cap, limit) and cap > limit)

    def any_of(self, run: str, types: Sequence[str]) -> bool:
        return bool(self.store.read(*any_of_query(run, types)))

    def latest(self, run: str, limit: int) -> list[EntryRow]:
        rows = self.store.read(
            f"SELECT k.ledger_index, e.data FROM {KEYS_TABLE} k JOIN entries e ON e.idx = k.ledger_index"
            " WHERE k.run = ? ORDER BY k.ledger_index DESC LIMIT ?",
            [run, limit],
        )
        return [_entry_row(int(index), bytes(data)) for index, data in rows]

    def summary(self, run: str, events: int, last_index: int) -> RunSummary:
        last = self.latest(run, 1)
        last_time = last[0].event.time if last and last[0].event is not None else "(unreadable)"
        if self.any_of(run, list(ALARM_TYPES)):
            status = "alarmed"
        elif not last or last[0].event is None:
            status = "unreadable"
        elif self.any_of(run, END_TYPES):
            status = "ended"
        else:
            status = "running"
        return RunSummary(run, events, status, last_time, last_index)


def _entry_row(index: int, data: bytes, *, appended_as: str | None = None) -> EntryRow:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
    # A page of entries written by other writers (up to 1 MiB each) must stay a page: show a prefix, which
    # the in-page check compares as a prefix.
    whole = len(text) <= MAX_SHOWN
    text = text[:MAX_SHOWN]
    try:
        event = Event.from_canonical(data, index=index)
    except TrainguardError as exc:
        return EntryRow(index, text, None, exc.message, whole)
    if appended_as is not None and event.type != appended_as:
        problem = f"entry {index} was appended as {appended_as!r} and now reads {event.type!r}"
        return EntryRow(index, text, None, problem, whole)
    return EntryRow(index, text, event, None, whole)


def runs_page(ledger: Ledger, page: int, limits: ViewLimits) -> tuple[list[RunSummary], int]:
    """One page of runs, the most recently active first, and how many runs there are."""
    reader = _Reader(ledger)
    total = int(reader.store.read(f"SELECT COUNT(DISTINCT run) FROM {KEYS_TABLE}")[0][0])
    rows = reader.store.read(
        f"SELECT run, COUNT(*), MAX(ledger_index) FROM {KEYS_TABLE} GROUP BY run"
        " ORDER BY MAX(ledger_index) DESC LIMIT ? OFFSET ?",
        [limits.runs_per_page, page * limits.runs_per_page],
    )
    return [reader.summary(str(run), int(n), int(last)) for run, n, last in rows], total


def run_view(ledger: Ledger, run: str, limits: ViewLimits) -> RunView | None:
    """Everything the run page shows; None when the server holds no event of `run`."""
    reader = _Reader(ledger)
    rows = reader.store.read(f"SELECT COUNT(*), MAX(ledger_index) FROM {KEYS_TABLE} WHERE run = ?", [run])
    if not rows or not rows[0][0]:
        return None
    summary = reader.summary(run, int(rows[0][0]), int(rows[0][1]))
    attest = reader.of_types(run, [ATTEST_TYPE], 1).rows
    attestation, check = _attestation(attest[0] if attest else None, ledger.verifier)
    cap = limits.count_cap
    timeline = reader.of_types(run, TIMELINE_TYPES, limits.timeline, cap=cap)
    checkpoints = reader.of_types(run, CHECKPOINT_TYPES, limits.checkpoints, cap=cap)
    summaries = reader.of_types(run, [SUMMARY_TYPE], limits.summary_events, cap=cap)
    steps = _step_rows(reversed(summaries.rows))
    alerts = [
        row.event for row in timeline.rows if row.event is not None and row.event.type == "monitor.alert"
    ]
    starts = reader.of_types(run, START_TYPES, 4, newest=False).rows
    compared = any(
        row.event is not None
        and row.event.type == "monitor.start"
        and isinstance(checks := row.event.payload.get("checks"), list)
        and "fingerprint" in checks
        for row in starts
    )
    return RunView(
        summary=summary,
        attestation=attestation,
        attestation_check=check,
        starts=starts,
        timeline=timeline,
        checkpoints=checkpoints,
        plots=_plots(steps, limits.plot_points),
        fingerprint=_fingerprint(steps, alerts, compared),
        recent=reader.latest(run, limits.entries_per_page),
        summaries=summaries,
    )


def _attestation(row: EntryRow | None, ledger_key: VerifierKey) -> tuple[dict[str, Any] | None, str]:
    """The attestation's fields and what its signature says (checked here, with the key it names)."""
    if row is None:
        return None, "no run.attest event"
    if row.event is None:
        return None, f"entry {row.index} is unreadable: {row.problem}"
    payload = row.event.payload
    attestation = payload.get("attestation")
    if not isinstance(attestation, dict):
        return None, f"entry {row.index} holds no attestation object"
    try:
        key = VerifierKey.from_text(str(payload.get("key")))
        signature = b64decode_strict(str(payload.get("signature")))
        valid = key.verify(canonical_json(attestation), signature)
    except (TrainguardError, ValueError, TypeError):
        return dict(attestation), f"entry {row.index}: the signature or its key is malformed"
    if not valid:
        return dict(attestation), f"entry {row.index}: the signature does NOT verify"
    whose = "the ledger's own key" if key == ledger_key else "a key that is NOT this ledger's key"
    return dict(attestation), f"entry {row.index}: signature valid, by {key.ident} ({whose})"


def _step_rows(summaries: Iterable[EntryRow]) -> list[dict[str, Any]]:
    """Rows of monitor.steps summaries, oldest first, as {column: value} (columns read by name)."""
    out: list[dict[str, Any]] = []
    for row in summaries:
        if row.event is None:
            continue
        columns, rows = row.event.payload.get("columns"), row.event.payload.get("rows")
        if not isinstance(columns, list) or not isinstance(rows, list):
            continue
        names = [str(c) for c in columns]
        out.extend(dict(zip(names, values, strict=False)) for values in rows if isinstance(values, list))
    return out


_STEP_TIME_COLUMNS = ("forward_off_cpu_ms", "optimizer_off_cpu_ms", "data_off_cpu_ms")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _plots(steps: list[dict[str, Any]], points: int) -> dict[str, Any]:
    """Series for the charts: loss, and each rank's step time (forward + optimizer + data, off-CPU ms).

    More rows than `points` are thinned to every k-th row (the last one always kept).
    """
    stride = max(1, math.ceil(len(steps) / points))
    kept = steps[::stride]
    if steps and kept[-1] is not steps[-1]:
        kept.append(steps[-1])
    xs: list[float | None] = [_number(r.get("step")) for r in kept]
    loss = [_number(r.get("loss")) for r in kept]
    ranks = max(
        (len(r.get(c) or []) for r in kept for c in _STEP_TIME_COLUMNS if isinstance(r.get(c), list)),
        default=0,
    )
    per_rank: list[list[float | None]] = []
    for rank in range(min(ranks, 64)):
        series: list[float | None] = []
        for r in kept:
            parts = [_at(r.get(c), rank) for c in _STEP_TIME_COLUMNS]
            series.append(
                None if any(p is None for p in parts) else round(sum(p for p in parts if p is not None), 3)
            )
        per_rank.append(series)
    return {
        "rows": len(steps),
        "stride": stride,
        "loss": {"x": xs, "series": [{"name": "loss", "y": loss}]},
        "step_time": {"x": xs, "series": [{"name": f"rank {i}", "y": s} for i, s in enumerate(per_rank)]},
    }


def _at(values: object, i: int) -> float | None:
    return _number(values[i]) if isinstance(values, list) and i < len(values) else None


def _fingerprint(steps: list[dict[str, Any]], alerts: Sequence[Event], compared: bool) -> dict[str, int]:
    """Per step: 2 agreed (a summary row, no fingerprint alert, and the guard compared fingerprints), 1
    disagreed (a fingerprint alert), 0 not compared (the run's monitor.start does not list the check)."""
    judged = 2 if compared else 0
    states = {int(s): judged for r in steps if (s := _number(r.get("step"))) is not None}
    for event in alerts:
        step = event.payload.get("step")
        if (
            event.payload.get("check") == "fingerprint"
            and isinstance(step, int)
            and not isinstance(step, bool)
        ):
            states[step] = 1
    return {str(step): states[step] for step in sorted(states)}


def ledger_view(ledger: Ledger, before: int | None, limits: ViewLimits) -> LedgerView:
    """The signed head (verified here with the ledger's key) and one page of entries ending at `before`."""
    checkpoint: Checkpoint | None = None
    problem: str | None = None
    try:
        checkpoint, _ = ledger.head()
    except TrainguardError as exc:
        problem = exc.message
    size = checkpoint.size if checkpoint is not None else ledger.size
    end = size if before is None else max(0, min(before, size))
    start = max(0, end - limits.entries_per_page)
    found = {i: _entry_row(i, bytes(data)) for i, data in ledger.store.entries(start, end)}
    # A row deleted from the database leaves a hole that the page shows, never closes up.
    rows = [
        found.get(i) or EntryRow(i, "", None, f"entry {i} is missing from the database")
        for i in range(start, end)
    ]
    return LedgerView(
        checkpoint,
        problem,
        ledger.verifier.text(),
        key_fingerprint(ledger.verifier),
        size,
        rows[::-1],
        start,
        end,
        limits.entries_per_page,
    )


def proof_document(ledger: Ledger, index: int) -> dict[str, Any] | None:
    """Entry `index`'s bytes, its inclusion proof in the latest signed checkpoint, and that note.

    The bytes are served as stored, even when they no longer match the tree: the page decides.
    """
    latest = ledger.store.latest_checkpoint()
    if latest is None or not 0 <= index < latest[0]:
        return None
    size, note = latest
    data = next((bytes(d) for _, d in ledger.store.entries(index, index + 1)), None)
    if data is None:
        raise StoreError(f"entry {index} is missing from the database, under a signed head of {size}")
    proof = ledger.inclusion_proof(index, size)
    return {
        "index": index,
        "entry": base64.b64encode(data).decode("ascii"),
        "tree_size": size,
        "proof": [base64.b64encode(h).decode("ascii") for h in proof],
        "checkpoint": note,
    }


def alert_marks(view: RunView) -> list[dict[str, Any]]:
    """The alarms that name a step, for the plots' markers: step, type, check and ranks."""
    marks = []
    for row in view.timeline.rows:
        event = row.event
        if event is None or event.type not in ALARM_TYPES:
            continue
        step = _number(event.payload.get("step"))
        if step is not None:
            check = event.payload.get("check")
            marks.append({"step": step, "label": f"{event.type} {check or ''} (entry {row.index})".strip()})
    return marks


def as_json_text(value: Mapping[str, Any] | Sequence[Any]) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, indent=1)
