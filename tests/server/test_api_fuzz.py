"""Fuzz `trainguard serve` from the OpenAPI description it publishes (schemathesis, on hypothesis).

Every operation the description lists is fuzzed, with valid data and with data that breaks the schema, as
an admin, a viewer and a job. Each answer must pass schemathesis' checks (no 5xx; only the documented
status codes, content types and headers; invalid input refused; a request without the token, or with a
made-up one, refused) and ours (the security headers; never text/html; no token secret in any answer).
The app runs in this process over ASGI, on SQLite; one pass also goes through a real `trainguard serve`,
so uvicorn's own HTTP parsing meets the fuzzed paths, queries and bodies too.

A schema cannot say that an event's run_id is the run its URL names, that the keys of a batch differ or
that a date exists. Valid cases are aligned on the first two, so that appends go through (a test checks
that some did), and schemathesis' "valid data is accepted" check is left out.

TRAINGUARD_FUZZ_EXAMPLES (default 15) examples per operation, token and mode; TRAINGUARD_FUZZ_SEED (default
16) the seed, so a failure replays. A longer run: TRAINGUARD_FUZZ_EXAMPLES=500.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import load_all_checks  # noqa: E402

from tests.server.live_server import (  # noqa: E402
    JOB_RUN,
    Ledger,
    LiveServer,
    batch,
    make_app,
    make_ledger,
)
from tests.server.serve_process import events_path  # noqa: E402
from trainguard.ledger._tiles import encode_index  # noqa: E402

EXAMPLES = int(os.environ.get("TRAINGUARD_FUZZ_EXAMPLES", "15"))
SEED = int(os.environ.get("TRAINGUARD_FUZZ_SEED", "16"))
APPEND = "POST /api/v1/runs/{run}/events"
SECURITY_HEADERS = ("x-content-type-options", "content-security-policy", "referrer-policy", "cache-control")

load_all_checks()
# Valid by the schema is not enough to be accepted (see the module's docstring).
_EXCLUDED = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    return make_ledger(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture
def asgi_schema(ledger: Ledger) -> Iterator[Any]:
    """The description the app serves to an admin, bound to the app (requests go over ASGI). An app per
    test: schemathesis' pytest plugin ends every ASGI app's lifespan, which closes its store, after each."""
    from schemathesis.python import asgi

    app = make_app(ledger)
    admin = {"Authorization": f"Bearer {ledger.tokens.admin}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=admin)
    with asgi.get_client(app) as client:
        # A log with entries, so the checkpoint and a partial tile exist to be served.
        answer = client.post(
            events_path(JOB_RUN), data=batch(JOB_RUN, f"seed-{uuid.uuid4().hex}", 3), headers=admin
        )
        assert answer.status_code == 200, answer.text
    yield schema
    asgi.shutdown_lifespans()  # closes the app's ledger and token store


def _check_answer(response: Any, secrets: list[str]) -> None:
    """Our own checks on every answer."""
    # schemathesis' own answers hold a list of values per header
    headers = {
        name.lower(): ", ".join(value) if isinstance(value, list) else value
        for name, value in response.headers.items()
    }
    missing = [name for name in SECURITY_HEADERS if name not in headers]
    assert not missing, f"{response.status_code} answer lacks {missing}"
    assert not headers.get("content-type", "").startswith("text/html"), "an API answer is HTML"
    seen = response.content + repr(headers).encode()
    leaked = [secret for secret in secrets if secret.encode() in seen]
    assert not leaked, "a token secret is in the answer"


def _align(case: Any, run: str | None) -> None:
    """Make a valid batch satisfy what its schema cannot say: each event's run_id is the URL's run, and
    its keys differ."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        return
    target = run if run is not None else case.path_parameters.get("run")
    for i, item in enumerate(body["events"]):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("key"), str):
            item["key"] = f"{i}.{item['key']}"[:200]
        if isinstance(item.get("event"), dict) and target is not None:
            item["event"]["run_id"] = target


def _fuzz(
    schema: Any,
    token: str,
    mode: GenerationMode,
    secrets: list[str],
    *,
    run: str | None = None,
    examples: int = EXAMPLES,
    call: Callable[[Any], Any] | None = None,
) -> tuple[list[str], Counter[tuple[str, int]]]:
    """Fuzz every operation of `schema`; (what failed, how often each operation answered each status)."""
    failures: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    operations = list(schema.get_all_operations())
    assert operations, "the description lists no operation"
    for result in operations:
        operation = result.ok()  # an operation the description cannot describe fails here
        try:
            _fuzz_operation(operation, token, mode, secrets, run, examples, call, statuses)
        except Unsatisfiable:
            if mode is not GenerationMode.NEGATIVE:
                raise
            # Nothing in this operation can break its schema (no parameters, or free-form strings only).
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    return failures, statuses


