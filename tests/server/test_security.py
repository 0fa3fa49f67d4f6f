"""The security matrix of `trainguard serve`, over every route the app has, against the real command.

The routes come from walking the app (`app.routes`), so a route added later is in the matrix without
anyone listing it here; only the routes that must answer without a token are named (OPEN, with the reason
for each), and those are checked to hold nothing secret. Each route meets: no credentials, malformed,
unknown, wrong-secret, expired and revoked tokens, as a bearer header and as the dashboard's session
cookie (one answer for all of them, never the resource); a job token and a viewer where their scope does
not reach; bodies too large by Content-Length and by an endless chunked stream (refused before they are
read), and too slow (408); hostile JSON; script tags in every field that comes back. Every answer must
carry the security headers, and no token secret may reach an answer or the server's log.

TLS. `trainguard serve` speaks plain HTTP unless given --tls-cert and --tls-key (uvicorn's own TLS); a
cluster usually puts it behind a reverse proxy that terminates TLS, listening on loopback. Bearer tokens
over plain HTTP on a network can be read and replayed by anyone on the path, so the command warns on
stderr when it listens on a non-loopback address without TLS (tested below); it does not refuse, because
a proxy on another host of a trusted network is a legitimate setup.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.server.live_server import (
    ENV_BODY_TIMEOUT,
    ENV_MAX_BODY,
    JOB_RUN,
    OTHER_RUN,
    REPO,
    Ledger,
    LiveServer,
    batch,
    close_app,
    make_app,
    make_ledger,
    token_id,
)
from tests.server.serve_process import (
    DEADLINE_S,
    Answer,
    events_path,
    free_port,
    read_answer,
    self_signed_certificate,
)
from trainguard.ledger import Ledger as LedgerStore
from trainguard.ledger import new_event

SEEDED_RUN = "seeded-run"
# JOB_RUN in fullwidth letters: equal to it under NFKC, so a server that normalised would let it through.
FULLWIDTH_JOB_RUN = "".join(chr(ord(ch) + 0xFEE0) if ch.isalpha() else ch for ch in JOB_RUN)
MARKER = "resource-marker-7f3a"
"""In the seeded run's payload: an answer holding it served the resource."""
SCRIPT = "<script>alert(document.cookie)</script>"
COOKIE = "trainguard_session"
GENERIC_401 = {"error": "unauthenticated", "message": "a valid bearer token is required"}

# Routes that answer without a token, and why. Everything else must refuse one that does not authenticate.
OPEN = {
    ("GET", "/healthz"): "load balancers probe it; it says ok and nothing else",
    ("GET", "/"): "redirects to the dashboard, which asks for a login",
    ("GET", "/ui/login"): "the form a browser logs in with",
    ("POST", "/ui/login"): "takes the token to log in with (checked like any other)",
    ("POST", "/ui/logout"): "forgets the browser's cookie; needs this server's Origin",
    ("GET", "/ui/static/{name}"): "the dashboard's stylesheet and scripts, shipped in the package",
}
SAMPLE_PATH_VALUES = {"run": SEEDED_RUN, "path": "0/000", "index": "0", "name": "dashboard.css"}
SAMPLE_QUERY_VALUES = {"id": SEEDED_RUN, "run": SEEDED_RUN, "run_id": SEEDED_RUN}
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass(frozen=True)
class RouteCase:
    method: str
    template: str
    """The path as OpenAPI writes it: /tile/{path}."""
    documented: bool
    """In the OpenAPI description: an API route, answered in JSON."""
    query: tuple[str, ...]

    @property
    def open(self) -> bool:
        return (self.method, self.template) in OPEN

    def path(self, **values: str) -> str:
        def fill(match: re.Match[str]) -> str:
            name = match[1]
            return quote(values.get(name, SAMPLE_PATH_VALUES.get(name, "0")), safe="/")

        path = re.sub(r"\{(\w+)\}", fill, self.template)
        query = [f"{name}={quote(SAMPLE_QUERY_VALUES.get(name, '0'))}" for name in self.query]
        return path + ("?" + "&".join(query) if query else "")

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


def _query_names(dependant: object) -> list[str]:
    names = [field.alias for field in getattr(dependant, "query_params", [])]
    for sub in getattr(dependant, "dependencies", []):
        names += _query_names(sub)
    return names


