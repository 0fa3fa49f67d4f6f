"""The dashboard over HTTP, against a real `trainguard serve` process: who may see pages, what a login
accepts, the headers every page carries, and hostile text in every field written out as text.

The views' bounds (windows, thinned plots) are tested in process on a real SQLite ledger.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from tests.server.dashboard_harness import HOSTILE, HOSTILE_RUN, RUN, Dashboard, dashboard
from tests.server.serve_process import Answer
from trainguard.errors import StoreError
from trainguard.ledger import Ledger, SigningKey, new_event
from trainguard.ledger._merkle import leaf_hash, verify_inclusion
from trainguard.ledger._note import open_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")

PAGES = ["/ui/", f"/ui/run?id={quote(RUN)}", "/ui/ledger", f"/ui/checkpoints?run={quote(RUN)}"]
POLICY = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "frame-ancestors": "'none'",
    "base-uri": "'none'",
    "form-action": "'self'",
}


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    home = tmp_path_factory.mktemp("dash")
    with dashboard(home, str(home / "ledger.db")) as board:
        yield board


def _get(board: Dashboard, path: str, cookie: str | None = None, **headers: str) -> Answer:
    if cookie is not None:
        headers["Cookie"] = f"trainguard_session={cookie}"
    return board.server.request("GET", path, **headers)


def _login(board: Dashboard, token: str, origin: str | None = "self", **headers: str) -> Answer:
    if origin == "self":
        origin = board.url
    if origin is not None:
        headers["Origin"] = origin
    body = urlencode({"token": token}).encode()
    return board.server.request(
        "POST", "/ui/login", body, Content_Type="application/x-www-form-urlencoded", **headers
    )


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


# Who may see pages


def test_without_a_token_every_page_sends_the_browser_to_log_in(board: Dashboard) -> None:
    for path in PAGES:
        answer = _get(board, path)
        assert answer.status == 303 and answer.headers["location"] == "/ui/login", (path, answer.status)
    assert _get(board, "/ui/proof/0").status == 401
    assert _get(board, "/ui/login").status == 200


@pytest.mark.parametrize("which", ["job", "revoked", "wrong", "malformed"])
def test_a_job_revoked_or_wrong_token_sees_no_page(board: Dashboard, which: str) -> None:
    token = {
        "job": board.job,
        "revoked": board.revoked,
        # The viewer's id with another secret: as unknown as an unknown id.
        "wrong": board.viewer[:-4] + ("AAAA" if not board.viewer.endswith("AAAA") else "BBBB"),
        "malformed": "<script>alert(1)</script>",
    }[which]
    for path in [*PAGES, "/ui/proof/0"]:
        answer = _get(board, path, cookie=token)
        assert answer.status in (303, 401), (path, answer.status)
        assert b"exp-7" not in answer.body
    login = _login(board, token)
    assert login.status == (403 if which == "job" else 401)
    assert "set-cookie" not in login.headers
    assert (b"may not read the dashboard" in login.body) == (which == "job")
    assert token.encode() not in login.body


def test_a_viewer_logs_in_with_an_httponly_strict_cookie_and_sees_every_page(board: Dashboard) -> None:
    login = _login(board, board.viewer)
    assert login.status == 303 and login.headers["location"] == "/ui/"
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"trainguard_session={board.viewer};")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes and "secure" not in attributes
    assert "SameSite=strict" in cookie and "Path=/;" in cookie + ";"
    for path in PAGES:
        answer = _get(board, path, cookie=board.viewer)
        assert answer.status == 200, (path, answer.body[:300])
        assert answer.headers["content-type"] == "text/html; charset=utf-8"


def test_behind_a_tls_proxy_the_cookie_is_secure_and_host_only(board: Dashboard) -> None:
    # uvicorn believes X-Forwarded-Proto from loopback (its default --forwarded-allow-ips), as from a
    # reverse proxy on the same host.
    host = board.url.removeprefix("http://")
    login = _login(board, board.viewer, origin=f"https://{host}", X_Forwarded_Proto="https")
    assert login.status == 303, login.body
    cookie = login.headers["set-cookie"]
    assert cookie.startswith("__Host-trainguard_session=") and "; Secure" in cookie
    # The same form sent as plain http from the proxy's point of view is another origin: refused.
    assert _login(board, board.viewer, origin=f"http://{host}", X_Forwarded_Proto="https").status == 403


@pytest.mark.parametrize("origin", [None, "https://evil.example", "null", "http://127.0.0.1"])
def test_a_login_or_logout_from_another_origin_is_refused(board: Dashboard, origin: str | None) -> None:
    """Login CSRF: a page elsewhere posting its owner's token to log the victim in as them."""
    login = _login(board, board.viewer, origin=origin)
    assert login.status == 403 and "set-cookie" not in login.headers
    headers = {"Origin": origin} if origin is not None else {}
    logout = board.server.request("POST", "/ui/logout", b"", **headers)
    assert logout.status == 403 and "set-cookie" not in logout.headers


