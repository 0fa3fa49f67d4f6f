"""What a worker does besides answering requests: rate limits, metrics, the webhook delivery loop and the
watch for silent runs.

ops = Operations.open(location, RateLimits(), WebhookLimits())
who = ops.authenticate(tokens, token, client_address)   # RateLimited, AuthenticationFailed
ops.heard_from(run)                                     # the run's job spoke (silence watch)
ops.watch_silence(keys, 300.0)                          # judge runs silent after 300 s
ops.start()                                             # the delivery loop and the watch, on threads
text = ops.metrics_text()                               # /metrics
ops.close()

Connections of its own: one for the request path (a rate-limit UPSERT per request, /metrics), one for
the delivery loop, so a slow claim never holds up a request, and one for the silence watch. Everything
shared lives in the database.
"""

from __future__ import annotations

from pathlib import Path

from trainguard.errors import TrainguardError
from trainguard.server._access import AuthenticationFailed, AuthFailure, Identity
from trainguard.server._eventkeys import EventKeys
from trainguard.server._metrics import WorkerMetrics, render_metrics
from trainguard.server._ratelimit import RateLimiter, RateLimits
from trainguard.server._sidetables import SideDb, open_side_db
from trainguard.server._silence import SilenceWatch, stamp
from trainguard.server._tokens import TokenStore
from trainguard.server._webhook_sender import WebhookLimits, WebhookSender

__all__ = ["Operations"]


class Operations:
    def __init__(
        self, request_db: SideDb, loop_db: SideDb, watch_db: SideDb, rates: RateLimits, hooks: WebhookLimits
    ) -> None:
        self._request_db = request_db
        self.metrics = WorkerMetrics()
        self.limiter = RateLimiter(request_db, rates, self.metrics)
        self.sender = WebhookSender(loop_db, hooks, self.metrics, upkeep=[self.limiter.prune])
        self._loop_db = loop_db
        self._watch_db = watch_db
        self.silence: SilenceWatch | None = None

    @classmethod
    def open(cls, location: str | Path, rates: RateLimits, hooks: WebhookLimits) -> Operations:
        """On the ledger at `location`, whose server tables exist (StoreError otherwise)."""
        request_db = open_side_db(location)
        try:
            loop_db = open_side_db(location)
            try:
                watch_db = open_side_db(location)
            except BaseException:
                loop_db.close()
                raise
        except BaseException:
            request_db.close()
            raise
        return cls(request_db, loop_db, watch_db, rates, hooks)

    def authenticate(self, tokens: TokenStore, token: str | None, address: str | None) -> Identity:
        """The token's identity, within the limits: an address that failed too often is refused before
        its token is looked at; a failure counts against the address; a success against the token."""
        self.limiter.check_address(address)
        try:
            if token is None:
                raise AuthenticationFailed(AuthFailure.MALFORMED)
            identity = tokens.authenticate(token)
        except AuthenticationFailed:
            self.limiter.failed(address)
            raise
        self.limiter.charge(identity)
        return identity

    def heard_from(self, run: str) -> None:
        """The run's job spoke: its silence, if any, is over (StoreError when the database fails)."""
        stamp(self._request_db, run, 5.0 if self.silence is None else self.silence.stamp_granularity_s)

    def watch_silence(self, keys: EventKeys, silent_after_s: float) -> None:
        """Judge runs not heard from for `silent_after_s` silent, once started (appends through `keys`)."""
        self.silence = SilenceWatch(self._watch_db, keys, silent_after_s)

    def metrics_text(self) -> str:
        return render_metrics(self._request_db, self.metrics)

    def start(self) -> None:
        self.sender.start()
        if self.silence is not None:
            self.silence.start()

    def close(self) -> None:
        try:
            if self.silence is not None:
                self.silence.stop()
            self.sender.stop()
            self.metrics.flush(self._loop_db)
        except TrainguardError:
            pass  # the database is gone: the last seconds of counts with it, nothing else to do
        finally:
            try:
                self._watch_db.close()
            finally:
                try:
                    self._loop_db.close()
                finally:
                    self._request_db.close()
