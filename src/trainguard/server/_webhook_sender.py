"""The delivery loop each worker runs: claim due outbox rows, POST them signed, record what happened.

Each POST: JSON ``{"schema_version": 1, "delivery_id", "webhook_id", "run", "ledger_index", "event"}``,
signed (see _signature), with a connect timeout, a read timeout and an overall deadline (a receiver that
drips its answer a byte at a time is cut off), never following a redirect (a 3xx is a failure: the alert
would otherwise go wherever the receiver points it), reading at most a few hundred bytes of the answer.
Any 2xx is delivered; anything else is retried with exponential backoff and full jitter, up to
`WebhookLimits.attempts`, then marked failed.

Errors are recorded with the URL's origin only (the path may hold a secret) and never with the secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence

from trainguard.errors import UsageError
from trainguard.server._metrics import WorkerMetrics
from trainguard.server._periodic import Periodic
from trainguard.server._sidetables import WEBHOOKS, SideDb
from trainguard.server._signature import DELIVERY_HEADER, SIGNATURE_HEADER, sign
from trainguard.server._webhook_outbox import Claimed, Outbox
from trainguard.server._webhooks import redact_url

__all__ = ["WebhookLimits", "WebhookSender"]

_LOG = logging.getLogger("trainguard.server.webhooks")
_ANSWER_BYTES = 512
_UPKEEP_S = 60.0
_FLUSH_METRICS_S = 5.0
_LATE = "no complete answer within the deadline"


@dataclasses.dataclass(frozen=True)
class WebhookLimits:
    """How webhooks are sent. Defaults: 8 attempts, backoff from 2 s doubling to a 10 min cap (about
    half an hour in all before a row fails), 5 s to connect, 10 s for the whole answer, a poll of the outbox
    every second, 16 rows per claim, delivered rows kept 7 days."""

    attempts: int = 8
    backoff_s: float = 2.0
    backoff_cap_s: float = 600.0
    connect_timeout_s: float = 5.0
    answer_timeout_s: float = 10.0
    poll_s: float = 1.0
    batch: int = 16
    keep_delivered_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        for name in ("attempts", "batch"):
            if getattr(self, name) < 1:
                raise UsageError(f"webhook {name} must be at least 1, not {getattr(self, name)!r}")
        for name in ("backoff_s", "backoff_cap_s", "connect_timeout_s", "answer_timeout_s", "poll_s"):
            value = getattr(self, name)
            if not 0 < value <= 86400:
                raise UsageError(f"webhook {name} must be above 0 and at most a day, not {value!r}")
        if self.backoff_cap_s < self.backoff_s:
            raise UsageError("webhook backoff_cap_s must not be below backoff_s")
        if not self.keep_delivered_s > 0:
            raise UsageError("webhook keep_delivered_s must be positive")

    @property
    def lease_s(self) -> float:
        """How long a claim is held: well past the longest a delivery may take."""
        return 2 * (self.connect_timeout_s + self.answer_timeout_s) + 30.0

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, text: str) -> WebhookLimits:
        try:
            values = json.loads(text)
            return cls(**values)
        except (ValueError, TypeError):
            raise UsageError("the webhook settings passed to the workers do not parse") from None

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based): full jitter under a doubling ceiling."""
        ceiling = min(self.backoff_cap_s, self.backoff_s * 2 ** min(attempt - 1, 40))
        return random.uniform(self.backoff_s / 2, max(ceiling, self.backoff_s / 2))