def test_logout_clears_the_cookie(board: Dashboard) -> None:
    answer = board.server.request("POST", "/ui/logout", b"", Origin=board.url)
    assert answer.status == 303 and answer.headers["location"] == "/ui/login"
    assert answer.headers["set-cookie"].startswith('trainguard_session="";')


@pytest.mark.parametrize(
    "body", [b"token=a&token=b", b"other=1", b"%ff=1", b"token=" + b"A" * 5000, b"\xff\xfe"]
)
def test_a_malformed_login_form_is_refused_plainly(board: Dashboard, body: bytes) -> None:
    answer = board.server.request(
        "POST", "/ui/login", body, Content_Type="application/x-www-form-urlencoded", Origin=board.url
    )
    assert answer.status in (400, 401, 413) and "set-cookie" not in answer.headers
    assert b"Traceback" not in answer.body


# What every page carries


def test_every_page_sends_a_strict_policy_and_no_inline_script_or_style(board: Dashboard) -> None:
    for path in [*PAGES, "/ui/login", f"/ui/run?id={quote(HOSTILE_RUN)}"]:
        answer = _get(board, path, cookie=board.viewer)
        assert answer.status == 200, path
        policy = dict(
            part.strip().split(" ", 1) for part in answer.headers["content-security-policy"].split(";")
        )
        for directive, value in POLICY.items():
            assert policy[directive] == value, (path, directive)
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "same-origin"
        assert answer.headers["cache-control"] == "no-store"
        for tag, attrs in _tags(answer.body.decode()):
            assert "style" not in attrs, (path, tag)
            assert not any(name.startswith("on") for name in attrs), (path, tag, attrs)
            if tag == "script":
                assert (
                    attrs.get("src", "").startswith("/ui/static/") or attrs.get("type") == "application/json"
                )
            for name in ("href", "src", "action"):
                value = attrs.get(name)
                assert value is None or value.startswith("/"), (path, tag, name, value)
    # The JSON API keeps its own policy.
    assert (
        _get(board, "/healthz").headers["content-security-policy"]
        == "default-src 'none'; frame-ancestors 'none'"
    )


def test_static_files_are_an_allowlist(board: Dashboard) -> None:
    assert _get(board, "/ui/static/proofs.js").headers["content-type"].startswith("text/javascript")
    for name in ["..%2F_app.py", "_app.py", "..%2F..%2F__init__.py", "templates%2Fbase.html", "proofs.js%00"]:
        assert _get(board, f"/ui/static/{name}").status == 404, name


# Hostile text


def test_hostile_text_in_every_field_is_written_as_text(board: Dashboard) -> None:
    """Stored XSS: a run id, payload strings, alert messages, attestation fields, checkpoint paths and a
    token label, each holding a script tag, an event handler, a javascript: URL and a style tag."""
    pages = {
        "runs": "/ui/",
        "run": f"/ui/run?id={quote(HOSTILE_RUN)}",
        "checkpoints": f"/ui/checkpoints?run={quote(HOSTILE_RUN)}",
        "ledger": "/ui/ledger",
    }
    escaped = HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;")
    escaped = escaped.replace("'", "&#39;")
    for name, path in pages.items():
        html = _get(board, path, cookie=board.viewer).body.decode()
        assert escaped in html, name  # the label, at least, is on every page
        assert "<script>alert" not in html and "<img" not in html and "<style>" not in html, name
        assert 'href="javascript:' not in html
        # Inside the JSON data block nothing can close the element.
        for block in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', html, re.S):
            assert "<" not in block and ">" not in block and "&" not in block
    run = _get(board, pages["run"], cookie=board.viewer).body.decode()
    for text in ["than its peers", "/ckpt/step-30", "alice", "digest differs", "SIGTERM"]:
        assert text + escaped in run, text


# Proofs, checked here with the library (the browser tests check them in the page)


def test_the_proof_endpoint_gives_what_the_page_needs(board: Dashboard) -> None:
    answer = _get(board, "/ui/proof/5", cookie=board.viewer)
    doc = json.loads(answer.body)
    assert doc["index"] == 5 and answer.headers["content-security-policy"].startswith("default-src 'none'")
    checkpoint = open_checkpoint(doc["checkpoint"], board.key.verifier())
    assert checkpoint.size == doc["tree_size"]
    entry = base64.b64decode(doc["entry"])
    proof = [base64.b64decode(h) for h in doc["proof"]]
    verify_inclusion(leaf_hash(entry), 5, checkpoint.size, proof, checkpoint.root)
    assert _get(board, f"/ui/proof/{checkpoint.size}", cookie=board.viewer).status == 404
    assert _get(board, "/ui/proof/-1", cookie=board.viewer).status in (400, 404)
    assert _get(board, "/ui/proof/99999999999999999999999", cookie=board.viewer).status in (400, 404)


