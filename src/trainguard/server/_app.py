"""The HTTP API of `trainguard serve` (FastAPI): jobs append events, viewers read the log as tlog-tiles.

app = create_app("postgresql://db/ledger")   # or a SQLite path; None is the default ledger

POST /api/v1/runs/{run}/events    job token of that run, or admin: append a batch, idempotent by key
GET  /api/v1/runs/{run}/events    viewer, admin: the run's events, one bounded window of the log at a time
GET  /api/v1/whoami               any valid token: its id, scope, run and expiry (never its secret)
GET  /checkpoint                  viewer, admin: the latest signed checkpoint note (https://c2sp.org/tlog-tiles)
GET  /tile/<L>/<N>[.p/<W>]        viewer, admin: hash tiles, byte for byte what `ledger tiles DIR` writes
GET  /tile/entries/<N>[.p/<W>]    viewer, admin: entry bundles
GET  /metrics                     viewer, admin: Prometheus metrics (trainguard.server._metrics)
GET  /openapi.json                viewer, admin: this API's description
GET  /healthz                     anyone: ``{"status": "ok"}`` and nothing else
GET  /ui/...                      viewer, admin (a cookie set by /ui/login): the dashboard (_dashboard.py)

Every request reads the database afresh (tokens, keys, the tree): a process holds connections and nothing
else, so any number of workers and hosts may share one PostgreSQL ledger.

Idempotency. The table ``server_event_keys(run, key, ledger_index)`` sits in the ledger's own database and
is written in the very transaction that appends the events, under the ledger's writer lock (SQLite
``BEGIN IMMEDIATE``, a PostgreSQL advisory lock): the key rows and the entries commit together or not at
all. A batch first drops the keys already stored; then its append claims the rest with ``INSERT ... ON
CONFLICT DO NOTHING`` and, when fewer rows went in than it claimed (a racing worker or host stored some of
them between the read and the lock), raises, so the transaction rolls back and the batch is tried again
without them. The primary key decides, never a check in the process.

The key is unique per run, not globally: a job token can never make another run's event read as a
duplicate by sending its key first.

Why the OpenAPI description needs a viewer or admin token: every endpoint sits behind a token, the description
tells an anonymous scanner which server this is, and whoever may use the API holds one (the same description
is published as docs/openapi.json, for offline tools). /healthz alone is open, for load balancers, and says
nothing but ok. FastAPI's HTML docs pages are off: they load scripts from a CDN; the only HTML this server
sends is the dashboard's, under its own page policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from trainguard._strictjson import loads_strict
from trainguard.errors import KeyFileError, StoreError, TrainguardError, UsageError
from trainguard.ledger._canonical import canonical_json
from trainguard.ledger._events import EntryError, Event
from trainguard.ledger._keys import ALG_ED25519, SigningKey
from trainguard.ledger._ledger import Ledger, default_key_path, default_location
from trainguard.ledger._tiles import (
    MAX_BUNDLED_ENTRY_BYTES,
    TILE_WIDTH,
    encode_index,
    read_entry_bundle,
    read_tile,
)
from trainguard.server._access import (
    Action,
    AuthenticationFailed,
    Identity,
    NotAuthorized,
    authorize,
)
from trainguard.server._appended import on_append
from trainguard.server._dashboard import add_dashboard
from trainguard.server._eventkeys import EventKeys, KeyConflict
from trainguard.server._eventtypes import create_type_table, index_types
from trainguard.server._metrics import CONTENT_TYPE as METRICS_TYPE
from trainguard.server._metrics import CountRequests
from trainguard.server._operations import Operations
from trainguard.server._ratelimit import RateLimited, RateLimits
from trainguard.server._sidetables import create_tables
from trainguard.server._silence import RESERVED_KEY_PREFIX, RESERVED_TYPE_PREFIX
from trainguard.server._tokens import TokenStore
from trainguard.server._webhook_sender import WebhookLimits

__all__ = ["ServeLimits", "create_app", "open_server"]

_LOG = logging.getLogger("trainguard.server")

# A delivery key reads <32 hex digits>/<sequence>; other clients may use any short printable ASCII name.
_KEY = re.compile(r"[A-Za-z0-9._:/-]{1,200}")
_MAX_RUN = 256
# A tile path: <L> or "entries", then <N> in three-digit groups, then .p/<W> for a partial tile.
_TILE = re.compile(r"(entries|0|[1-9][0-9]{0,2})/((?:x[0-9]{3}/)*[0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?")
_IMMUTABLE = "private, max-age=31536000, immutable"
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
_UNAUTHENTICATED = {"error": "unauthenticated", "message": "a valid bearer token is required"}
_AUTH_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="trainguard"'}


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What one request may carry or ask for.

    Defaults: a POST body of at most 8 MiB (a delivery batch is at most 4 MiB of events), 1000 events, each
    at most 65535 bytes of canonical JSON (larger ones could never be published in a tlog-tiles entry
    bundle, so one oversized event would break the read path for everyone), 60 s to send the body; reads
    return at most 1000 events or 4 MiB, from a window of at most 4096 entries of the log.
    """

    max_body_bytes: int = 8 << 20
    max_events: int = 1000
    max_event_bytes: int = MAX_BUNDLED_ENTRY_BYTES
    body_timeout_s: float = 60.0
    max_read_events: int = 1000
    max_read_bytes: int = 4 << 20
    read_window: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_events", "max_event_bytes", "max_read_events", "read_window"):
            if getattr(self, name) < 1:
                raise UsageError(f"serve limit {name} must be at least 1, not {getattr(self, name)!r}")
        if not self.body_timeout_s > 0:
            raise UsageError(f"serve limit body_timeout_s must be positive, not {self.body_timeout_s!r}")
        if self.max_event_bytes > MAX_BUNDLED_ENTRY_BYTES:
            raise UsageError(
                f"serve limit max_event_bytes is at most {MAX_BUNDLED_ENTRY_BYTES}: a larger entry cannot be "
                "published as a tlog-tiles entry bundle"
            )
        if self.max_read_bytes < self.max_event_bytes:
            raise UsageError("serve limit max_read_bytes must hold at least one event of max_event_bytes")


