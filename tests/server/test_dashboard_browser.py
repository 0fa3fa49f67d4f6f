"""The dashboard in Debian's chromium, driven by playwright, against a real `trainguard serve` process.

Pages render from a simulated run, draw their plots, fetch nothing from elsewhere, log no error and open
no dialog; the page verifies inclusion proofs itself (WebCrypto) and catches a row edited in the database,
a wrong pinned key, and a server that lies (another entry's proof, a note signed by another key, an older
head, an entry shown that is not the one verified). Hostile text in every field stays text.

TRAINGUARD_DASHBOARD_SHOT=PATH saves a screenshot of the run page there (docs/server-run.png is one).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from tests.browser import chromium
from tests.ledger.conftest import Attacker, schema_url
from tests.server.dashboard_harness import (
    HOSTILE,
    HOSTILE_RUN,
    RUN,
    Dashboard,
    dashboard,
    verdicts,
    visit,
)
from tests.server.dashboard_run import RANKS, STEPS
from trainguard.ledger import Ledger, SigningKey
from trainguard.ledger._note import sign_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("jinja2")

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    home = tmp_path_factory.mktemp("dash-browser")
    with dashboard(home, str(home / "ledger.db")) as board:
        yield board


def _plots(page: Any) -> dict[str, dict[str, Any]]:
    """Each plot's series: how many points its polylines and dots hold, and its markers' titles."""
    found: list[dict[str, Any]] = page.eval_on_selector_all(
        "figure[data-plot]",
        """figures => figures.map(f => ({
            key: f.dataset.plot,
            series: Object.fromEntries([...f.querySelectorAll("g.series")].map(g => [g.dataset.series,
                [...g.querySelectorAll("polyline")].reduce(
                    (n, p) => n + p.getAttribute("points").trim().split(/\\s+/).length, 0)
                + g.querySelectorAll("circle, rect").length])),
            markers: [...f.querySelectorAll("g.marker > title")].map(t => t.textContent),
        }))""",
    )
    return {plot["key"]: plot for plot in found}


def test_pages_render_with_their_plots_offline_and_quietly(browser: Any, board: Dashboard) -> None:
    with visit(browser, board.url) as seen:
        page = seen.page
        page.goto(f"{board.url}/ui/")
        assert page.url.endswith("/ui/login")  # no cookie yet
        seen.login(board.admin)  # the viewer's label is hostile text; the admin's reads "ops"
        assert page.url.endswith("/ui/")
        statuses = page.eval_on_selector_all(
            "tr[data-run]",
            "rows => Object.fromEntries(rows.map("
            "r => [r.dataset.run, r.querySelector('.status').textContent]))",
        )
        assert statuses == {RUN: "alarmed", HOSTILE_RUN: "alarmed"}
        page.click(f'tr[data-run="{RUN}"] a')
        page.wait_for_load_state("load")
        plots = _plots(page)
        assert plots["loss"]["series"] == {"loss": STEPS}
        assert plots["step_time"]["series"] == {f"rank {r}": STEPS for r in range(RANKS)}
        assert plots["fingerprint"]["series"] == {"agreed": STEPS - 1, "disagreed": 1}
        assert len(plots["loss"]["markers"]) == 2 and "fingerprint" in " ".join(plots["loss"]["markers"])
        assert page.locator("ol.timeline li").count() == 3
        assert "signature valid" in page.locator(".attestation-check").inner_text()
        assert page.locator("dl.attestation dt").count() == 11
        assert page.locator("table.checkpoints tbody tr").count() == 2
        shot = os.environ.get("TRAINGUARD_DASHBOARD_SHOT")
        if shot:
            page.screenshot(path=shot, full_page=False)
        # The run's own latest entries, each proved in the page.
        assert set(verdicts(page).values()) == {"verified"}
        page.goto(f"{board.url}/ui/checkpoints?run={quote(RUN)}")
        assert page.locator("table.checkpoints .bad").inner_text() == "NOT ok"
        page.goto(f"{board.url}/ui/ledger")
        assert page.locator("dd.size").inner_text() == str(board_size(board))
        page.click("header form button")  # log out
        page.wait_for_load_state("load")
        assert page.url.endswith("/ui/login")
        page.goto(f"{board.url}/ui/ledger")
        assert page.url.endswith("/ui/login")
    seen.assert_quiet()


def board_size(board: Dashboard) -> int:
    with Ledger.open(board.store, create=False) as ledger:
        return ledger.size


def test_hostile_text_in_every_field_stays_text(browser: Any, board: Dashboard) -> None:
    with visit(browser, board.url) as seen:
        page = seen.page
        seen.login(board.viewer)
        assert page.locator("header .label").inner_text() == HOSTILE  # the token's label
        runs = page.eval_on_selector_all("tr[data-run]", "rows => rows.map(r => r.dataset.run)")
        row = page.locator("tr[data-run]").nth(runs.index(HOSTILE_RUN))
        assert row.locator("td.run-id").inner_text() == HOSTILE_RUN
        row.locator("a").click()
        page.wait_for_load_state("load")
        assert page.locator("h1").inner_text() == f"Run {HOSTILE_RUN}"
        messages = page.locator("ol.timeline .message").all_inner_texts()
        assert all(m.endswith(HOSTILE) for m in messages) and len(messages) == 3
        assert page.locator("dl.attestation dd", has_text=f"alice{HOSTILE}").count() == 1
        paths = page.locator("table.checkpoints td.path").all_inner_texts()
        assert paths and all(HOSTILE in p for p in paths)
        assert page.locator("table.checkpoints .problem-line").inner_text().endswith(HOSTILE)
        # Nothing from the text became an element; every script on the page is the server's own.
        assert page.locator("main img, main style, main a[href^='javascript']").count() == 0
        sources = page.eval_on_selector_all("script", "s => s.map(e => e.src || e.type)")
        assert sources == [
            "application/json",
            f"{board.url}/ui/static/charts.js",
            f"{board.url}/ui/static/proofs.js",
        ]
        assert page.evaluate("getComputedStyle(document.body).display") == "block"
        page.goto(f"{board.url}/ui/ledger")
        assert page.locator("pre.entry", has_text="alert('xss')").count() > 0
    seen.assert_quiet()


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Dashboard]:
    """A server of its own, for a test that edits its database."""
    store = (
        str(tmp_path / "ledger.db") if request.param == "sqlite" else request.getfixturevalue("pg_location")
    )
    with dashboard(tmp_path / "home", store) as board:
        yield board


def test_the_page_verifies_proofs_and_catches_an_edited_row(browser: Any, fresh: Dashboard) -> None:
    with visit(browser, fresh.url) as seen:
        page = seen.page
        seen.login(fresh.viewer)
        page.goto(f"{fresh.url}/ui/ledger")
        before = verdicts(page)
        assert len(before) == board_size(fresh) and set(before.values()) == {"verified"}, before
        size = board_size(fresh)
        assert (
            page.locator("#completeness").inner_text()
            == f"every entry from 0 to {size - 1} is on this page and verified"
        )
        # Someone with write access to the database rewrites the run's end: exit code 1 becomes 0.
        attacker = Attacker(_libpq(fresh.store))
        try:
            ((index, data),) = attacker.execute(
                "SELECT idx, data FROM entries WHERE idx = (SELECT MAX(ledger_index) FROM server_event_keys"
                " WHERE run = ?)",
                (RUN,),
            )
            data = bytes(data)
            assert b'"exit_code":1' in data
            attacker.execute(
                "UPDATE entries SET data = ? WHERE idx = ?",
                (data.replace(b'"exit_code":1', b'"exit_code":0'), index),
            )
        finally:
            attacker.close()
        page.goto(f"{fresh.url}/ui/ledger")
        after = verdicts(page)
        assert after[index].startswith(
            "does NOT verify: the entry and its proof do not lead to the signed root"
        )
        assert {text for i, text in after.items() if i != index} == {"verified"}
        assert '"exit_code":0' in page.locator(f'pre.entry[data-index="{index}"]').inner_text()
    seen.assert_quiet()


def test_a_pinned_key_decides_and_a_wrong_one_fails(browser: Any, board: Dashboard) -> None:
    other = SigningKey.generate("test.example/dashboard").verifier().text()  # same name, other key
    with visit(browser, board.url) as seen:
        page = seen.page
        seen.login(board.viewer)
        page.goto(f"{board.url}/ui/ledger")
        assert "the server's own key (not pinned" in page.locator("#key-in-use").inner_text()
        page.fill("#pinned-key", other)
        page.click("#pin-save")
        page.reload()
        assert "the key pinned in this browser" in page.locator("#key-in-use").inner_text()
        wrong = verdicts(page)
        assert set(wrong.values()) == {
            f"does NOT verify: the checkpoint is not signed by the key in use; it is signed by "
            f"{board.key.verifier().ident}"
        }
        page.fill("#pinned-key", board.key.verifier().text())
        page.click("#pin-save")
        right = verdicts(page)
        assert set(right.values()) == {"verified"}
        assert "the key pinned in this browser" in page.locator(".verdict").first.get_attribute("title")
        # A link with another key in the address cannot replace the pin; without a pin it is used.
        page.goto(f"{board.url}/ui/ledger?key={quote(other)}")
        assert set(verdicts(page).values()) == {"verified"}
        page.click("#pin-clear")
        page.goto(f"{board.url}/ui/ledger?key={quote(other)}")
        assert "given in the address" in page.locator("#key-in-use").inner_text()
        assert verdicts(page) == wrong
        page.goto(f"{board.url}/ui/ledger?key=garbage")
        assert set(verdicts(page).values()) == {
            "does NOT verify: the key in use is unusable: the key is not NAME+KEYID+KEYDATA"
        }
    seen.assert_quiet()


def _libpq(store: str) -> str:
    """The location as a plain database connection reaches it (trainguard's schema= as libpq options)."""
    query = parse_qs(urlsplit(store).query)
    return schema_url(query["schema"][0]) if "schema" in query else store


def _lie(page: Any, change: Any) -> None:
    """Make every /ui/proof answer pass through `change(doc) -> doc` on its way to the page."""

    def handle(route: Any) -> None:
        response = route.fetch()
        doc = change(json.loads(response.body()))
        route.fulfill(response=response, body=json.dumps(doc))

    page.route("**/ui/proof/*", handle)


def test_a_lying_server_is_caught_by_the_page(browser: Any, board: Dashboard) -> None:
    with Ledger.open(board.store, create=False) as ledger:
        size = ledger.size
        entry_two = next(ledger.store.entries(2, 3))[1]
        old_size, old_note = next(ledger.checkpoints())  # the head after the first run's batch
        assert 2 < old_size < size
        old_proofs = {i: ledger.inclusion_proof(i, old_size) for i in range(old_size)}
        head, note = ledger.head()
        forged = sign_checkpoint(head, SigningKey.generate("test.example/dashboard"))
        # The real signature under a text whose root was swapped for another.
        root_line = base64.b64encode(head.root).decode()
        swapped = note.replace(root_line, base64.b64encode(bytes(32)).decode(), 1)
    with visit(browser, board.url) as seen:
        page = seen.page
        seen.login(board.viewer)
        page.goto(f"{board.url}/ui/ledger")
        assert set(verdicts(page).values()) == {"verified"}  # this browser has now seen the head at `size`
        cases = {
            "another entry's bytes": (
                lambda d: {**d, "entry": base64.b64encode(entry_two).decode()} if d["index"] != 2 else d,
                "the entry and its proof do not lead to the signed root",
            ),
            "another entry's proof": (
                lambda d: {**d, "index": (d["index"] + 1) % size},
                "the server sent the proof of entry",
            ),
            "a note signed by another key of the same name": (
                lambda d: {**d, "checkpoint": forged},
                "the checkpoint is not signed by the key in use",
            ),
            "a root swapped under the real signature": (
                lambda d: {**d, "checkpoint": swapped},
                "the checkpoint's signature is invalid",
            ),
            "an older head with valid proofs": (
                lambda d: {
                    **d,
                    "checkpoint": old_note,
                    "tree_size": old_size,
                    "proof": [base64.b64encode(h).decode() for h in old_proofs.get(d["index"], [])],
                },
                "older than one this browser saw",
            ),
        }
        for name, (change, why) in cases.items():
            page.unroute("**/ui/proof/*")
            _lie(page, change)
            page.goto(f"{board.url}/ui/ledger")
            found = verdicts(page)
            refused = [i for i, text in found.items() if text.startswith("does NOT verify:")]
            expected = [i for i in found if i != 2] if name == "another entry's bytes" else list(found)
            assert sorted(refused) == sorted(expected), (name, found)
            # Entries past an older head's size fail for that reason; those under it, for this one.
            because = [i for i in refused if why in found[i]]
            assert sorted(because) == [
                i for i in sorted(refused) if not name.startswith("an older") or i < old_size
            ]
        # The server shows one text and proves other bytes.
        page.unroute("**/ui/proof/*")

        def altered(route: Any) -> None:
            response = route.fetch()
            html = response.text().replace("&#34;exit_code&#34;:1", "&#34;exit_code&#34;:0")
            route.fulfill(response=response, body=html)

        page.route("**/ui/ledger", altered)
        page.goto(f"{board.url}/ui/ledger")
        found = verdicts(page)
        shown = [
            i
            for i, t in found.items()
            if t == "does NOT verify: the entry shown on this page is not the bytes that were verified"
        ]
        assert len(shown) == 2  # the run.end of both runs
        complete = page.locator("#completeness").inner_text()
        assert complete == f"entries without a verified row on this page: {shown[0]}, {shown[1]}"
    seen.assert_quiet()


def test_a_page_that_leaves_an_entry_out_is_caught(browser: Any, board: Dashboard) -> None:
    """The server hides an alert by not listing its row, or the newest rows by ending the page early."""
    size = board_size(board)
    with visit(browser, board.url) as seen:
        page = seen.page
        seen.login(board.viewer)

        def drop_row(route: Any) -> None:
            response = route.fetch()
            html = re.sub(r'<tr data-index="7">.*?</tr>', "", response.text(), flags=re.S)
            route.fulfill(response=response, body=html)

        page.route("**/ui/ledger", drop_row)
        page.goto(f"{board.url}/ui/ledger")
        assert 7 not in verdicts(page)
        assert page.locator("#completeness").inner_text() == "entries without a verified row on this page: 7"
        page.unroute("**/ui/ledger")

        def end_early(route: Any) -> None:
            response = route.fetch()
            html = re.sub(rf'<tr data-index="{size - 1}">.*?</tr>', "", response.text(), flags=re.S)
            html = html.replace(f'data-end="{size}"', f'data-end="{size - 1}"')
            route.fulfill(response=response, body=html)

        page.route("**/ui/ledger", end_early)
        page.goto(f"{board.url}/ui/ledger")
        verdicts(page)
        text = page.locator("#completeness").inner_text()
        assert text == f"the signed head holds {size} entries, but this page stops at {size - 1}"
    seen.assert_quiet()
