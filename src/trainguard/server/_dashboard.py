"""The dashboard of `trainguard serve`: server-rendered pages over the ledger, for viewer and admin tokens.

GET  /ui/                   runs, most recently active first, with their status
GET  /ui/run?id=RUN         a run: loss and per-rank step-time plots, fingerprint agreement, timeline,
                            attestation, checkpoints, its latest entries with in-page proofs
GET  /ui/checkpoints?run=   the run's checkpoint signings and verifications
GET  /ui/ledger[?before=N]  the signed head and one page of entries, each verifiable in the page
GET  /ui/proof/<index>      JSON: the entry's bytes, its inclusion proof and the latest signed checkpoint
GET  /ui/login, POST /ui/login, POST /ui/logout
GET  /ui/static/<file>      the stylesheet and scripts shipped in the package (no token: they are public)

Pages are Jinja2 templates with autoescape on and StrictUndefined; data for scripts travels in
``<script type="application/json">`` blocks written by ``tojson`` (which escapes < > & '), and each page
sends its own Content-Security-Policy: scripts and styles from this origin only, nothing inline, no frames.
The proofs are checked by static/proofs.js with WebCrypto, against a key the viewer may pin: the server's
copy of its key is only the default.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from trainguard.errors import MissingExtraError, TrainguardError
from trainguard.server._access import AccessDenied, Action, Identity, NotAuthorized, authorize
from trainguard.server._ratelimit import RateLimited
from trainguard.server._views import (
    ALARM_TYPES,
    ViewLimits,
    alert_marks,
    as_json_text,
    key_fingerprint,
    ledger_view,
    proof_document,
    run_view,
    runs_page,
)
from trainguard.server._webauth import (
    FORM_TIMEOUT_S,
    FormRefused,
    cookie_token,
    forget,
    origin_ok,
    read_form,
    remember,
)

if TYPE_CHECKING:
    import jinja2

    from trainguard.server._app import _Server

__all__ = ["PAGE_POLICY", "add_dashboard"]

_LOG = logging.getLogger("trainguard.server")

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# What /ui/static serves, and as what: nothing else in the package is reachable.
_STATIC = {
    "dashboard.css": "text/css; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "proofs.js": "text/javascript; charset=utf-8",
}
_LIMITS = ViewLimits()
_MAX_RUN = 256


@functools.cache
def _templates() -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("trainguard.server", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pretty"] = as_json_text
    env.filters["clip"] = _clip
    env.globals["alarm_types"] = ALARM_TYPES
    return env


def _clip(text: object, limit: int = 4096) -> str:
    """At most `limit` characters of `text`, saying how many were left out (a job sets these lengths)."""
    shown = str(text)
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}… ({len(shown) - limit} more characters)"


def _page(name: str, status: int = 200, **context: Any) -> Response:
    html = _templates().get_template(name).render(**context)
    return Response(
        html,
        status_code=status,
        media_type="text/html; charset=utf-8",
        # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with the login
        # form, and the CSRF check could not tell this server's own page from any other.
        headers={"Content-Security-Policy": PAGE_POLICY, "Referrer-Policy": "same-origin"},
    )


def _server(request: Request) -> _Server:
    server: _Server = request.app.state.server
    return server


def _authenticate(request: Request, token: str) -> Identity:
    """The token's identity through the server's rate limits, as the API checks a bearer token: failures
    count against the client's address, which is locked out after too many (RateLimited: 429)."""
    return _server(request).authenticate(token, request.client.host if request.client else None)


def _viewer(request: Request) -> Identity | None:
    """The identity of the request's cookie when it may read; None when the browser must log in.

    No cookie is no guess: it sends the browser to log in without counting as a failure."""
    token = cookie_token(request)
    if token is None:
        return None
    try:
        who = _authenticate(request, token)
        authorize(who, Action.READ)
    except AccessDenied as exc:
        _LOG.warning("dashboard refused %s %s: %s", request.method, request.url.path, exc.message)
        return None
    return who


def _label(request: Request, who: Identity) -> str:
    info = _server(request).tokens.get(who.token_id)
    return info.label if info is not None else ""


def _to_login() -> Response:
    return RedirectResponse("/ui/login", status_code=303)


async def _render(request: Request, name: str, work: Any, status: int = 200) -> Response:
    """Authenticate, read the page's data in a thread, render; a browser without a token logs in."""

    def read() -> tuple[Identity | None, str, dict[str, Any] | None]:
        who = _viewer(request)
        if who is None:
            return None, "", None
        return who, _label(request, who), work()

    who, label, context = await run_in_threadpool(read)
    if who is None or context is None:
        return _to_login()
    if "missing" in context:
        return _page("missing.html", 404, who=who, label=label, title="Not found", what=context["missing"])
    return _page(name, status, who=who, label=label, **context)


# Pages


async def _runs(request: Request, page: Annotated[int, Query(ge=0, le=10**6)] = 0) -> Response:
    ledger = _server(request).ledger

    def work() -> dict[str, Any]:
        runs, total = runs_page(ledger, page, _LIMITS)
        return {
            "title": "Runs",
            "runs": runs,
            "total": total,
            "page": page,
            "per_page": _LIMITS.runs_per_page,
        }

    return await _render(request, "runs.html", work)


async def _run(
    request: Request, run_id: Annotated[str, Query(alias="id", max_length=_MAX_RUN)] = ""
) -> Response:
    ledger = _server(request).ledger

    def work() -> dict[str, Any]:
        view = run_view(ledger, run_id, _LIMITS) if run_id else None
        if view is None:
            return {"missing": f"no run {run_id!r} has reported to this server"}
        return {
            "title": f"Run {run_id}",
            "view": view,
            "plot_data": {"plots": view.plots, "fingerprint": view.fingerprint, "alerts": alert_marks(view)},
            **_key_context(ledger),
        }

    return await _render(request, "run.html", work)