class _Problem(Exception):
    """An answer other than success: its status, a stable error code and a message for people."""

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers


class _Server:
    """What one worker process holds: connections to the ledger and its tokens, and the limits."""

    def __init__(
        self, ledger: Ledger, tokens: TokenStore, keys: EventKeys, limits: ServeLimits, ops: Operations
    ) -> None:
        self.ledger = ledger
        self.tokens = tokens
        self.keys = keys
        self.limits = limits
        self.ops = ops

    def authenticate(self, token: str | None, address: str | None) -> Identity:
        """The token's identity, within the rate limits (RateLimited: 429; AuthenticationFailed: 401)."""
        return self.ops.authenticate(self.tokens, token, address)

    def close(self) -> None:
        try:
            self.ops.close()
        finally:
            try:
                self.tokens.close()
            finally:
                self.ledger.close()


def open_server(
    location: str | Path | None,
    key_path: Path | None = None,
    limits: ServeLimits | None = None,
    *,
    rate_limits: RateLimits | None = None,
    webhook_limits: WebhookLimits | None = None,
    silent_after_s: float | None = None,
) -> _Server:
    """Open the ledger with its signing key, its tokens and the event key table (made when missing).

    `key_path` None is the default ledger key ($TRAINGUARD_HOME/keys/ledger.key), generated for the default
    ledger when neither exists. KeyFileError when the server could not sign appends. With `silent_after_s`,
    runs not heard from for that long without ending get a `server.run_silent` alarm (once started).
    """
    path = key_path if key_path is not None else default_key_path()
    key = SigningKey.load(path, alg=ALG_ED25519) if key_path is not None or path.exists() else None
    ledger = Ledger.open(location, key=key)
    try:
        if key is None and path.exists():
            key = SigningKey.load(path, alg=ALG_ED25519)  # Ledger.open made the default ledger's key
        if key is None or not ledger.can_append:
            raise KeyFileError(
                f"trainguard serve appends to {ledger.location}, so it needs the ledger's signing key",
                hint="give it with --key FILE (env TRAINGUARD_LEDGER_KEY)",
            )
        create_tables(ledger.store)  # webhooks, their outbox, counts, rate limits: beside the ledger
        create_type_table(ledger.store)  # the dashboard's index of each run's events by type
        # The hook writes each event's count and webhook outbox rows in the append's own transaction.
        keys = EventKeys(ledger.store, key, hooks=[on_append, index_types])
        tokens = TokenStore.open(location)
        try:
            ops = Operations.open(
                location if location is not None else default_location(),
                rate_limits or RateLimits(),
                webhook_limits or WebhookLimits(),
            )
        except BaseException:
            tokens.close()
            raise
        if silent_after_s is not None:
            ops.watch_silence(keys, silent_after_s)
    except BaseException:
        ledger.close()
        raise
    return _Server(ledger, tokens, keys, limits or ServeLimits(), ops)


