"""Prometheus metrics of `trainguard serve` (text format 0.0.4), the same whichever worker answers.

From the database, so every worker tells the same:
    trainguard_ledger_entries                          entries in the ledger
    trainguard_ledger_checkpoint_age_seconds           age of the latest signed checkpoint
    trainguard_events_appended_total{type}             events appended through the server, by type label
    trainguard_webhooks                                webhooks configured
    trainguard_webhook_deliveries{state}               outbox rows pending, delivered (kept 7 days), failed
Per worker (``worker="host:pid"``), counted in the process and written to ``server_worker_metrics`` every
few seconds, so a scrape answered by any worker behind a proxy shows every worker's series:
    trainguard_http_requests_total{worker,route,method,status}
    trainguard_rate_limited_total{worker,kind}         kind: token (over its limit) or address (failures)
    trainguard_webhook_attempts_total{worker,outcome}  outcome: delivered, retry, failed

Cardinality is bounded on purpose: no run label (a cluster has thousands of runs); an event type trainguard
does not write counts as ``other`` (a job could invent any number); a route is its template, never the
path; a method outside the API's is ``OTHER``. No label ever carries a token, a secret or a URL.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainguard.server._sidetables import CONTACT, COUNTS, METRICS, OUTBOX, WEBHOOKS, SideDb

__all__ = ["CONTENT_TYPE", "CountRequests", "WorkerMetrics", "render_metrics", "worker_name"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# A worker gone for a day (restarted, scaled down) stops being reported.
_FORGET_WORKER_S = 86400.0
# name: (type, help); counters are named without _total here, as the format's TYPE line wants.
_FAMILIES = {
    "trainguard_ledger_entries": ("gauge", "Entries in the ledger."),
    "trainguard_ledger_checkpoint_age_seconds": ("gauge", "Seconds since the latest signed checkpoint."),
    "trainguard_events_appended": (
        "counter",
        "Events appended through the server, by type (other: unknown).",
    ),
    "trainguard_runs_silent": (
        "gauge",
        "Runs whose job stopped reporting without ending, and not heard from since (serve --silent-after).",
    ),
    "trainguard_webhooks": ("gauge", "Webhooks configured."),
    "trainguard_webhook_deliveries": ("gauge", "Webhook outbox rows by state."),
    "trainguard_http_requests": ("counter", "HTTP requests answered, by worker, route, method and status."),
    "trainguard_rate_limited": ("counter", "Requests refused with 429, by worker and kind."),
    "trainguard_webhook_attempts": ("counter", "Webhook delivery attempts, by worker and outcome."),
}
_PER_WORKER = ("trainguard_http_requests", "trainguard_rate_limited", "trainguard_webhook_attempts")

Labels = tuple[tuple[str, str], ...]


def worker_name() -> str:
    return f"{socket.gethostname() or 'localhost'}:{os.getpid()}"


class WorkerMetrics:
    """This worker's counters. Thread-safe; `flush` writes them to the database."""

    def __init__(self, worker: str | None = None) -> None:
        self.worker = worker or worker_name()
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, Labels]] = Counter()

    def request(self, route: str, method: str, status: int) -> None:
        method = method if method in _METHODS else "OTHER"
        self._add("trainguard_http_requests", (("route", route), ("method", method), ("status", str(status))))

    def rate_limited(self, kind: str) -> None:
        self._add("trainguard_rate_limited", (("kind", kind),))

    def webhook_attempt(self, outcome: str) -> None:
        self._add("trainguard_webhook_attempts", (("outcome", outcome),))

    def _add(self, name: str, labels: Labels) -> None:
        with self._lock:
            self._counts[(name, labels)] += 1

    def flush(self, db: SideDb) -> None:
        """Write every counter of this worker (its whole value, so a lost flush loses nothing)."""
        with self._lock:
            rows = [
                (self.worker, name, json.dumps(labels), float(v))
                for (name, labels), v in self._counts.items()
            ]
        if rows:
            db.write_each(
                f"INSERT INTO {METRICS} (worker, name, labels, value, updated)"
                f" VALUES (?, ?, ?, ?, {db.now}) ON CONFLICT (worker, name, labels)"
                " DO UPDATE SET value = excluded.value, updated = excluded.updated",
                rows,
            )
        db.write(f"DELETE FROM {METRICS} WHERE updated < {db.now} - ?", (_FORGET_WORKER_S,))


def render_metrics(db: SideDb, metrics: WorkerMetrics) -> str:
    """The metrics page; this worker's counters are flushed first, so they are current."""
    metrics.flush(db)
    samples: list[tuple[str, Labels, float]] = []
    entries, age = db.rows(f"SELECT (SELECT max(idx) FROM entries), ({_age_sql(db.dialect)})")[0]
    samples.append(("trainguard_ledger_entries", (), 0.0 if entries is None else float(entries) + 1))
    if age is not None:
        samples.append(("trainguard_ledger_checkpoint_age_seconds", (), max(0.0, float(age))))
    samples.extend(
        ("trainguard_events_appended_total", (("type", str(event_type)),), float(count))
        for event_type, count in db.rows(f"SELECT type, events FROM {COUNTS} ORDER BY type")
    )
    silent = db.rows(f"SELECT count(*) FROM {CONTACT} WHERE state = 'silent'")[0][0]
    samples.append(("trainguard_runs_silent", (), float(silent)))
    samples.append(("trainguard_webhooks", (), float(db.rows(f"SELECT count(*) FROM {WEBHOOKS}")[0][0])))
    found = {str(s): int(n) for s, n in db.rows(f"SELECT state, count(*) FROM {OUTBOX} GROUP BY state")}
    samples.extend(
        ("trainguard_webhook_deliveries", (("state", state),), float(found.get(state, 0)))
        for state in ("pending", "delivered", "failed")
    )
    for worker, name, labels, value in db.rows(
        f"SELECT worker, name, labels, value FROM {METRICS} ORDER BY name, worker, labels"
    ):
        if name in _PER_WORKER:
            pairs = tuple((str(k), str(v)) for k, v in json.loads(labels))
            samples.append((f"{name}_total", (("worker", str(worker)), *pairs), float(value)))
    return _format(samples)


def _age_sql(dialect: str) -> str:
    age = (
        "extract(epoch from clock_timestamp() - created)::float8"
        if dialect == "postgresql"
        else "(julianday('now') - julianday(created)) * 86400.0"
    )
    return f"SELECT {age} FROM checkpoints ORDER BY size DESC LIMIT 1"


def _format(samples: Iterable[tuple[str, Labels, float]]) -> str:
    by_family: dict[str, list[str]] = {name: [] for name in _FAMILIES}
    for name, labels, value in samples:
        family = name.removesuffix("_total")
        label_text = ",".join(f'{key}="{_escape(text)}"' for key, text in labels)
        by_family[family].append(
            f"{name}{{{label_text}}} {_number(value)}" if labels else f"{name} {_number(value)}"
        )
    lines: list[str] = []
    for family, (kind, text) in _FAMILIES.items():
        lines += [f"# HELP {family} {text}", f"# TYPE {family} {kind}", *by_family[family]]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class CountRequests:
    """ASGI middleware: counts each answered request by its route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: WorkerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            self.metrics.request(
                path if isinstance(path, str) else "unmatched", str(scope.get("method")), status
            )