def _walk_routes() -> list[RouteCase]:
    """Every (method, path) of the app, found by walking a throwaway instance's routes."""
    from fastapi.routing import APIRoute
    from starlette.routing import Mount, Route

    with tempfile.TemporaryDirectory() as tmp:
        app = make_app(make_ledger(Path(tmp)))
        try:
            cases: list[RouteCase] = []
            for route in app.routes:
                if isinstance(route, Mount):  # static files: any name under it
                    cases.append(RouteCase("GET", route.path + "/{name}", False, ()))
                    continue
                if not isinstance(route, APIRoute | Route) or not route.methods:
                    continue  # a websocket would need its own test; the app has none
                template = re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route.path)
                documented = isinstance(route, APIRoute) and route.include_in_schema
                query = tuple(_query_names(route.dependant)) if isinstance(route, APIRoute) else ()
                methods = sorted(route.methods - {"HEAD"})
                cases.extend(RouteCase(method, template, documented, query) for method in methods)
            return cases
        finally:
            close_app(app)


ROUTES = _walk_routes()
GUARDED = [route for route in ROUTES if not route.open]
BODY_ROUTES = [route for route in ROUTES if route.method in BODY_METHODS]


def test_the_walk_found_the_api_and_the_open_list_is_current() -> None:
    found = {(route.method, route.template) for route in ROUTES}
    assert ("POST", "/api/v1/runs/{run}/events") in found and ("GET", "/checkpoint") in found
    stale = [key for key in OPEN if key not in found]
    assert not stale, f"OPEN names routes the app no longer has: {stale}"


# The server, with a run whose events carry MARKER


@dataclass
class Cluster:
    ledger: Ledger
    server: LiveServer

    def tokens(self) -> list[str]:
        return self.ledger.tokens.all()

    def size(self) -> int:
        with LedgerStore.open(self.ledger.store, create=False) as store:
            return store.size

    def answer_leaks(self, answer: Answer) -> list[str]:
        """What secret the answer shows: a token's secret, the signing key, or the resource's marker."""
        seen = answer.body + repr(answer.headers).encode()
        leaks = [
            f"secret of token {token_id(t)}" for t in self.tokens() if t.split("_", 3)[3].encode() in seen
        ]
        if _private_key_text(self.ledger.key).encode() in seen:
            leaks.append("the ledger's private key")
        return leaks


def _private_key_text(path: Path) -> str:
    return path.read_text().strip().split("+", 4)[4]  # PRIVATE+KEY+<name>+<id>+<base64 seed>


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    ledger = make_ledger(tmp_path_factory.mktemp("security"))
    server = LiveServer(ledger)
    try:
        seeded = server.request("POST", events_path(SEEDED_RUN), _marked_batch(), ledger.tokens.admin)
        assert seeded.status == 200, seeded
        yield Cluster(ledger, server)
    finally:
        server.stop()


def _marked_batch() -> bytes:
    return batch(SEEDED_RUN, "seed", 2, note=MARKER)


def _body_for(route: RouteCase) -> bytes | None:
    if route.method not in BODY_METHODS:
        return None
    if route.template == "/api/v1/runs/{run}/events":
        return batch(SEEDED_RUN, f"again-{time.monotonic_ns()}", 1, note=MARKER)
    return b"{}"


def _assert_security_headers(answer: Answer, what: str) -> None:
    headers = answer.headers
    assert headers.get("x-content-type-options") == "nosniff", (what, headers)
    # The dashboard's pages link to each other (same-origin); nothing sends a referrer to another site.
    assert headers.get("referrer-policy") in ("no-referrer", "same-origin"), (what, headers)
    assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), (what, headers)
    assert "cache-control" in headers, (what, headers)
    assert "server" not in headers, (what, headers)  # no software banner
    # No CORS grant: another site's script can never read an answer, even with a browser's cookie.
    assert not [name for name in headers if name.startswith("access-control-")], (what, headers)


# Credentials that must not authenticate


def _bad_tokens(c: Cluster) -> dict[str, str]:
    admin = c.ledger.tokens.admin
    secret = admin.split("_", 3)[3]
    flipped = ("B" if secret[0] != "B" else "C") + secret[1:]
    return {
        "garbage": "not-a-token",
        "truncated": admin[:-1],
        "unknown id": "tgs_tg_00000000_" + "A" * 43,
        "wrong secret": f"tgs_{token_id(admin)}_{flipped}",
        "expired": c.ledger.tokens.expired,
        "revoked": c.ledger.tokens.revoked,
        "with a newline": admin + "\n",
    }