async def _checkpoints(request: Request, run: Annotated[str, Query(max_length=_MAX_RUN)] = "") -> Response:
    ledger = _server(request).ledger

    def work() -> dict[str, Any]:
        view = run_view(ledger, run, _LIMITS) if run else None
        if view is None:
            return {"missing": f"no run {run!r} has reported to this server"}
        return {"title": f"Checkpoints of {run}", "view": view}

    return await _render(request, "checkpoints.html", work)


async def _ledger(request: Request, before: Annotated[int | None, Query(ge=0, le=2**62)] = None) -> Response:
    ledger = _server(request).ledger

    def work() -> dict[str, Any]:
        view = ledger_view(ledger, before, _LIMITS)
        return {"title": "Ledger", "view": view, **_key_context(ledger)}

    return await _render(request, "ledger.html", work)


def _key_context(ledger: Any) -> dict[str, Any]:
    return {"server_key": ledger.verifier.text(), "server_key_fingerprint": key_fingerprint(ledger.verifier)}


async def _proof(request: Request, index: int) -> Response:
    ledger = _server(request).ledger

    def work() -> tuple[bool, dict[str, Any] | None, str | None]:
        if _viewer(request) is None:
            return False, None, None
        if not 0 <= index < 2**62:
            return True, None, None
        try:
            return True, proof_document(ledger, index), None
        except TrainguardError as exc:
            return True, None, exc.message

    allowed, document, problem = await run_in_threadpool(work)
    if not allowed:
        return JSONResponse({"error": "unauthenticated", "message": "log in at /ui/login"}, status_code=401)
    if problem is not None:
        # The server cannot even build the proof (a node row is gone): say so, never "verified".
        return JSONResponse({"error": "no_proof", "message": problem}, status_code=409)
    if document is None:
        return JSONResponse({"error": "not_found", "message": f"no entry {index} under the signed head"}, 404)
    return JSONResponse(document)


# Logging in and out


async def _login_form(request: Request) -> Response:
    return _page("login.html", who=None, label="", title="Log in", problem=None)


async def _login(request: Request) -> Response:
    if not origin_ok(request):
        return _page(
            "login.html",
            403,
            who=None,
            label="",
            title="Log in",
            problem="this form must be sent from this server's own page",
        )
    try:
        form = await read_form(request, min(FORM_TIMEOUT_S, _server(request).limits.body_timeout_s))
    except FormRefused as exc:
        return _page("login.html", exc.status, who=None, label="", title="Log in", problem=exc.message)
    if form is None or set(form) != {"token"}:
        return _page("login.html", 400, who=None, label="", title="Log in", problem="paste one token")
    token = form["token"].strip()

    def check() -> str | None:
        try:
            who = _authenticate(request, token)
            authorize(who, Action.READ)
        except NotAuthorized as exc:
            _LOG.warning("dashboard login refused: %s", exc.message)
            return "this token may not read the dashboard (a job token only appends to its run)"
        except AccessDenied as exc:
            _LOG.warning("dashboard login refused: %s", exc.message)
            return "this token is not valid (unknown, expired or revoked)"
        return None

    try:
        problem = await run_in_threadpool(check)
    except RateLimited as exc:
        problem = f"too many failed attempts from this address: try again in {exc.retry_after} s"
        return _page("login.html", 429, who=None, label="", title="Log in", problem=problem)
    if problem is not None:
        return _page(
            "login.html",
            403 if "may not" in problem else 401,
            who=None,
            label="",
            title="Log in",
            problem=problem,
        )
    answer = RedirectResponse("/ui/", status_code=303)
    remember(answer, request, token)
    return answer


async def _logout(request: Request) -> Response:
    if not origin_ok(request):
        return JSONResponse({"error": "forbidden", "message": "cross-origin logout refused"}, status_code=403)
    answer = _to_login()
    forget(answer, request)
    return answer


async def _static(request: Request, name: str) -> Response:
    media = _STATIC.get(name)
    if media is None:
        return JSONResponse({"error": "not_found", "message": "no such file"}, status_code=404)
    data = resources.files("trainguard.server").joinpath("static", name).read_bytes()
    return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})


async def _home(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=303)


def add_dashboard(app: FastAPI) -> None:
    """Register the dashboard's routes on `app` (whose ``state.server`` holds the ledger and tokens).

    MissingExtraError when jinja2 is not installed: the server does not start without its pages.
    """
    if importlib.util.find_spec("jinja2") is None:
        raise MissingExtraError("jinja2", "server", "the dashboard of trainguard serve")
    hidden: dict[str, Any] = {"include_in_schema": False}
    app.add_api_route("/", _home, methods=["GET"], **hidden)
    app.add_api_route("/ui/", _runs, methods=["GET"], **hidden)
    app.add_api_route("/ui/run", _run, methods=["GET"], **hidden)
    app.add_api_route("/ui/checkpoints", _checkpoints, methods=["GET"], **hidden)
    app.add_api_route("/ui/ledger", _ledger, methods=["GET"], **hidden)
    app.add_api_route("/ui/proof/{index}", _proof, methods=["GET"], **hidden)
    app.add_api_route("/ui/login", _login_form, methods=["GET"], **hidden)
    app.add_api_route("/ui/login", _login, methods=["POST"], **hidden)
    app.add_api_route("/ui/logout", _logout, methods=["POST"], **hidden)
    app.add_api_route("/ui/static/{name}", _static, methods=["GET"], **hidden)