# Bounded reads


def test_a_large_run_is_read_in_bounded_windows(tmp_path: Path) -> None:
    from trainguard.server._eventkeys import EventKeys
    from trainguard.server._eventtypes import create_type_table, index_types
    from trainguard.server._views import ViewLimits, ledger_view, run_view

    key = SigningKey.generate("test.example/big")
    ledger = Ledger.open(tmp_path / "big.db", key=key)
    create_type_table(ledger.store)
    keys = EventKeys(ledger.store, key, hooks=[index_types])
    rows = [
        [step, 1.0 / step, 0.1, [1.0, 2.0], [3.0, 4.0], [0.5, 0.5], ["0", "1"], []] for step in range(1, 51)
    ]
    columns = ["step", "loss", "grad_norm", "optimizer_off_cpu_ms", "forward_off_cpu_ms", "data_off_cpu_ms"]
    items = []
    for i in range(60):
        chunk = [[r[0] + 50 * i, *r[1:]] for r in rows]
        items.append(
            (
                f"s/{i}",
                new_event("monitor.steps", {"columns": columns, "rows": chunk}, run_id="big").canonical(),
            )
        )
    for i in range(30):
        payload = {"check": "x", "step": i, "message": "m", "ranks": [0], "action": "warn"}
        items.append((f"a/{i}", new_event("monitor.alert", payload, run_id="big").canonical()))
    # Look-alikes that must not be counted: another type whose name differs by case or a wildcard.
    items.append(("x/1", new_event("monitor.ALERT", {}, run_id="big").canonical()))
    items.append(("x/2", new_event("monitor_alert", {}, run_id="big").canonical()))
    keys.append("big", items, "tg_00000000")
    limits = ViewLimits(timeline=10, summary_events=20, plot_points=100, entries_per_page=7)
    view = run_view(ledger, "big", limits)
    assert view is not None
    assert len(view.summaries.rows) == 20 and view.summaries.total == 60 and not view.summaries.capped
    assert view.plots["rows"] == 1000 and view.plots["stride"] == 10
    assert len(view.plots["loss"]["x"]) <= 101
    assert view.timeline.total == 30 and len(view.timeline.rows) == 10 and view.timeline.left_out == 20
    assert len(view.recent) == 7
    assert view.summary.status == "alarmed"
    # Without a monitor.start listing the fingerprint check, no step reads as agreed.
    assert set(view.fingerprint.values()) == {0}
    # Counting stops at the cap, and the page says "at least".
    capped = run_view(ledger, "big", dataclasses.replace(limits, count_cap=25))
    assert capped is not None and capped.summaries.total == 25 and capped.summaries.capped
    assert capped.timeline.total == 25 and capped.timeline.capped
    page = ledger_view(ledger, None, limits)
    assert len(page.rows) == 7 and page.end == ledger.size
    ledger.close()


def test_the_type_table_is_filled_from_events_appended_before_it(tmp_path: Path) -> None:
    from trainguard.server._eventkeys import EventKeys
    from trainguard.server._eventtypes import TYPES_TABLE, create_type_table
    from trainguard.server._views import ViewLimits, run_view

    key = SigningKey.generate("test.example/old")
    ledger = Ledger.open(tmp_path / "old.db", key=key)
    keys = EventKeys(ledger.store, key)  # a server from before the dashboard: no type hook
    kinds = ["run.start", "monitor.alert", "monitor.steps", "run.end"]
    for run in ("a", "b"):
        items = [
            (f"k/{i}", new_event(kind, {"step": i}, run_id=run).canonical()) for i, kind in enumerate(kinds)
        ]
        keys.append(run, items, "tg_00000000")
    create_type_table(ledger.store)
    rows = ledger.store.read(f"SELECT run, type, ledger_index FROM {TYPES_TABLE} ORDER BY ledger_index")
    assert rows == [(run, kind, i + 4 * n) for n, run in enumerate("ab") for i, kind in enumerate(kinds)]
    create_type_table(ledger.store)  # a second server starting: nothing changes
    assert len(ledger.store.read(f"SELECT run FROM {TYPES_TABLE}")) == 8
    view = run_view(ledger, "b", ViewLimits())
    assert view is not None and view.summary.status == "alarmed" and view.timeline.total == 1
    ledger.close()