def _bad_credentials(c: Cluster) -> dict[str, dict[str, str]]:
    variants: dict[str, dict[str, str]] = {
        "no credentials": {},
        "basic auth": {"Authorization": "Basic YWRtaW46YWRtaW4="},
        "empty bearer": {"Authorization": "Bearer "},
        "token without scheme": {"Authorization": c.ledger.tokens.revoked},
    }
    for name, token in _bad_tokens(c).items():
        if "\n" not in token:  # a header cannot carry a newline; the cookie test skips it too
            variants[f"bearer {name}"] = {"Authorization": f"Bearer {token}"}
            variants[f"cookie {name}"] = {"Cookie": f"{COOKIE}={token}"}
    return variants


def _is_refusal(answer: Answer, route: RouteCase) -> bool:
    if route.documented:  # the API: exactly the one 401
        return (
            answer.status == 401
            and answer.headers.get("content-type") == "application/json"
            and json.loads(answer.body) == GENERIC_401
            and answer.headers.get("www-authenticate", "").startswith("Bearer")
        )
    if answer.status in (401, 403):
        return True
    # A page sends the browser to log in, at a route that is open.
    location = urlsplit(answer.headers.get("location", "")).path
    return answer.status in (302, 303, 307) and any(
        method == "GET" and template == location for method, template in OPEN
    )


@pytest.mark.parametrize("route", GUARDED, ids=str)
def test_credentials_that_do_not_authenticate_get_one_refusal(cluster: Cluster, route: RouteCase) -> None:
    before = cluster.size()
    answers: dict[str, Answer] = {}
    for name, headers in _bad_credentials(cluster).items():
        answer = cluster.server.request(route.method, route.path(), _body_for(route), headers=headers)
        answers[name] = answer
        assert _is_refusal(answer, route), (name, answer)
        assert MARKER.encode() not in answer.body, (name, "the resource was served")
        assert not cluster.answer_leaks(answer), name
        _assert_security_headers(answer, name)
    # One answer for every failure: a caller learns nothing about a token it does not hold.
    distinct = {(a.status, a.body, a.headers.get("location")) for a in answers.values()}
    assert len(distinct) == 1, {name: (a.status, a.body[:80]) for name, a in answers.items()}
    assert cluster.size() == before, "a refused request appended"


def _documented_403(route: RouteCase, spec: dict[str, object]) -> bool:
    paths = spec["paths"]
    assert isinstance(paths, dict)
    operation = paths.get(route.template, {}).get(route.method.lower(), {})
    return "403" in operation.get("responses", {})


@pytest.fixture(scope="module")
def spec(cluster: Cluster) -> dict[str, object]:
    answer = cluster.server.request("GET", "/openapi.json", token=cluster.ledger.tokens.viewer)
    doc = answer.json()
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("route", GUARDED, ids=str)
def test_a_job_token_reaches_nothing_but_its_own_run(
    cluster: Cluster, spec: dict[str, object], route: RouteCase
) -> None:
    """A job token sits where any code of the job can read it: it appends to its run, and that is all."""
    before = cluster.size()
    job = cluster.ledger.tokens.job
    for where, headers in (
        ("bearer", {"Authorization": f"Bearer {job}"}),
        ("cookie", {"Cookie": f"{COOKIE}={job}"}),
    ):
        answer = cluster.server.request(route.method, route.path(), _body_for(route), headers=headers)
        assert MARKER.encode() not in answer.body, (where, "a job token read another run")
        assert not cluster.answer_leaks(answer), where
        _assert_security_headers(answer, where)
        if route.documented and not _documented_403(route, spec):
            # An operation no scope is refused (whoami): any valid token may ask it.
            assert answer.status < 500, (where, answer)
        elif route.documented and where == "bearer":
            assert answer.status == 403, (where, answer)
            assert answer.json()["error"] == "forbidden"
        else:
            assert answer.status in (401, 403) or _is_refusal(answer, route), (where, answer)
    assert cluster.size() == before, "a job token appended to a run not its own"


@pytest.mark.parametrize("route", [r for r in GUARDED if r.method in BODY_METHODS], ids=str)
def test_a_viewer_writes_nothing(cluster: Cluster, route: RouteCase) -> None:
    before = cluster.size()
    viewer = cluster.ledger.tokens.viewer
    for headers in ({"Authorization": f"Bearer {viewer}"}, {"Cookie": f"{COOKIE}={viewer}"}):
        answer = cluster.server.request(route.method, route.path(), _body_for(route), headers=headers)
        assert answer.status in (401, 403) or _is_refusal(answer, route), (headers.keys(), answer)
        _assert_security_headers(answer, "viewer")
    assert cluster.size() == before


# A job token writing another run


def _job_events(run: str, prefix: str) -> bytes:
    return batch(run, prefix, 1)