def create_app(
    store_location: str | Path | None,
    *,
    key_path: Path | None = None,
    limits: ServeLimits | None = None,
    rate_limits: RateLimits | None = None,
    webhook_limits: WebhookLimits | None = None,
    silent_after_s: float | None = None,
) -> FastAPI:
    """The ASGI app serving the ledger at `store_location` (None: the default ledger)."""
    server = open_server(
        store_location,
        key_path,
        limits,
        rate_limits=rate_limits,
        webhook_limits=webhook_limits,
        silent_after_s=silent_after_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.ops.start()  # this worker's webhook delivery loop and silence watch
        try:
            yield
        finally:
            server.close()

    app = FastAPI(
        title="trainguard",
        version="1",
        description="Jobs append events to a signed, append-only ledger; viewers read it as C2SP "
        "tlog-tiles. Every endpoint but /healthz needs a bearer token (`trainguard server token create`).",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.server = server
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(CountRequests, metrics=server.ops.metrics)  # outermost: sees every answer's status
    app.add_exception_handler(_Problem, _problem_answer)  # type: ignore[arg-type]
    app.add_exception_handler(AuthenticationFailed, _unauthenticated)  # type: ignore[arg-type]
    app.add_exception_handler(NotAuthorized, _forbidden)  # type: ignore[arg-type]
    app.add_exception_handler(RateLimited, _rate_limited)  # type: ignore[arg-type]
    app.add_exception_handler(StoreError, _store_failed)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _bad_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]

    events = "/api/v1/runs/{run:path}/events"
    app.add_api_route(
        events,
        _post_events,
        methods=["POST"],
        summary="Append a batch of events to a run, idempotently by key",
        openapi_extra={"requestBody": _REQUEST_BODY},
        # 404: a run id with a line break matches no route (the path converter stops at one).
        responses=_responses(200, 400, 401, 403, 404, 408, 409, 413, 503),
    )
    app.add_api_route(
        events,
        _get_events,
        methods=["GET"],
        summary="The run's events in one window of the log",
        responses=_responses(200, 400, 401, 403, 404, 503),
    )
    app.add_api_route(
        "/api/v1/runs/{run:path}/alive",
        _post_alive,
        methods=["POST"],
        status_code=204,
        summary="The run's job is alive: it has no events to send (a run silent too long is an alarm)",
        response_class=Response,
        responses=_responses(204, 400, 401, 403, 404, 408, 413, 503),
    )
    app.add_api_route(
        "/checkpoint",
        _get_checkpoint,
        methods=["GET"],
        summary="The latest signed checkpoint (C2SP tlog-checkpoint note)",
        response_class=Response,
        responses={
            **_responses(401, 403, 404, 503),
            200: {"description": "the signed note", "content": {"text/plain": {}}},
        },
    )
    app.add_api_route(
        "/tile/{path:path}",
        _get_tile,
        methods=["GET"],
        summary="A hash tile or entry bundle (C2SP tlog-tiles)",
        response_class=Response,
        responses={
            **_responses(401, 403, 404, 503),
            200: {"description": "the tile's bytes", "content": {"application/octet-stream": {}}},
        },
    )
    app.add_api_route(
        "/api/v1/whoami",
        _get_whoami,
        methods=["GET"],
        summary="The token's id, scope, run and expiry: a job checks it before it starts",
        responses=_responses(200, 401, 503),
    )
    app.add_api_route(
        "/metrics",
        _get_metrics,
        methods=["GET"],
        summary="Prometheus metrics (text format 0.0.4): ledger, events, webhooks, requests, rate limits",
        response_class=Response,
        responses={
            **_responses(401, 403, 503),
            200: {"description": "the metrics", "content": {METRICS_TYPE.split(";")[0]: {}}},
        },
    )
    app.add_api_route("/openapi.json", _get_openapi, methods=["GET"], include_in_schema=False)
    app.add_api_route("/healthz", _healthz, methods=["GET"], summary="Liveness: says ok")
    add_dashboard(app)
    return app


_SAFE_INT = {"type": "integer", "minimum": -(2**53 - 1), "maximum": 2**53 - 1}
# What Event.from_canonical accepts, so clients (and fuzzers) can tell a valid event from the description.
_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "a ledger event, at most 65535 bytes as RFC 8785 JSON; run_id is the run the URL names",
    "required": ["type", "time", "actor", "run_id", "rank", "payload"],
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "minLength": 1},
        "time": {
            "type": "string",
            "description": "RFC 3339 UTC with microseconds: 2026-11-27T23:35:08.123456Z",
            "pattern": r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
            r"T([01][0-9]|2[0-3])(:[0-5][0-9]){2}\.[0-9]{6}Z$",
        },
        "actor": {
            "type": "object",
            "required": ["user", "uid", "host", "pid"],
            "additionalProperties": False,
            "properties": {
                "user": {"type": "string"},
                "uid": _SAFE_INT,
                "host": {"type": "string"},
                "pid": _SAFE_INT,
            },
        },
        "run_id": {"type": "string", "minLength": 1},
        "rank": {"type": ["integer", "null"], "minimum": 0, "maximum": 2**53 - 1},
        "payload": {"type": "object"},
    },
}
_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["events"],
                "additionalProperties": False,
                "properties": {
                    "events": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["key", "event"],
                            "additionalProperties": False,
                            "properties": {
                                # Anchored: a JSON Schema pattern matches anywhere in the string.
                                "key": {"type": "string", "pattern": f"^{_KEY.pattern}$"},
                                "event": _EVENT_SCHEMA,
                            },
                        },
                    }
                },
            }
        }
    },
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        200: "done",
        204: "done; nothing to answer",
        400: "malformed request",
        401: "no valid bearer token (missing, malformed, unknown, expired or revoked: one answer for all)",
        403: "the token's scope does not cover this",
        404: "no such resource",
        408: "the body came too slowly",
        409: "a key the run already holds came with other content; nothing was appended",
        413: "the body, an event or the batch is too large",
        429: "too many requests from this token or client address; retry after Retry-After seconds",
        503: "the ledger store is unavailable; retry",
    }
    # Whatever needs a token is rate limited too (per token, and failures per client address).
    answers = (*codes, 429) if 401 in codes and 429 not in codes else codes
    return {code: {"description": text[code]} for code in answers}


