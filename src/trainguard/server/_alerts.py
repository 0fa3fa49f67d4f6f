"""Which ledger events are alerts, and which events a webhook asks for (`EventFilter`).

An event is an alert when its type says something went wrong (the guard's or the supervisor's alarms, a
lost or killed rank, a signal, a refused run, a spool gap), or when it is a verification whose payload does
not say ``"ok": true`` (a missing or odd ``ok`` counts as failed: fail closed).

A webhook's filter is a comma-separated list of: ``alerts`` (the set above), an exact event type
(``run.end``), or a prefix ending in ``.*`` (``run.*``). ``*`` alone is every event.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from trainguard.errors import UsageError

__all__ = [
    "ALERT_TYPES",
    "KNOWN_TYPES",
    "OTHER_TYPE",
    "VERIFY_TYPES",
    "EventFilter",
    "event_type_and_payload",
    "is_alert",
    "type_label",
]

# Each type that is an alert, and why.
ALERT_TYPES = {
    "monitor.alert": "a check of the guard failed",
    "monitor.rollback": "the guard rolled a step back after a failed check",
    "monitor.signal": "a training process received a signal",
    "run.guard_alarm": "the supervisor judged a rank's evidence bad",
    "run.rank_lost": "a rank fell silent or died",
    "run.rank_exit": "a rank that had stopped beating exited",
    "run.signal": "a signal reached the supervisor or a rank",
    "run.kill": "the supervisor killed processes that outlived their grace",
    "run.leftovers": "processes of the run were still alive after it ended",
    "run.refused": "the supervisor refused to start a run (pre-flight checks failed)",
    "spool.gap": "the job's spool dropped events: evidence is missing",
    "server.run_silent": "the run's job stopped reporting without ending (judged by the server)",
}
# Verifications: an alert unless the payload says "ok": true.
VERIFY_TYPES = {
    "provenance.verify": "a checkpoint's signature or digests did not verify",
    "env.verify": "the Python environment did not match its baseline",
}
# Types written by trainguard itself: each gets its own metric label; any other type counts as "other",
# so a job that invents types cannot blow up the metrics' cardinality.
KNOWN_TYPES = frozenset(
    {
        *ALERT_TYPES,
        *VERIFY_TYPES,
        "env.snapshot",
        "monitor.start",
        "monitor.end",
        "monitor.steps",
        "provenance.sign",
        "run.attest",
        "run.start",
        "run.end",
        "run.exit",
        "run.forward",
        "run.open",
        "run.rank_resumed",
        "run.rank_restarted",
    }
)
OTHER_TYPE = "other"

_ITEM = re.compile(r"alerts|\*|[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*(?:\.\*)?")
_MAX_FILTER = 1000


def type_label(event_type: str) -> str:
    """The metric label of an event type: itself when trainguard writes it, else ``other``."""
    return event_type if event_type in KNOWN_TYPES else OTHER_TYPE


def is_alert(event_type: str, payload: object) -> bool:
    if event_type in ALERT_TYPES:
        return True
    if event_type in VERIFY_TYPES:
        return not (isinstance(payload, dict) and payload.get("ok") is True)
    return False


@dataclass(frozen=True)
class EventFilter:
    """Parsed from `text` (see the module's docstring); UsageError names a bad item."""

    text: str

    def __post_init__(self) -> None:
        if not self.text or len(self.text) > _MAX_FILTER:
            raise UsageError(f"an event filter is 1 to {_MAX_FILTER} characters")
        for item in self.text.split(","):
            if not _ITEM.fullmatch(item):
                raise UsageError(
                    f"event filter item {item!r} is not alerts, *, an event type or a prefix such as run.*",
                    hint="separate items with commas and no spaces: alerts,run.end",
                )

    @property
    def items(self) -> tuple[str, ...]:
        return tuple(self.text.split(","))

    def matches(self, event_type: str, payload: object) -> bool:
        for item in self.items:
            if item == "*" or item == event_type:
                return True
            if item == "alerts" and is_alert(event_type, payload):
                return True
            if item.endswith(".*") and event_type.startswith(item[:-1]):
                return True
        return False


def event_type_and_payload(data: bytes) -> tuple[str, object]:
    """The type and payload of an event's canonical bytes (already validated by the ledger)."""
    doc = json.loads(data)
    return str(doc["type"]), doc.get("payload")