@pytest.mark.parametrize(
    ("url_run", "event_run"),
    [
        pytest.param(OTHER_RUN, OTHER_RUN, id="another run in the URL"),
        pytest.param(JOB_RUN, OTHER_RUN, id="another run in the event under its own URL"),
        pytest.param(OTHER_RUN, JOB_RUN, id="its run in the event under another URL"),
        pytest.param(JOB_RUN + "/", JOB_RUN, id="trailing slash"),
        pytest.param(JOB_RUN + "/../" + OTHER_RUN, OTHER_RUN, id="dot-dot in the run"),
        pytest.param(JOB_RUN.upper(), JOB_RUN.upper(), id="other case"),
        pytest.param(JOB_RUN + " ", JOB_RUN + " ", id="trailing space"),
        pytest.param(FULLWIDTH_JOB_RUN, FULLWIDTH_JOB_RUN, id="fullwidth look-alike"),
        pytest.param(JOB_RUN + "\u200b", JOB_RUN + "\u200b", id="zero-width space"),
    ],
)
def test_a_job_token_cannot_write_another_run(cluster: Cluster, url_run: str, event_run: str) -> None:
    before = cluster.size()
    body = _job_events(event_run, f"cross-{time.monotonic_ns()}")
    answer = cluster.server.request("POST", events_path(url_run), body, cluster.ledger.tokens.job)
    assert answer.status in (400, 403), answer
    assert answer.json()["error"] in ("forbidden", "bad_request")
    assert cluster.size() == before


def test_a_job_token_cannot_write_an_event_of_no_run(cluster: Cluster) -> None:
    event = json.loads(new_event("test.step", {}, run_id=None).canonical())
    body = json.dumps({"events": [{"key": "no-run/0", "event": event}]}).encode()
    before = cluster.size()
    answer = cluster.server.request("POST", events_path(JOB_RUN), body, cluster.ledger.tokens.job)
    assert answer.status == 403, answer
    assert cluster.size() == before


def test_a_job_token_writes_its_own_run(cluster: Cluster) -> None:
    """The matrix above refuses for the right reason: the same token, on its own run, is accepted."""
    body = _job_events(JOB_RUN, f"own-{time.monotonic_ns()}")
    answer = cluster.server.request("POST", events_path(JOB_RUN), body, cluster.ledger.tokens.job)
    assert answer.status == 200, answer


# Bodies too large, too slow


def _head(method: str, path: str, headers: dict[str, str], port: int) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _auth_headers(c: Cluster, route: RouteCase, server: LiveServer) -> dict[str, str]:
    admin = c.ledger.tokens.admin
    headers = {"Authorization": f"Bearer {admin}", "Cookie": f"{COOKIE}={admin}"}
    if route.open:  # a browser's form post: its own origin, a form body
        headers |= {"Origin": server.url, "Content-Type": "application/x-www-form-urlencoded"}
    else:
        headers["Content-Type"] = "application/json"
    return headers


def _documents(route: RouteCase, spec: dict[str, object], status: int) -> bool:
    paths = spec["paths"]
    assert isinstance(paths, dict)
    operation = paths.get(route.template, {}).get(route.method.lower(), {})
    return str(status) in operation.get("responses", {})


HANG_S = 10.0
"""How long an answer may be missing before the server is taken to wait for the body (its deadline: 1 s)."""


def _answer_or_fail(sock: socket.socket) -> Answer:
    sock.settimeout(HANG_S)
    try:
        return read_answer(sock)
    except TimeoutError:
        pytest.fail("the server still waits for the body")


@pytest.mark.parametrize("route", BODY_ROUTES, ids=str)
def test_a_body_declared_too_large_is_refused_unread(
    cluster: Cluster, spec: dict[str, object], route: RouteCase
) -> None:
    """Content-Length says 1 GiB; a dozen bytes follow. The answer comes without the rest."""
    before = cluster.size()
    headers = _auth_headers(cluster, route, cluster.server) | {"Content-Length": str(1 << 30)}
    with cluster.server.socket() as sock:
        sock.sendall(_head(route.method, route.path(), headers, cluster.server.port) + b'{"events": [')
        answer = _answer_or_fail(sock)
    # Answered with the body still unsent: refused, or (logout) done without needing it.
    assert answer.status < 500, answer
    if _documents(route, spec, 413):
        assert answer.status == 413, answer
    _assert_security_headers(answer, "declared too large")
    assert cluster.size() == before


