"""A `trainguard serve` process fed with simulated runs, and a chromium that logs everything a page does.

The browser is Debian's chromium driven by playwright; without them the browser tests skip, except under
CI=true, where they fail saying what is missing (as tests/drill/test_report.py does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.server.dashboard_run import batch
from tests.server.serve_process import Serve, cli, events_path, make_token
from trainguard.ledger import SigningKey

ORIGIN = "test.example/dashboard"
RUN = "exp-7/lr 3e-4"
HOSTILE = (
    "<script>alert('xss')</script><img src=x onerror=\"alert('img')\">"
    "<a href=\"javascript:alert('js')\">j</a><style>*{display:none}</style>\"'&amp;"
)
HOSTILE_RUN = "run-" + HOSTILE
_SECRET = re.compile(r"tgs_tg_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


@dataclasses.dataclass
class Dashboard:
    home: Path
    store: str
    key: SigningKey
    server: Serve
    viewer: str
    admin: str
    job: str
    revoked: str

    @property
    def url(self) -> str:
        return self.server.url

    def report(self, run: str, text: str = "", prefix: str = "sim") -> None:
        answer = self.server.request(
            "POST",
            events_path(run),
            batch(run, self.key, text, prefix),
            self.admin,
        )
        assert answer.status == 200, answer.body

    def secrets(self) -> list[str]:
        return [self.viewer, self.admin, self.job, self.revoked]


@contextlib.contextmanager
def dashboard(home: Path, store: str) -> Iterator[Dashboard]:
    """A server on `store` holding RUN and HOSTILE_RUN; the viewer token's label is hostile too."""
    home.mkdir(parents=True, exist_ok=True)
    key_path = home / "keys" / "serve.key"
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key = SigningKey.generate(ORIGIN)
    key.save(key_path)
    admin = make_token(home, store, "--scope", "admin", "--label", "ops")
    viewer = make_token(home, store, "--scope", "viewer", "--label", HOSTILE)
    job = make_token(home, store, "--scope", "job", "--run", RUN, "--expires", "1h")
    revoked = make_token(home, store, "--scope", "viewer")
    done = cli(home, "server", "token", "revoke", "--store", store, revoked[len("tgs_") : len("tgs_") + 11])
    assert done.returncode == 0, done.stderr
    server = Serve.command(home, store, key_path, workers=1).start()
    board = Dashboard(home, store, key, server, viewer, admin, job, revoked)
    try:
        board.report(RUN)
        board.report(HOSTILE_RUN, HOSTILE)
        yield board
        output = server.output()
        for secret in board.secrets():
            assert secret not in output
        assert not _SECRET.search(output)
    finally:
        server.stop()


# The browser


@dataclasses.dataclass
class Visit:
    """A browser context on the dashboard, with what its pages fetched elsewhere, logged or popped up."""

    context: Any
    page: Any
    origin: str
    elsewhere: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    dialogs: list[str] = dataclasses.field(default_factory=list)

    def assert_quiet(self) -> None:
        assert self.elsewhere == [], self.elsewhere
        assert self.dialogs == [], self.dialogs
        assert self.errors == [], self.errors

    def login(self, token: str) -> None:
        self.page.goto(f"{self.origin}/ui/login")
        self.page.fill("#token", token)
        with self.page.expect_navigation():
            self.page.click("form.login button")


@contextlib.contextmanager
def visit(browser: Any, origin: str, *, expect_errors: bool = False) -> Iterator[Visit]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    seen = Visit(context, page, origin)

    def route(route: Any) -> None:
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            seen.elsewhere.append(route.request.url)
            route.abort()

    def dialog(opened: Any) -> None:
        seen.dialogs.append(opened.message)
        opened.dismiss()

    context.route("**/*", route)
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: seen.errors.append(str(error)))
    page.on("dialog", dialog)
    try:
        yield seen
    finally:
        context.close()


def verdicts(page: Any) -> dict[int, str]:
    """Click "verify every entry shown" and wait for every verdict; {entry index: verdict text}."""
    page.click("#verify-all")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.verdict')].every(v => v.classList.contains('ok') ||"
        " v.classList.contains('bad'))",
        timeout=60_000,
    )
    found: dict[str, str] = page.eval_on_selector_all(
        ".verdict", "vs => Object.fromEntries(vs.map(v => [v.dataset.index, v.textContent]))"
    )
    return {int(index): text for index, text in found.items()}