# Dependencies

_BEARER = HTTPBearer(auto_error=False, description="a trainguard server token: tgs_tg_<id>_<secret>")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


def _server(request: Request) -> _Server:
    server = request.app.state.server
    assert isinstance(server, _Server)
    return server


def _identity(request: Request, credentials: _Credentials) -> Identity:
    """The token's identity (a sync dependency, so FastAPI runs the database reads in a thread), within the
    rate limits. No Authorization header, or not a Bearer one, is a failed authentication."""
    token = None if credentials is None else credentials.credentials
    return _server(request).authenticate(token, request.client.host if request.client else None)


_Who = Annotated[Identity, Depends(_identity)]


def _reader(who: _Who) -> Identity:
    authorize(who, Action.READ)
    return who


_Reader = Annotated[Identity, Depends(_reader)]


# Endpoints


async def _healthz() -> Response:
    return JSONResponse({"status": "ok"})


def _get_whoami(request: Request, who: _Who) -> Response:
    # Sync: FastAPI runs it in a thread, as the database read needs.
    info = _server(request).tokens.get(who.token_id)
    expires = info.expires_at.isoformat().replace("+00:00", "Z") if info and info.expires_at else None
    return JSONResponse(
        {"token_id": who.token_id, "scope": who.scope.value, "run": who.run, "expires_at": expires}
    )