def _stream_until_answered(sock: socket.socket, head: bytes, total: int) -> tuple[Answer, int]:
    """Send `head`, then a chunked body of up to `total` bytes until the server answers; (answer, sent)."""
    sock.sendall(head)
    piece = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    sent = 0
    pending = memoryview(b"")
    sock.setblocking(False)
    try:
        while True:
            writers = [sock] if sent < total or pending else []
            readable, writable, _ = select.select([sock], writers, [], DEADLINE_S)
            if readable:
                break
            if not readable and not writable:
                raise AssertionError(f"no answer after {sent} bytes")
            if not pending:
                pending = memoryview(chunk)
                sent += len(piece)
            try:
                pending = pending[sock.send(pending) :]
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed: its answer, if any, is waiting to be read
    finally:
        sock.setblocking(True)
        sock.settimeout(DEADLINE_S)
    return read_answer(sock), sent


@pytest.fixture(scope="module")
def limited(cluster: Cluster) -> Iterator[LiveServer]:
    """The same app and ledger under uvicorn with a 1 s body timeout and a 64 KiB body limit."""
    env = {ENV_BODY_TIMEOUT: "1", ENV_MAX_BODY: str(64 << 10)}
    server = LiveServer(cluster.ledger, limited=True, extra_env=env)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("route", BODY_ROUTES, ids=str)
def test_an_endless_chunked_body_is_refused_unread(
    cluster: Cluster, limited: LiveServer, spec: dict[str, object], route: RouteCase
) -> None:
    """No Content-Length: the body streams until the server answers, which must be long before 32 MiB."""
    total = 32 << 20
    headers = _auth_headers(cluster, route, limited) | {"Transfer-Encoding": "chunked"}
    with limited.socket() as sock:
        answer, sent = _stream_until_answered(
            sock, _head(route.method, route.path(), headers, limited.port), total
        )
    assert sent < total, "the server read the whole body before it answered"
    assert answer.status < 500, answer
    if _documents(route, spec, 413):
        assert answer.status == 413, answer


@pytest.mark.parametrize(
    "route",
    [r for r in BODY_ROUTES if (r.method, r.template) != ("POST", "/ui/logout")],  # reads no body
    ids=str,
)
def test_a_slow_body_is_408(cluster: Cluster, limited: LiveServer, route: RouteCase) -> None:
    """Half a body, then silence: the server gives up (after 1 s here) with 408, without waiting more."""
    headers = _auth_headers(cluster, route, limited) | {"Content-Length": "100"}
    with limited.socket() as sock:
        sock.sendall(_head(route.method, route.path(), headers, limited.port) + b'{"events": [')
        answer = _answer_or_fail(sock)
    assert answer.status == 408, answer
    _assert_security_headers(answer, "slow body")


# Hostile JSON

