"""Delivers a job's spooled events to `trainguard serve` from a background thread.

from trainguard.relay._delivery import Delivery

delivery = Delivery(spool, "https://tg.example", token)   # starts its thread; raises only for bad settings
...                                                        # spool.put(event) from any thread, never waits
report = delivery.close(timeout=30)                        # flushes what it can; the rest stays spooled

The protocol, one request per batch, oldest events first:

POST {URL}/api/v1/runs/{run}/events
Authorization: Bearer tgs_...
{"events": [{"key": "<spool id>/<seq>", "event": <the event's canonical JSON>}, ...]}

2xx {"accepted": [keys], "duplicates": [keys]}

When it has had nothing to send for `alive_every_s` (60 s), it says the job is alive instead:

POST {URL}/api/v1/runs/{run}/alive          (no body; 204)

The server judges a run that has not ended and that it has not heard from for a while silent, an alarm: a
job whose supervisor or reporting rank was killed stops talking, and the silence is the only evidence. A
failed sign of life is logged, not retried: the next one comes `alive_every_s` later.

A key the server names in either list is delivered (a duplicate is one it already held, from a try whose
answer was lost) and only then removed from the spool; a key it does not name stays and is sent again,
so a lost answer, a timeout or a crash on either side costs a resend, never an event. Keys the server names
that were not sent are ignored. Anything else in a 2xx (not JSON, too large, the wrong shape) is a failed
try. Network errors, timeouts, 408, 429 and 5xx are retried with exponential backoff and full jitter up to a
cap; any other answer (401, 403, 404, a redirect, ...) is a rejection: logged, counted, and after
`rejections_before_stop` in a row delivery stops, keeping every event for a later Delivery (a new token, a
fixed URL) to send.

The thread never raises into the job: every failure is a log line, a counter and a retry.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import random
import ssl
import threading
import time
import urllib.parse

from trainguard._strictjson import loads_strict
from trainguard.errors import TrainguardError, UsageError
from trainguard.relay._spool import Spool, SpooledEvent
from trainguard.relay._tokenformat import is_token

__all__ = ["ALIVE_EVERY_S", "Delivery", "DeliveryLimits", "DeliveryReport"]

_LOG = logging.getLogger("trainguard.delivery")
_RETRYABLE = frozenset({408, 429})
_READ_CHUNK = 64 << 10
ALIVE_EVERY_S = 60.0
"""Seconds without a request after which a job with nothing to send says it is alive."""


@dataclasses.dataclass(frozen=True)
class DeliveryLimits:
    """Sizes and times of delivery. Defaults: 10 s per network operation (and per answer), batches of at
    most 500 events or 4 MiB, backoff from 0.5 s doubling to a 15 s cap, answers of at most 1 MiB."""

    timeout_s: float = 10.0
    batch_events: int = 500
    batch_bytes: int = 4 << 20
    backoff_base_s: float = 0.5
    # A restarted server is found within 15 s; with thousands of jobs and full jitter that is still only
    # a few hundred tries a second against a server that is down.
    backoff_cap_s: float = 15.0
    max_response_bytes: int = 1 << 20
    poll_s: float = 1.0
    rejections_before_stop: int = 3
    alive_every_s: float = ALIVE_EVERY_S

    def __post_init__(self) -> None:
        for name in ("timeout_s", "backoff_base_s", "backoff_cap_s", "poll_s", "alive_every_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"delivery {name} must be positive, not {getattr(self, name)!r}")
        for name in ("batch_events", "batch_bytes", "max_response_bytes", "rejections_before_stop"):
            if getattr(self, name) < 1:
                raise UsageError(f"delivery {name} must be at least 1, not {getattr(self, name)!r}")
        if self.backoff_cap_s < self.backoff_base_s:
            raise UsageError("delivery backoff_cap_s must not be below backoff_base_s")


@dataclasses.dataclass(frozen=True)
class DeliveryReport:
    """Where delivery stands. `remaining` and `gap_pending` are None when the spool could not be read."""

    delivered: int
    duplicates: int
    failed_tries: int
    rejections: int
    remaining: int | None
    gap_pending: int | None
    stopped: str | None
    """Why delivery stopped before the spool was empty (a rejection), or None."""
    last_error: str | None
    running: bool


@dataclasses.dataclass(frozen=True)
class _Answer:
    acknowledged: frozenset[str] = frozenset()
    duplicates: int = 0
    error: str | None = None
    retry_after: float | None = None
    rejected: bool = False


class Delivery:
    """One background thread sending `spool`'s events to the server at `url` with a job `token`."""

    def __init__(self, spool: Spool, url: str, token: str, *, limits: DeliveryLimits | None = None) -> None:
        self.spool = spool
        self.limits = limits or DeliveryLimits()
        self._target = _target(url, spool.run_id)
        if not is_token(token):
            # Not echoed: a mistyped token may still hold most of a secret.
            raise UsageError(
                "that is not a trainguard server token", hint="tokens read tgs_tg_<8 hex digits>_<secret>"
            ) from None
        self._auth = f"Bearer {token}"
        self._wake = threading.Event()
        self._closing = False
        self._cut_at_close = False
        self._deadline = float("inf")
        self._delivered = 0
        self._duplicates = 0
        self._failed_tries = 0
        self._rejections = 0
        self._stopped: str | None = None
        self._last_error: str | None = None
        self._logged: set[str] = set()
        self._last_contact = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="trainguard-delivery", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the spool now rather than at the next poll (after a put, say)."""
        self._wake.set()

    def report(self) -> DeliveryReport:
        remaining: int | None = None
        gap: int | None = None
        try:
            stats = self.spool.stats()
            remaining, gap = stats.events, stats.gap_pending
        except Exception as exc:  # the report is read from the job's thread: it must not raise
            self._last_error = _describe(exc)
        return DeliveryReport(
            delivered=self._delivered,
            duplicates=self._duplicates,
            failed_tries=self._failed_tries,
            rejections=self._rejections,
            remaining=remaining,
            gap_pending=gap,
            stopped=self._stopped,
            last_error=self._last_error,
            running=self._thread.is_alive(),
        )

    def close(self, timeout: float = 30.0) -> DeliveryReport:
        """Deliver what can be delivered within `timeout` seconds, stop the thread, and report what remains
        in the spool (it stays there, for the next Delivery on the same file)."""
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._closing = True
        self._wake.set()  # a backoff that no Retry-After asked for is cut short once: one more try now
        # A request in flight may outlive the deadline by one network timeout; the thread is a daemon.
        self._thread.join(max(0.0, timeout) + self.limits.timeout_s)
        report = self.report()
        if report.remaining:
            _LOG.warning(
                "trainguard: %d events not delivered to %s; they stay in %s for the next delivery",
                report.remaining,
                self._target.origin,
                self.spool.path,
            )
        return report

    def _run(self) -> None:
        attempt = 0
        while not self._past_deadline():
            try:
                batch = self.spool.oldest(self.limits.batch_events, self.limits.batch_bytes)
                if not batch:
                    if self._closing:
                        return
                    attempt = 0
                    if time.monotonic() - self._last_contact >= self.limits.alive_every_s:
                        self._say_alive()
                    self._sleep(self.limits.poll_s)
                    continue
                answer = self._send(batch)
                if answer.acknowledged:
                    self._acknowledge(batch, answer)
                    attempt = 0
                    continue
            # The job must never lose its delivery thread: a bug is logged and retried like a failure.
            except Exception as exc:
                answer = _Answer(error=f"delivery failed: {_describe(exc)}")
            if answer.rejected:
                self._rejections += 1
                if self._rejections >= self.limits.rejections_before_stop:
                    self._stopped = answer.error
                    _LOG.error(
                        "trainguard: the server refused the events %d times in a row, delivery stops; "
                        "they stay in %s: %s",
                        self._rejections,
                        self.spool.path,
                        answer.error,
                    )
                    return
            self._failed(answer.error or "unknown error")
            attempt += 1
            self._back_off(self._backoff(attempt, answer.retry_after), asked=answer.retry_after is not None)

    def _say_alive(self) -> None:
        self._last_contact = time.monotonic()
        try:
            status, _, data = self._post(self._target.alive_path, b"")
        except (OSError, http.client.HTTPException) as exc:
            problem = f"network: {_describe(exc)}"
        else:
            if 200 <= status <= 299:
                return
            problem = f"HTTP {status}: {_snippet(data)}"
        # Once per kind of failure: a server down for hours must not write a line a minute into the job's log.
        kind = "alive " + problem.split(":", 1)[0]
        if kind not in self._logged:
            self._logged.add(kind)
            _LOG.warning("trainguard: the sign of life to %s failed: %s", self._target.origin, problem)

    def _acknowledge(self, batch: list[SpooledEvent], answer: _Answer) -> None:
        self._last_contact = time.monotonic()
        seqs = [item.seq for item in batch if item.key in answer.acknowledged]
        self.spool.remove(seqs)
        self._delivered += len(seqs)
        self._duplicates += answer.duplicates
        self._rejections = 0
        if self._last_error is not None:
            _LOG.info("trainguard: event delivery to %s works again", self._target.origin)
            self._last_error = None
            self._logged.clear()

    def _failed(self, error: str) -> None:
        self._failed_tries += 1
        self._last_error = error
        # Once per kind of failure until delivery works again: a dead server must not flood the job's log.
        kind = error.split(":", 1)[0]
        if kind not in self._logged:
            self._logged.add(kind)
            _LOG.warning(
                "trainguard: event delivery to %s failed, will retry: %s", self._target.origin, error
            )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        limits = self.limits
        ceiling = min(limits.backoff_cap_s, limits.backoff_base_s * 2 ** min(attempt, 62))
        # Full jitter, so that a cluster of jobs whose server came back do not all retry in step.
        delay = random.uniform(limits.backoff_base_s / 2, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, limits.backoff_cap_s))
        return delay

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(max(0.0, min(seconds, self._deadline - time.monotonic())))
        self._wake.clear()

    def _back_off(self, seconds: float, *, asked: bool) -> None:
        """Sleep through a backoff: a wake (the job put more events) does not cut it short, or a server
        that answered 429 with Retry-After would be asked again at every training step. Closing does, once,
        unless the server `asked` for the wait: the job is ending, and the server may be back by now."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0 and not self._past_deadline():
            self._sleep(left)
            if self._closing and not asked and not self._cut_at_close:
                self._cut_at_close = True
                return

    def _past_deadline(self) -> bool:
        return self._closing and time.monotonic() >= self._deadline

    def _send(self, batch: list[SpooledEvent]) -> _Answer:
        body = _request_body(batch)
        try:
            status, headers, data = self._post(self._target.path, body)
        except (OSError, http.client.HTTPException) as exc:
            return _Answer(error=f"network: {_describe(exc)}")
        if status in _RETRYABLE or 500 <= status <= 599:
            return _Answer(error=f"HTTP {status}: {_snippet(data)}", retry_after=_retry_after(headers))
        if not 200 <= status <= 299:
            return _Answer(error=f"rejected: HTTP {status}: {_snippet(data)}", rejected=True)
        if data is None:
            return _Answer(error=f"answer: above {self.limits.max_response_bytes} bytes")
        return _parse_answer(data, {item.key for item in batch})

    def _post(self, path: str, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes | None]:
        """(status, headers, body or None when it exceeds the limit). A fresh connection per request: a
        batch is large next to a handshake, and no state survives a server that died mid-answer."""
        target = self._target
        timeout = self.limits.timeout_s
        conn: http.client.HTTPConnection
        if target.https:
            conn = http.client.HTTPSConnection(
                target.host, target.port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
        try:
            conn.request(
                "POST",
                path,
                body=body,
                headers={
                    "Authorization": self._auth,
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                },
            )
            response = conn.getresponse()
            return response.status, response.headers, self._read(response)
        finally:
            conn.close()

    def _read(self, response: http.client.HTTPResponse) -> bytes | None:
        # The socket timeout bounds each read; this bounds the whole answer, against a server that drips.
        limit = self.limits.max_response_bytes
        deadline = time.monotonic() + self.limits.timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read(_READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(f"the answer took more than {self.limits.timeout_s} s")
            chunks.append(chunk)


@dataclasses.dataclass(frozen=True)
class _Target:
    https: bool
    host: str
    port: int | None
    path: str
    alive_path: str
    origin: str


def _target(url: str, run_id: str) -> _Target:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"not a server URL: {url!r}: {exc}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UsageError(f"not a server URL: {url!r}", hint="give http(s)://HOST[:PORT][/PREFIX]")
    if parts.username is not None or parts.query or parts.fragment:
        raise UsageError(
            "the server URL must carry no user, query or fragment", hint="the token goes in its own option"
        )
    run = urllib.parse.quote(run_id, safe="")
    runs = f"{parts.path.rstrip('/')}/api/v1/runs/{run}"
    origin = f"{parts.scheme}://{parts.netloc}"
    return _Target(parts.scheme == "https", parts.hostname, port, f"{runs}/events", f"{runs}/alive", origin)


def _request_body(batch: list[SpooledEvent]) -> bytes:
    # The canonical bytes go in as they are: parsing and writing them again could only change them.
    items = [
        b'{"key":' + json.dumps(item.key).encode("ascii") + b',"event":' + item.data + b"}" for item in batch
    ]
    return b'{"events":[' + b",".join(items) + b"]}"


def _parse_answer(data: bytes, sent: set[str]) -> _Answer:
    try:
        doc = loads_strict(data)
    except (ValueError, RecursionError):
        return _Answer(error=f"answer: not JSON: {_snippet(data)}")
    accepted = _keys(doc, "accepted", sent)
    duplicates = _keys(doc, "duplicates", sent)
    if accepted is None or duplicates is None:
        return _Answer(error=f"answer: not {{'accepted': [...], 'duplicates': [...]}}: {_snippet(data)}")
    acknowledged = frozenset(accepted | duplicates)
    if not acknowledged:
        return _Answer(error=f"answer: acknowledges none of the {len(sent)} keys sent")
    return _Answer(acknowledged=acknowledged, duplicates=len(duplicates - accepted))


def _keys(doc: object, name: str, sent: set[str]) -> set[str] | None:
    """The keys sent that `doc[name]` names, or None when it is not a list. Keys never sent are ignored:
    a server cannot remove from the spool what this batch did not contain."""
    keys = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        return None
    return {key for key in keys if isinstance(key, str)} & sent


def _retry_after(headers: http.client.HTTPMessage) -> float | None:
    value = headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def _snippet(data: bytes | None) -> str:
    if data is None:
        return "(answer too large)"
    text = data[:200].decode("utf-8", "replace")
    # Printable only: the answer is the server's, and it ends up in a terminal.
    return "".join(ch if ch.isprintable() else "?" for ch in text) or "(empty)"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TrainguardError):
        return exc.diagnostics()
    return f"{type(exc).__name__}: {exc}"