def _fuzz_operation(
    operation: Any,
    token: str,
    mode: GenerationMode,
    secrets: list[str],
    run: str | None,
    examples: int,
    call: Callable[[Any], Any] | None,
    statuses: Counter[tuple[str, int]],
) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    fixed = {"run": run} if run is not None and "{run}" in operation.path else None
    strategy = operation.as_strategy(generation_mode=mode, headers=auth, path_parameters=fixed)

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @seed(SEED)
    @given(case=strategy)
    def one(case: Any) -> None:
        if mode is GenerationMode.POSITIVE:
            _align(case, run)
        response = call(case) if call is not None else case.call()
        statuses[(operation.label, response.status_code)] += 1
        _check_answer(response, secrets)
        case.validate_response(response, excluded_checks=_EXCLUDED, headers=auth)

    one()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("scope", ["admin", "viewer", "job"])
def test_every_operation_survives_the_fuzz(
    asgi_schema: Any, ledger: Ledger, scope: str, mode: GenerationMode
) -> None:
    tokens = ledger.tokens
    token = {"admin": tokens.admin, "viewer": tokens.viewer, "job": tokens.job}[scope]
    # A job token is fuzzed on its own run: on any other it is refused before its body is read.
    run = JOB_RUN if scope == "job" else None
    failures, statuses = _fuzz(asgi_schema, token, mode, tokens.secrets(), run=run)
    assert not failures, "\n\n".join(failures)
    if mode is GenerationMode.POSITIVE and scope in ("admin", "job"):
        # The fuzz reached the append path, not only the validation in front of it.
        assert statuses[(APPEND, 200)] > 0, statuses


def test_the_description_covers_every_api_route(asgi_schema: Any, ledger: Ledger) -> None:
    from fastapi.routing import APIRoute

    from trainguard.server._app import create_app

    app = create_app(ledger.store, key_path=ledger.key)
    try:
        documented = {op.ok().label for op in asgi_schema.get_all_operations()}
        for route in app.routes:
            if isinstance(route, APIRoute) and route.include_in_schema:
                path = _plain_path(route.path)
                for method in route.methods:
                    assert f"{method} {path}" in documented, (method, path)
        for label in documented:
            operation = asgi_schema.find_operation_by_label(label)
            if label == "GET /healthz":
                continue
            # Each needs the bearer token, and says so, with the 401 it answers without one.
            assert operation.definition.raw.get("security"), label
            assert "401" in operation.definition.raw["responses"], label
    finally:
        app.state.server.close()


def _plain_path(path: str) -> str:
    """/tile/{path:path} as OpenAPI writes it: /tile/{path}."""
    import re

    return re.sub(r"\{([^}:]+):[^}]+\}", r"{\1}", path)


# The description says only "a path" for a tile; random strings never name one. These are tile paths, and
# near misses of them (a bad level, a width past 255, index groups spelt another way).
_TILE_PATHS = st.builds(
    lambda level, index, width, spelling: (
        f"{level}/{spelling(encode_index(index))}" + ("" if width is None else f".p/{width}")
    ),
    st.sampled_from(["0", "1", "2", "3", "entries", "00", "-1", "256", "entries/0"]),
    st.integers(0, 10**10),
    st.none() | st.integers(0, 300),
    st.sampled_from([lambda s: s, lambda s: s.replace("x", ""), lambda s: "x" + s, lambda s: s + "/"]),
)


def test_tile_paths_answer_a_tile_or_404(asgi_schema: Any, ledger: Ledger) -> None:
    from schemathesis.python import asgi

    viewer = {"Authorization": f"Bearer {ledger.tokens.viewer}"}
    statuses: Counter[int] = Counter()
    with asgi.get_client(asgi_schema.app) as client:

        @settings(max_examples=EXAMPLES * 4, deadline=None, database=None)
        @seed(SEED)
        @given(path=_TILE_PATHS)
        def one(path: str) -> None:
            answer = client.get(f"/tile/{path}", headers=viewer)
            statuses[answer.status_code] += 1
            assert answer.status_code in (200, 404), (path, answer.status_code, answer.text)
            expected = "application/octet-stream" if answer.status_code == 200 else "application/json"
            assert answer.headers["content-type"] == expected, path
            _check_answer(answer, ledger.tokens.secrets())

        one()
        # The log holds a few entries: a partial tile of them is served.
        first = client.get("/tile/0/000.p/1", headers=viewer)
        assert first.status_code == 200 and len(first.content) == 32
    assert statuses[404] > 0


@pytest.fixture(scope="module")
def served(ledger: Ledger) -> Iterator[LiveServer]:
    server = LiveServer(ledger)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_a_real_server_survives_the_fuzz(served: LiveServer, ledger: Ledger, mode: GenerationMode) -> None:
    """The same fuzz over HTTP to `trainguard serve`: uvicorn parses what the fuzzer sends."""
    tokens = ledger.tokens
    admin = {"Authorization": f"Bearer {tokens.admin}"}
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json", headers=admin, timeout=30)
    failures, _ = _fuzz(
        schema,
        tokens.admin,
        mode,
        tokens.secrets(),
        call=lambda case: case.call(base_url=served.url, timeout=30),
    )
    assert not failures, "\n\n".join(failures)
    output = served.output()
    assert not [secret for secret in tokens.secrets() if secret in output], "a token secret is in the log"
    assert "Traceback" not in output, output[-4000:]