HOSTILE_JSON = {
    "deep nesting": b'{"events": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep nesting in an event": b'{"events": [{"key": "k", "event": '
    + b'{"a":' * 5000
    + b"1"
    + b"}" * 5000
    + b"}]}",
    "number too large for a double": b'{"events": [{"key": "k", "event": {"payload": {"n": 1e400}}}]}',
    "integer of 5000 digits": b'{"events": [{"key": "k", "event": {"payload": {"n": '
    + b"9" * 5000
    + b"}}}]}",
    "NaN": b'{"events": [{"key": "k", "event": {"payload": {"n": NaN}}}]}',
    "Infinity": b'{"events": [{"key": "k", "event": {"payload": {"n": -Infinity}}}]}',
    "invalid UTF-8": b'{"events": [{"key": "k", "event": {"payload": {"s": "\xff\xfe"}}}]}',
    "overlong UTF-8": b'{"events": [{"key": "k", "event": {"payload": {"s": "\xc0\xbc"}}}]}',
    "lone surrogate escaped": b'{"events": [{"key": "k", "event": {"payload": {"s": "\\ud800"}}}]}',
    "lone surrogate in a key": b'{"events": [{"key": "k", "event": {"payload": {"\\udfff": 1}}}]}',
    "duplicate keys at the top": b'{"events": [], "events": []}',
    "duplicate keys in an event": b'{"events": [{"key": "k", "key": "j", "event": {}}]}',
    "UTF-8 byte order mark": b'\xef\xbb\xbf{"events": []}',
    "UTF-16": '{"events": []}'.encode("utf-16"),
    "trailing garbage": b'{"events": []} x',
    "empty body": b"",
    "NUL byte": b'{"events": [\x00]}',
    "not an object": b"[]",
}


def _events_with(payload_json: str) -> bytes:
    """A valid batch for SEEDED_RUN whose payload is the given JSON text."""
    event = json.loads(new_event("test.step", {}, run_id=SEEDED_RUN).canonical())
    text = json.dumps(event).replace('"payload": {}', f'"payload": {payload_json}')
    return b'{"events": [{"key": "hostile", "event": ' + text.encode() + b"}]}"


HOSTILE_EVENTS = {
    "duplicate key in a payload": '{"a": 1, "a": 2}',
    "integer beyond 2**64": '{"n": 18446744073709551617}',
    "float that overflows": '{"n": 1e309}',
    "lone surrogate in a payload": '{"s": "\\udc00"}',
}


def _json_body_routes(spec: dict[str, object]) -> list[RouteCase]:
    paths = spec["paths"]
    assert isinstance(paths, dict)
    return [
        route
        for route in BODY_ROUTES
        if "application/json"
        in paths.get(route.template, {})
        .get(route.method.lower(), {})
        .get("requestBody", {})
        .get("content", {})
    ]


@pytest.mark.parametrize("name", [*HOSTILE_JSON, *HOSTILE_EVENTS])
def test_hostile_json_is_400_on_every_json_route(
    cluster: Cluster, spec: dict[str, object], name: str
) -> None:
    routes = _json_body_routes(spec)
    assert routes, "no operation takes JSON"
    body = HOSTILE_JSON[name] if name in HOSTILE_JSON else _events_with(HOSTILE_EVENTS[name])
    before = cluster.size()
    for route in routes:
        answer = cluster.server.request(route.method, route.path(), body, cluster.ledger.tokens.admin)
        assert answer.status == 400, (str(route), answer)
        assert answer.json()["error"] == "bad_request"
        _assert_security_headers(answer, name)
    assert cluster.size() == before


# Headers, leaks, scripts


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_every_answer_carries_the_security_headers(cluster: Cluster, route: RouteCase) -> None:
    admin = {
        "Authorization": f"Bearer {cluster.ledger.tokens.admin}",
        "Cookie": f"{COOKIE}={cluster.ledger.tokens.admin}",
    }
    for what, headers in (("no credentials", {}), ("admin", admin)):
        answer = cluster.server.request(route.method, route.path(), _body_for(route), headers=headers)
        assert answer.status < 500, (what, answer)
        _assert_security_headers(answer, what)
        assert not cluster.answer_leaks(answer), what


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/no/such/route"),
        ("GET", "/api/v1/runs"),
        ("DELETE", "/checkpoint"),
        ("PUT", events_path(SEEDED_RUN)),
        ("OPTIONS", "/checkpoint"),
        ("TRACE", "/healthz"),
        ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
        ("GET", "/tile/../checkpoint"),
        ("GET", "/ui/static/..%2F_app.py"),
        ("GET", "/ui/static/%2e%2e%2f%2e%2e%2f__init__.py"),
        ("GET", "/ui/static/_app.py"),
    ],
)
def test_errors_and_unknown_routes_carry_the_headers_too(cluster: Cluster, method: str, path: str) -> None:
    answer = cluster.server.request(method, path, token=cluster.ledger.tokens.admin)
    assert answer.status in (400, 401, 404, 405), answer
    assert answer.headers["content-type"] == "application/json", answer
    assert b"import " not in answer.body  # no source file of the package
    _assert_security_headers(answer, f"{method} {path}")


def test_no_token_reaches_the_log_or_an_answer(tmp_path: Path) -> None:
    """Every token, sent every way a client might (even the wrong ones: in the URL, as a run id, in the
    login form), to every route; then the server's whole output is read."""
    ledger = make_ledger(tmp_path / "logs")
    server = LiveServer(ledger)
    c = Cluster(ledger, server)
    try:
        for token in [*ledger.tokens.all(), *_bad_tokens(c).values()]:
            clean = token.strip()
            for route in ROUTES:
                path = route.path()
                sep = "&" if "?" in path else "?"
                for headers, url in (
                    ({"Authorization": f"Bearer {clean}"}, path),
                    ({"Cookie": f"{COOKIE}={clean}"}, path),
                    ({}, f"{path}{sep}token={clean}&access_token={clean}"),
                    ({}, route.path(run=clean, name=clean, index=clean, path=clean)),
                ):
                    answer = server.request(route.method, url, _body_for(route), headers=headers)
                    assert answer.status < 500, (str(route), answer)
                    assert not c.answer_leaks(answer), str(route)
            form = f"token={quote(clean)}".encode()
            server.request(
                "POST",
                "/ui/login",
                form,
                headers={"Origin": server.url, "Content-Type": "application/x-www-form-urlencoded"},
            )
    finally:
        server.stop()
    output = server.output()
    assert '"GET /checkpoint' in output  # the access log was on
    leaked = [token_id(t) for t in ledger.tokens.all() if t.split("_", 3)[3] in output]
    assert not leaked, f"the log holds the secret of {leaked}"
    assert _private_key_text(ledger.key) not in output


def _scripted_event(run: str) -> bytes:
    event = json.loads(new_event("test.step", {}, run_id=run).canonical())
    event["type"] = SCRIPT
    event["actor"]["user"] = SCRIPT
    event["actor"]["host"] = f"<img src=x onerror=alert(1)>{SCRIPT}"
    event["payload"] = {SCRIPT: SCRIPT, "nested": [{"html": f"</script>{SCRIPT}<!--"}], "attr": '" onload="x'}
    return json.dumps({"events": [{"key": "xss/0", "event": event}]}).encode()


def test_script_tags_in_every_text_field_come_back_as_json(cluster: Cluster) -> None:
    run = f"{SCRIPT}-run"
    admin = cluster.ledger.tokens.admin
    posted = cluster.server.request("POST", events_path(run), _scripted_event(run), admin)
    assert posted.status == 200, posted
    read = cluster.server.request("GET", events_path(run), token=cluster.ledger.tokens.viewer)
    assert read.status == 200
    doc = read.json()  # application/json, exactly
    event = doc["events"][0]["event"]
    assert event["type"] == SCRIPT and event["run_id"] == run and event["payload"][SCRIPT] == SCRIPT
    _assert_security_headers(read, "read back")
    # A refusal that names the run (a job token, another run) is JSON too.
    refused = cluster.server.request(
        "POST", events_path(run), _scripted_event(run), cluster.ledger.tokens.job
    )
    assert refused.status == 403 and refused.headers["content-type"] == "application/json"


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_a_script_in_a_path_or_query_is_never_served_as_html(cluster: Cluster, route: RouteCase) -> None:
    admin = cluster.ledger.tokens.admin
    values = dict.fromkeys(("run", "path", "index", "name"), SCRIPT)
    path = route.path(**values)
    sep = "&" if "?" in path else "?"
    for url in (path, f"{path}{sep}{quote(SCRIPT)}={quote(SCRIPT)}"):
        for headers in ({"Authorization": f"Bearer {admin}", "Cookie": f"{COOKIE}={admin}"}, {}):
            answer = cluster.server.request(route.method, url, _body_for(route), headers=headers)
            assert answer.status < 500, answer
            if answer.headers.get("content-type", "").startswith("text/html"):
                assert SCRIPT.encode() not in answer.body, f"{route}: a script tag came back as HTML"
            _assert_security_headers(answer, url)


# Plain HTTP on a network


def _serve_argv(ledger: Ledger, host: str, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "trainguard", "serve", "--store", ledger.store, "--key", str(ledger.key)),
        *("--host", host, "--port", str(free_port()), *extra),
    ]