async def _get_metrics(request: Request, who: _Reader) -> Response:
    text = await run_in_threadpool(_server(request).ops.metrics_text)
    return Response(text.encode("utf-8"), media_type=METRICS_TYPE)


async def _get_openapi(request: Request, who: _Reader) -> Response:
    return JSONResponse(request.app.openapi())


async def _post_events(request: Request, run: str, who: _Who) -> Response:
    _check_run(run)
    authorize(who, Action.APPEND, run)  # 403 before a byte of the body is read
    server = _server(request)
    body = await _read_body(request, server.limits)
    accepted, duplicates = await run_in_threadpool(_ingest, server, who, run, body)
    return JSONResponse({"accepted": accepted, "duplicates": duplicates})


async def _post_alive(request: Request, run: str, who: _Who) -> Response:
    _check_run(run)
    authorize(who, Action.APPEND, run)
    server = _server(request)
    # Read like any body, within the same size and time limits, so a client cannot hold a worker with one.
    if await _read_body(request, server.limits):
        raise _Problem(400, "bad_request", "a sign of life carries no body")
    await run_in_threadpool(server.ops.heard_from, run)
    return Response(status_code=204)


async def _get_events(
    request: Request,
    run: str,
    who: _Reader,
    start: Annotated[int, Query(ge=0, le=2**62, description="the log index to start looking at")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many events")] = 100,
) -> Response:
    _check_run(run)
    server = _server(request)
    body = await run_in_threadpool(
        _read_events, server, run, start, min(limit, server.limits.max_read_events)
    )
    return Response(body, media_type="application/json")


async def _get_checkpoint(request: Request, who: _Reader) -> Response:
    ledger = _server(request).ledger
    latest = await run_in_threadpool(ledger.store.latest_checkpoint)
    if latest is None:
        raise _Problem(404, "not_found", "the ledger has no checkpoint yet")
    # Served as stored and verified: a checkpoint that does not open with the ledger's key is not served.
    _, note = await run_in_threadpool(ledger.checkpoint, latest[0])
    return Response(note.encode("utf-8"), media_type="text/plain; charset=utf-8")


async def _get_tile(request: Request, path: str, who: _Reader) -> Response:
    match = _TILE.fullmatch(path)
    if match is None or encode_index(index := _decode_index(match[2])) != match[2]:
        raise _Problem(404, "not_found", "no such tile path (https://c2sp.org/tlog-tiles)")
    width = int(match[3]) if match[3] else TILE_WIDTH
    if match[3] and width >= TILE_WIDTH:
        raise _Problem(404, "not_found", "a partial tile's width is 1 to 255")
    ledger = _server(request).ledger
    try:
        if match[1] == "entries":
            data = await run_in_threadpool(read_entry_bundle, ledger, index, width)
        else:
            data = await run_in_threadpool(read_tile, ledger, int(match[1]), index, width)
    except UsageError as exc:
        raise _Problem(404, "not_found", exc.message) from None
    # A full tile never changes; a partial one is replaced by a wider one as the log grows.
    cache = _IMMUTABLE if width == TILE_WIDTH else "no-store"
    return Response(data, media_type="application/octet-stream", headers={"Cache-Control": cache})


# The work, in a thread


def _ingest(server: _Server, who: Identity, run: str, body: bytes) -> tuple[list[str], list[str]]:
    items = _parse_batch(body, run, who, server.limits)
    try:
        stored = server.keys.append(run, items, who.token_id)
    except KeyConflict as exc:
        # The keys are the client's own; naming them helps it find the edited or reused entries.
        shown = ", ".join(exc.keys[:5]) + (" ..." if len(exc.keys) > 5 else "")
        raise _Problem(
            409, "conflict", f"{len(exc.keys)} key(s) already stored with other content: {shown}"
        ) from None
    server.ops.heard_from(run)
    return stored


def _parse_batch(body: bytes, run: str, who: Identity, limits: ServeLimits) -> list[tuple[str, bytes]]:
    """(key, canonical event bytes) of every event in the body; _Problem or NotAuthorized otherwise."""
    try:
        doc = loads_strict(body, parse_int=_json_int)
    except (ValueError, RecursionError):
        raise _Problem(400, "bad_request", "the body is not JSON") from None
    if not isinstance(doc, dict) or doc.keys() != {"events"} or not isinstance(doc["events"], list):
        raise _Problem(400, "bad_request", 'the body must be {"events": [{"key": ..., "event": ...}, ...]}')
    events = doc["events"]
    if not events:
        raise _Problem(400, "bad_request", "the batch holds no events")
    if len(events) > limits.max_events:
        raise _Problem(413, "too_large", f"a batch holds at most {limits.max_events} events")
    items: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for i, item in enumerate(events):
        if not isinstance(item, dict) or item.keys() != {"key", "event"}:
            raise _Problem(400, "bad_request", f'events[{i}] must be {{"key": ..., "event": ...}}')
        key = item["key"]
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise _Problem(400, "bad_request", f"events[{i}].key must be 1 to 200 of A-Z a-z 0-9 . _ : / -")
        if key in seen:
            raise _Problem(400, "bad_request", f"events[{i}].key is used twice in the batch")
        if key.startswith(RESERVED_KEY_PREFIX):
            raise _Problem(
                400, "bad_request", f"events[{i}].key: keys starting {RESERVED_KEY_PREFIX!r} are the server's"
            )
        seen.add(key)
        items.append((key, _event_bytes(item["event"], i, run, who, limits)))
    return items


def _event_bytes(doc: object, i: int, run: str, who: Identity, limits: ServeLimits) -> bytes:
    try:
        data = canonical_json(doc)
    except (ValueError, TypeError, RecursionError):
        raise _Problem(400, "bad_request", f"events[{i}].event cannot be written as RFC 8785 JSON") from None
    if len(data) > limits.max_event_bytes:
        raise _Problem(
            413,
            "too_large",
            f"events[{i}] is {len(data)} bytes; an event is at most {limits.max_event_bytes}",
        )
    try:
        event = Event.from_canonical(data)
    except EntryError as exc:
        message = exc.message.removeprefix("entry is not a valid event: ")
        raise _Problem(400, "bad_request", f"events[{i}].event: {message}") from None
    if event.type.startswith(RESERVED_TYPE_PREFIX):
        # The server's own notices (a run judged silent) must not be forged, or pre-empted, by a job.
        raise _Problem(
            400, "bad_request", f"events[{i}]: types starting {RESERVED_TYPE_PREFIX!r} are the server's"
        )
    authorize(who, Action.APPEND, event.run_id)  # a job token's events belong to its run
    if event.run_id != run:
        raise _Problem(400, "bad_request", f"events[{i}] belongs to another run than the URL names")
    return data


def _read_events(server: _Server, run: str, start: int, limit: int) -> bytes:
    """The JSON answer: events of `run` at indices from `start`, and where the next window starts."""
    limits = server.limits
    size = server.ledger.size
    end = min(size, start + limits.read_window)
    parts: list[bytes] = []
    total = 0
    following: int | None = end if end < size else None
    for index, event in server.ledger.entries(start, end):
        if event.run_id != run:
            continue
        data = event.canonical()
        if len(parts) == limit or total + len(data) > limits.max_read_bytes:
            following = index
            break
        # The stored bytes, verbatim: canonical JSON, served as application/json (never HTML).
        parts.append(b'{"index":%d,"event":%s}' % (index, data))
        total += len(data)
    tail = b"null" if following is None else str(following).encode()
    return b'{"events":[' + b",".join(parts) + b'],"next":' + tail + b"}"


# Helpers


def _check_run(run: str) -> None:
    if not run or len(run) > _MAX_RUN or not run.isprintable():
        raise _Problem(400, "bad_request", f"a run id is 1 to {_MAX_RUN} printable characters")


async def _read_body(request: Request, limits: ServeLimits) -> bytes:
    """The body, refused with 413 as soon as it is known to be too large: from Content-Length before a byte
    is read, else while it streams in."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isascii() or not declared.isdigit()):
        raise _Problem(400, "bad_request", "Content-Length is not a number")
    if declared is not None and (len(declared) > 18 or int(declared) > limit):
        raise _Problem(413, "too_large", f"the body is at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _Problem(413, "too_large", f"the body is at most {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _Problem(408, "timeout", f"the body took more than {limits.body_timeout_s:g} s") from None
    return b"".join(chunks)


def _decode_index(text: str) -> int:
    return int("".join(group.lstrip("x") for group in text.split("/")))


_MAX_SAFE_INT = 2**53 - 1


def _json_int(text: str) -> int | float:
    # As the ledger reads entries: RFC 8785 writes large doubles such as 1e16 in integer form. An integer
    # that no double holds exactly (2**64 + 1) is refused: the ledger would keep another number than sent.
    value = int(text)
    if abs(value) <= _MAX_SAFE_INT:
        return value
    number = float(text)
    if number != value:  # exact: Python compares an int and a float by value
        raise ValueError("an integer beyond 2**53 that no double holds exactly")
    return number


# Answers


def _json(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _problem_answer(request: Request, exc: _Problem) -> Response:
    return _json(exc.status, {"error": exc.error, "message": exc.message}, exc.headers)


async def _unauthenticated(request: Request, exc: AuthenticationFailed) -> Response:
    # One answer for every failure, so a caller learns nothing about a token it does not hold; the reason
    # (and the token's id, named only once its secret matched) goes to the log, the token never does.
    _LOG.warning("refused %s %s: %s", request.method, request.url.path, exc.message)
    return _json(401, _UNAUTHENTICATED, _AUTH_CHALLENGE)


async def _rate_limited(request: Request, exc: RateLimited) -> Response:
    # Generic on purpose: neither the limit nor the count, nor whose; the reason goes to the log.
    _LOG.warning("rate limited %s %s: %s", request.method, request.url.path, exc)
    return _json(
        429,
        {"error": "rate_limited", "message": "too many requests; retry later"},
        {"Retry-After": str(exc.retry_after)},
    )


async def _forbidden(request: Request, exc: NotAuthorized) -> Response:
    _LOG.warning("forbidden %s %s: %s", request.method, request.url.path, exc.message)
    return _json(403, {"error": "forbidden", "message": exc.message})


async def _store_failed(request: Request, exc: StoreError) -> Response:
    _LOG.error("%s %s: %s", request.method, request.url.path, exc.diagnostics())
    return _json(
        503, {"error": "unavailable", "message": "the ledger store is unavailable"}, {"Retry-After": "5"}
    )


async def _bad_request(request: Request, exc: RequestValidationError) -> Response:
    # FastAPI's own answer echoes the input back; name only where the problem is.
    where = sorted({".".join(str(part) for part in error.get("loc", ())) for error in exc.errors()})
    return _json(400, {"error": "bad_request", "message": f"invalid {', '.join(where) or 'request'}"})


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
    return _json(exc.status_code, {"error": error, "message": str(exc.detail)}, exc.headers)


class _SecurityHeaders:
    """Adds the security headers to every answer (``Cache-Control: no-store`` unless one is set), and
    turns an unexpected exception into a JSON 500 that carries them too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in _SECURITY_HEADERS:
                    headers.setdefault(name, value)  # a page sets its own Content-Security-Policy
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            if started:
                raise
            detail = exc.diagnostics() if isinstance(exc, TrainguardError) else repr(exc)
            _LOG.error("internal error on %s %s: %s", scope.get("method"), scope.get("path"), detail)
            answer = _json(500, {"error": "internal", "message": "internal server error"})
            await answer(scope, receive, send_with_headers)