def test_an_entry_whose_type_was_edited_in_the_database_is_shown_as_such(board: Dashboard) -> None:
    """Hiding an alert by rewriting its type: the page lists the entry under the type it was appended
    with, and says what it reads now."""
    from tests.ledger.conftest import Attacker

    attacker = Attacker(board.store)
    (index, data), *_ = attacker.execute(
        "SELECT t.ledger_index, e.data FROM server_event_types t JOIN entries e ON e.idx = t.ledger_index"
        " WHERE t.run = ? AND t.type = 'monitor.alert'",
        (HOSTILE_RUN,),
    )
    try:
        edited = bytes(data).replace(b'"type":"monitor.alert"}', b'"type":"monitor.notice"}')
        attacker.execute("UPDATE entries SET data = ? WHERE idx = ?", (edited, index))
        html = _get(board, f"/ui/run?id={quote(HOSTILE_RUN)}", cookie=board.viewer).body.decode()
        assert (
            f"entry {index} is unreadable: entry {index} was appended as &#39;monitor.alert&#39; and now"
            in html
        )
    finally:
        attacker.execute("UPDATE entries SET data = ? WHERE idx = ?", (bytes(data), index))
        attacker.close()


def test_an_empty_ledger_and_a_deleted_row_are_said_so(tmp_path: Path) -> None:
    from trainguard.server._eventkeys import EventKeys
    from trainguard.server._eventtypes import create_type_table, index_types
    from trainguard.server._views import ViewLimits, ledger_view, proof_document, runs_page

    key = SigningKey.generate("test.example/holes")
    ledger = Ledger.open(tmp_path / "holes.db", key=key)
    create_type_table(ledger.store)
    keys = EventKeys(ledger.store, key, hooks=[index_types])
    empty = ledger_view(ledger, None, ViewLimits())
    assert empty.checkpoint is None and empty.rows == [] and "no checkpoint" in str(empty.head_problem)
    assert runs_page(ledger, 0, ViewLimits()) == ([], 0)
    assert proof_document(ledger, 0) is None
    items = [(f"k/{i}", new_event("run.start", {"i": i}, run_id="r").canonical()) for i in range(5)]
    keys.append("r", items, "tg_00000000")
    ledger.close()
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "holes.db")) as db, db:
        db.execute("DELETE FROM entries WHERE idx = 2")
    ledger = Ledger.open(tmp_path / "holes.db", create=False)
    page = ledger_view(ledger, None, ViewLimits())
    assert [row.index for row in page.rows] == [4, 3, 2, 1, 0]
    assert page.rows[2].problem == "entry 2 is missing from the database"
    with pytest.raises(StoreError, match="entry 2 is missing"):
        proof_document(ledger, 2)
    assert proof_document(ledger, 3) is not None
    ledger.close()


@pytest.mark.slow
def test_a_wheel_built_from_the_repo_ships_the_templates_and_static_files(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    from trainguard.server._dashboard import _STATIC

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(repo)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (wheel,) = tmp_path.glob("trainguard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.name for p in (repo / "src/trainguard/server/templates").glob("*.html")}
    assert {"base.html", "run.html", "ledger.html", "login.html"} <= templates
    for name in templates:
        assert f"trainguard/server/templates/{name}" in names
    for name in _STATIC:
        assert f"trainguard/server/static/{name}" in names


def test_an_alert_too_large_to_store_still_alarms_the_run(tmp_path: Path) -> None:
    """The job side replaces an event over 64 KiB by "<type>.too_large" (its size and digest): an alert
    hidden in an oversized payload must not read as a quiet run."""
    from trainguard.server._eventkeys import EventKeys
    from trainguard.server._eventtypes import create_type_table, index_types
    from trainguard.server._views import ViewLimits, run_view

    key = SigningKey.generate("test.example/large")
    ledger = Ledger.open(tmp_path / "large.db", key=key)
    create_type_table(ledger.store)
    keys = EventKeys(ledger.store, key, hooks=[index_types])
    stand_in = {"bytes": 70000, "sha256": "ab" * 32, "limit": 65535}
    items = [
        ("k/0", new_event("run.start", {}, run_id="r").canonical()),
        ("k/1", new_event("monitor.alert.too_large", stand_in, run_id="r").canonical()),
        ("k/2", new_event("monitor.steps.too_large", stand_in, run_id="r").canonical()),
        ("k/3", new_event("run.end", {}, run_id="r").canonical()),
    ]
    keys.append("r", items, "tg_00000000")
    view = run_view(ledger, "r", ViewLimits())
    assert view is not None and view.summary.status == "alarmed"
    assert view.fingerprint == {}  # no summary row reached the server
    assert [row.type for row in view.timeline.rows] == ["monitor.steps.too_large", "monitor.alert.too_large"]
    ledger.close()