def _stderr_of(argv: list[str], home: Path) -> str:
    """Start the command, which cannot bind TEST-NET-1 and exits; what it wrote on stderr by then."""
    import os

    env = {**os.environ, "TRAINGUARD_HOME": str(home)}
    env.pop("TRAINGUARD_LEDGER", None)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)
    return done.stderr


# 192.0.2.1 is TEST-NET-1 (RFC 5737): no host has it, so the server warns, fails to bind and exits, and
# nothing ever listens on a real network.
NOT_LOOPBACK = "192.0.2.1"
WARNING = "WARNING: serving plain HTTP on"


def test_plain_http_on_a_network_address_warns(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path / "plain")
    stderr = _stderr_of(_serve_argv(ledger, NOT_LOOPBACK), ledger.home)
    assert f"{WARNING} {NOT_LOOPBACK}" in stderr, stderr
    assert "--tls-cert" in stderr


def test_tls_or_loopback_does_not_warn(tmp_path: Path, cluster: Cluster) -> None:
    ledger = make_ledger(tmp_path / "tls")
    cert, key = self_signed_certificate(tmp_path)
    stderr = _stderr_of(
        _serve_argv(ledger, NOT_LOOPBACK, "--tls-cert", str(cert), "--tls-key", str(key)), ledger.home
    )
    assert "trainguard: serving" in stderr and "https://" in stderr, stderr  # it got as far as binding
    assert WARNING not in stderr, stderr
    assert WARNING not in cluster.server.output()  # the module's server listens on 127.0.0.1