class WebhookSender:
    """The delivery loop of one worker, on a daemon thread; `upkeep` callables run about once a minute."""

    def __init__(
        self,
        db: SideDb,
        limits: WebhookLimits,
        metrics: WorkerMetrics,
        upkeep: Sequence[Callable[[], object]] = (),
    ) -> None:
        self._db = db
        self._outbox = Outbox(db)
        self.limits = limits
        self._metrics = metrics
        self._upkeep = tuple(upkeep)
        self._next_upkeep = self._next_flush = time.monotonic()
        self._loop = Periodic("trainguard-webhooks", "webhook delivery loop", self._turn, limits.poll_s, _LOG)

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._loop.stop(timeout)

    def _turn(self) -> bool:
        if time.monotonic() >= self._next_flush:
            self._next_flush = time.monotonic() + _FLUSH_METRICS_S
            self._metrics.flush(self._db)
        if time.monotonic() >= self._next_upkeep:
            self._next_upkeep = time.monotonic() + _UPKEEP_S
            self._outbox.prune(self.limits.keep_delivered_s)
            for work in self._upkeep:
                work()
        return self.send_due() > 0

    def send_due(self) -> int:
        """Claim the due rows (one batch) and send each; how many were claimed."""
        claimed = self._outbox.claim(self.limits.batch, self.limits.lease_s)
        if not claimed:
            return 0
        targets = self._targets({row.webhook_id for row in claimed})
        for row in claimed:
            if self._loop.stopping:
                # Given back at once rather than left to its lease, for another worker to send.
                self._outbox.retry(row, "the worker stopped before sending", 0.0)
                continue
            target = targets.get(row.webhook_id)
            if target is None:
                self._outbox.failed(row, "the webhook was removed")
                self._metrics.webhook_attempt("failed")
                continue
            self._send(row, *target)
        return len(claimed)

    def _targets(self, ids: set[str]) -> dict[str, tuple[str, bytes]]:
        ordered = sorted(ids)
        marks = ",".join("?" * len(ordered))
        rows = self._db.rows(f"SELECT id, url, secret FROM {WEBHOOKS} WHERE id IN ({marks})", ordered)
        return {str(r[0]): (str(r[1]), bytes(r[2])) for r in rows}

    def _send(self, row: Claimed, url: str, secret: bytes) -> None:
        body = _body(row)
        moment = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "trainguard-webhook/1",
            SIGNATURE_HEADER: sign(secret, body, moment),
            DELIVERY_HEADER: row.delivery_id,
            "X-Trainguard-Attempt": str(row.attempt),
        }
        error = post(url, body, headers, self.limits)
        if error is None:
            self._outbox.delivered(row)
            self._metrics.webhook_attempt("delivered")
            return
        where = redact_url(url)
        if row.attempt >= self.limits.attempts:
            self._outbox.failed(row, error)
            self._metrics.webhook_attempt("failed")
            _LOG.error(
                "webhook %s (%s): delivery %s failed for good after %d attempts: %s",
                row.webhook_id,
                where,
                row.delivery_id,
                row.attempt,
                error,
            )
            return
        self._outbox.retry(row, error, self.limits.backoff(row.attempt))
        self._metrics.webhook_attempt("retry")
        _LOG.warning(
            "webhook %s (%s): attempt %d failed, will retry: %s", row.webhook_id, where, row.attempt, error
        )


def _body(row: Claimed) -> bytes:
    doc = {
        "schema_version": 1,
        "delivery_id": row.delivery_id,
        "webhook_id": row.webhook_id,
        "run": row.run,
        "ledger_index": row.ledger_index,
        "event": json.loads(row.event),
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


def post(url: str, body: bytes, headers: dict[str, str], limits: WebhookLimits) -> str | None:
    """POST once; None when the receiver answered 2xx, else why not (no URL path, no secret)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            host, parts.port, timeout=limits.connect_timeout_s, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=limits.connect_timeout_s)
    # The overall deadline: a receiver that trickles its answer is cut off by closing the socket.
    cut_off = threading.Event()
    watchdog = threading.Timer(limits.connect_timeout_s + limits.answer_timeout_s, _abort, (conn, cut_off))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(limits.answer_timeout_s)
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read(_ANSWER_BYTES)
        status = response.status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if cut_off.is_set():
            return _LATE
        return f"{type(exc).__name__}: {_printable(str(exc))}"
    finally:
        watchdog.cancel()
        conn.close()
    if cut_off.is_set():  # a cut-off answer can still parse: whatever it said, it was not heard in time
        return _LATE
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status}: redirects are not followed"
    return f"HTTP {status}: {_printable(answer.decode('utf-8', 'replace'))}"


def _abort(conn: http.client.HTTPConnection, cut_off: threading.Event) -> None:
    cut_off.set()
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]
