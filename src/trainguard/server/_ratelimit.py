"""Rate limits shared by every worker and host: fixed-window counters in ``server_rate_limits``.

Each authenticated request costs one UPSERT ... RETURNING on its token's row for the current window (the
database's clock decides the window, so hosts need not agree on the time); over the token's limit the
answer is 429 with Retry-After (the seconds left in the window) and a body that says nothing else. Job
tokens and reader tokens (viewer, admin) have separate limits: a job's spool drains in bursts of batches
after an outage, a person or a scraper does not.

Failed authentications are counted per client address, and an address over its limit is refused before
its token is even looked at, so guessing is slow. An IPv6 client counts by its /64 (one host usually holds
a whole /64). Behind a reverse proxy the address is the proxy's, unless uvicorn is told to trust the
proxy's X-Forwarded-For (--forwarded-allow-ips): then one client guessing locks every client behind that
proxy out for the rest of the window, and a client that can reach uvicorn directly from a trusted address
chooses its own address.

A fixed window lets a client send up to twice its limit across a window's edge; the limits are for
abuse, not for accounting. Old windows are deleted by each worker's upkeep.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math

from trainguard.errors import UsageError
from trainguard.server._access import Identity, Scope
from trainguard.server._metrics import WorkerMetrics
from trainguard.server._sidetables import LIMITS, SideDb

__all__ = ["RateLimited", "RateLimiter", "RateLimits", "client_bucket"]


@dataclasses.dataclass(frozen=True)
class RateLimits:
    """Requests per window. Defaults, per 60 s window: 1200 per job token (20/s, bursts of spooled
    batches), 600 per viewer or admin token, 30 failed authentications per client address."""

    job: int = 1200
    reader: int = 600
    failures: int = 30
    window_s: int = 60

    def __post_init__(self) -> None:
        # Integers only, checked here: the window is written into the SQL as a number.
        for name, most in (("job", 10**9), ("reader", 10**9), ("failures", 10**9), ("window_s", 86400)):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= most:
                raise UsageError(f"rate limit {name} must be an integer from 1 to {most}, not {value!r}")

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, text: str) -> RateLimits:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            raise UsageError("the rate limits passed to the workers do not parse") from None


class RateLimited(Exception):
    """Over a limit: answer 429 with Retry-After `retry_after` seconds."""

    def __init__(self, kind: str, retry_after: int) -> None:
        super().__init__(f"rate limited ({kind})")
        self.kind = kind
        self.retry_after = retry_after


def client_bucket(host: str | None) -> str:
    """The failure bucket of a client address: the address, an IPv6 one by its /64."""
    if not host:
        return "addr:unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "addr:unknown"  # not an address (a unix socket's path): all such clients share one bucket
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"addr:{address.ipv4_mapped}"
        return f"addr:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"addr:{address}"


class RateLimiter:
    """The limits, counted in the database through `db`."""

    def __init__(self, db: SideDb, limits: RateLimits, metrics: WorkerMetrics) -> None:
        self._db = db
        self.limits = limits
        self._metrics = metrics
        now, window = db.now, limits.window_s
        start = (
            f"(floor({now} / {window})::bigint * {window})"
            if db.dialect == "postgresql"
            else f"(CAST({now} / {window} AS INTEGER) * {window})"
        )
        self._hit = (
            f"INSERT INTO {LIMITS} (bucket, window_start, hits) VALUES (?, {start}, 1)"
            f" ON CONFLICT (bucket, window_start) DO UPDATE SET hits = {LIMITS}.hits + 1"
            f" RETURNING hits, window_start + {window} - {now}"
        )
        self._peek = (
            f"SELECT hits, window_start + {window} - {now} FROM {LIMITS}"
            f" WHERE bucket = ? AND window_start = {start}"
        )

    def charge(self, identity: Identity) -> None:
        """Count one request of `identity`; RateLimited when it is over its token's limit."""
        limit = self.limits.job if identity.scope is Scope.JOB else self.limits.reader
        hits, left = self._db.rows(self._hit, (f"token:{identity.token_id}",))[0]
        if int(hits) > limit:
            self._refuse("token", float(left))

    def check_address(self, address: str | None) -> None:
        """RateLimited when the client's address failed to authenticate too often in this window."""
        found = self._db.rows(self._peek, (client_bucket(address),))
        if found and int(found[0][0]) >= self.limits.failures:
            self._refuse("address", float(found[0][1]))

    def failed(self, address: str | None) -> None:
        """Count one failed authentication of the client's address."""
        self._db.rows(self._hit, (client_bucket(address),))

    def _refuse(self, kind: str, left: float) -> None:
        self._metrics.rate_limited(kind)
        raise RateLimited(kind, max(1, math.ceil(left)))

    def prune(self) -> int:
        """Delete windows that ended; how many rows went."""
        return self._db.write(
            f"DELETE FROM {LIMITS} WHERE window_start + {self.limits.window_s} < {self._db.now} - 1"
        )