# Guessing tokens is rate limited on every route

FAILURE_LIMIT = 3


@pytest.fixture(scope="module")
def rate_limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server that refuses a client address after FAILURE_LIMIT failed tokens in an hour. The address
    is each test's own, sent as X-Forwarded-For, which the server believes from loopback (its default)."""
    ledger = make_ledger(tmp_path_factory.mktemp("rate"))
    flags = ("--rate-failures", str(FAILURE_LIMIT), "--rate-window", "3600")
    server = LiveServer(ledger, flags=flags)
    try:
        yield Cluster(ledger, server)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("route", "address"),
    # TEST-NET-2 addresses: each route's guesser is a client of its own.
    [pytest.param(r, f"198.51.100.{i}", id=str(r)) for i, r in enumerate(GUARDED, start=1)],
)
def test_guessing_tokens_on_any_route_locks_the_guesser_out(
    rate_limited: Cluster, route: RouteCase, address: str
) -> None:
    server, tokens = rate_limited.server, rate_limited.ledger.tokens
    client = {"X-Forwarded-For": address}
    guesses = list(_bad_tokens(rate_limited).values())
    for i in range(FAILURE_LIMIT):
        guess = guesses[i % len(guesses)].strip()
        credentials = {"Authorization": f"Bearer {guess}", "Cookie": f"{COOKIE}={guess}"}
        server.request(route.method, route.path(), _body_for(route), headers=client | credentials)
    # Over the limit, the guesser is refused even with a valid token: here, and on the API.
    valid = client | {"Authorization": f"Bearer {tokens.admin}", "Cookie": f"{COOKIE}={tokens.admin}"}
    for method, path in ((route.method, route.path()), ("GET", "/checkpoint")):
        body = _body_for(route) if path == route.path() else None
        answer = server.request(method, path, body, headers=valid)
        assert answer.status == 429, (method, path, answer)
        assert answer.headers.get("retry-after", "").isdigit(), answer
        _assert_security_headers(answer, "rate limited")
    # Another client is not locked out by this one.
    other = {"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {tokens.viewer}"}
    assert server.request("GET", "/checkpoint", headers=other).status in (200, 404)


def test_guessing_tokens_in_the_login_form_locks_the_guesser_out(rate_limited: Cluster) -> None:
    server, tokens = rate_limited.server, rate_limited.ledger.tokens
    client = {"X-Forwarded-For": "198.51.100.250", "Origin": server.url}
    form = client | {"Content-Type": "application/x-www-form-urlencoded"}
    for guess in list(_bad_tokens(rate_limited).values())[:FAILURE_LIMIT]:
        server.request("POST", "/ui/login", f"token={quote(guess.strip())}".encode(), headers=form)
    answer = server.request(
        "GET", "/checkpoint", headers=client | {"Authorization": f"Bearer {tokens.admin}"}
    )
    assert answer.status == 429, answer


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),  # every interface
        ("::", False),
        ("10.1.2.3", False),
        ("gpu-head.cluster", False),  # a name may resolve anywhere
    ],
)
def test_which_hosts_count_as_loopback(host: str, loopback: bool) -> None:
    from trainguard.relay._destination import is_loopback_host

    assert is_loopback_host(host) is loopback


# Malformed HTTP never reaches the app: uvicorn answers it. It must answer (not hang, not crash), say
# nothing of what it was sent, and keep serving everyone else.
MALFORMED_HTTP = {
    "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n",
    "NUL in a header": b"GET /checkpoint HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\x00b\r\n\r\n",
    "header of 1 MiB": b"GET /checkpoint HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + b"A" * (1 << 20)
    + b"\r\n\r\n",
    "two Content-Lengths": b"POST /api/v1/runs/r/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Length: 50\r\n\r\n{}",
    "Content-Length and chunked": b"POST /api/v1/runs/r/events HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST /api/v1/runs/r/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", MALFORMED_HTTP)
def test_malformed_http_is_answered_and_the_server_stays_up(cluster: Cluster, name: str) -> None:
    with cluster.server.socket() as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(MALFORMED_HTTP[name])
        try:
            answer = read_answer(sock)
        except (ConnectionError, IndexError, ValueError):
            answer = None  # closed without an answer: refused too
    if answer is not None:
        assert 400 <= answer.status < 500, answer
        assert not answer.headers.get("content-type", "").startswith("text/html")
        assert b"Bearer" not in answer.body and b"AAAA" not in answer.body
        assert not cluster.answer_leaks(answer)
    assert cluster.server.request("GET", "/healthz").status == 200
