"""The drill's HTML report, opened in a real browser: it fetches nothing, runs nothing, escapes what the
runs logged, and draws every plot from the runs' own data.

The browser is Debian's chromium driven by playwright (playwright's own browser download is not used).
Without them the browser tests skip, except in CI (CI=true), where they fail saying what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium
from trainguard.drill._attacks import ATTACK_STEP, build
from trainguard.drill._drill import DrillResult
from trainguard.drill._play import Outcome
from trainguard.drill._report import render, write_html
from trainguard.drill._runs import RunRecord

# One attack of each kind of play that leaves a training run (patched code, a signal) and one offline.
SHORT = ["flip-one-rank", "sigterm-rank", "ledger-row-edited"]
PLOT_KINDS = ("loss", "step-time", "off-cpu", "fingerprint")
HOSTILE = '<script>alert(1)</script><img src="http://192.0.2.1/x.png" onerror="alert(2)">'


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@dataclasses.dataclass
class Visit:
    """A page opened from a file, with whatever it tried to fetch, logged as an error, or popped up."""

    page: Any
    fetched: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    dialogs: list[str] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def _visit(browser: Any, path: Path) -> Iterator[Visit]:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    visit = Visit(context.new_page())

    def route(route: Any) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            visit.fetched.append(route.request.url)
            route.abort()

    def dialog(opened: Any) -> None:
        visit.dialogs.append(opened.message)
        opened.dismiss()

    context.route("**/*", route)
    visit.page.on("console", lambda m: visit.errors.append(m.text) if m.type == "error" else None)
    visit.page.on("pageerror", lambda error: visit.errors.append(str(error)))
    visit.page.on("dialog", dialog)
    try:
        visit.page.goto(path.as_uri(), wait_until="load")
        yield visit
    finally:
        context.close()


def _plots(page: Any) -> dict[str, dict[str, Any]]:
    """Each plot's series: the points of its polylines and its dots, and its markers' labels."""
    found: list[dict[str, Any]] = page.eval_on_selector_all(
        "[data-plot]",
        """figures => figures.map(f => ({
            key: f.dataset.plot,
            series: Object.fromEntries([...f.querySelectorAll("g.series")].map(g => [g.dataset.series, {
                lines: [...g.querySelectorAll("polyline")].map(
                    p => p.getAttribute("points").trim().split(/\\s+/).length),
                dots: g.querySelectorAll("circle").length,
            }])),
            markers: [...f.querySelectorAll("g.marker > title")].map(t => t.textContent),
        }))""",
    )
    return {plot["key"]: plot for plot in found}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# -- a real drill --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report folder of one short drill, run as a user runs it."""
    root = tmp_path_factory.mktemp("drill")
    out = root / "report"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "drill",
            "--steps",
            "12",
            "--attacks",
            *SHORT,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TRAINGUARD_HOME": str(root / "user-home")},
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-8000:]
    assert f"report written to {out / 'report.html'}" in done.stderr
    return out


@pytest.mark.torch
@pytest.mark.browser
def test_the_report_of_a_real_drill_shows_every_run_offline(
    browser: Any, drill: Path, tmp_path: Path
) -> None:
    report = json.loads((drill / "drill.json").read_text())
    attacks = {a["name"]: a for a in report["attacks"]}
    trained = [name for name, a in attacks.items() if a["run"] and any(a["run"]["losses"].values())]
    assert trained == ["flip-one-rank", "sigterm-rank"], attacks
    with _visit(browser, drill / "report.html") as visit:
        page = visit.page
        plots = _plots(page)
        expected = {f"{kind}:{run}" for kind in PLOT_KINDS for run in ["clean", *trained]} | {"detection"}
        assert set(plots) == expected
        for key, plot in plots.items():
            drawn = sum(sum(s["lines"]) + s["dots"] for s in plot["series"].values())
            assert drawn > 0, f"{key} draws nothing"
        _check_clean_run(plots, report["clean_run"])
        flip = attacks["flip-one-rank"]
        loss_markers = plots["loss:flip-one-rank"]["markers"]
        assert f"attack acts at step {ATTACK_STEP}" in loss_markers
        assert f"detected at step {flip['step']}" in loss_markers
        assert any("alert(s) name rank(s) 1" in m for m in plots["fingerprint:flip-one-rank"]["markers"])
        assert f"signal sent after step {ATTACK_STEP}" in plots["step-time:sigterm-rank"]["markers"]
        _check_scorecard(page, attacks)
        assert "3 of 3 attacks caught, 0 false alarm(s)" in page.locator("p.verdict").inner_text()
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    assert visit.fetched == [] and visit.errors == [] and visit.dialogs == []
    width, height = _png_size(shot)
    # A full page: the header, the scorecard and a dozen plots, not a blank sheet.
    assert width >= 1000 and height > 2000 and shot.stat().st_size > 100_000


def _check_clean_run(plots: dict[str, dict[str, Any]], clean: dict[str, Any]) -> None:
    """Every step of every rank is drawn, in the loss, step time and off-CPU plots."""
    for key, series in (("loss", "losses"), ("step-time", "step_seconds"), ("off-cpu", "cpu_seconds")):
        drawn = plots[f"{key}:clean"]["series"]
        for rank, values in clean[series].items():
            assert all(v is not None and math.isfinite(v) for v in values), (key, rank)
            assert drawn[f"rank {rank}"] == {"lines": [len(values)], "dots": len(values)}, key
    for rank, cpu in clean["cpu_seconds"].items():
        wall = clean["step_seconds"][rank]
        # The training thread cannot spend more CPU time than the step's wall time.
        assert all(0 < c <= w + 0.01 for c, w in zip(cpu, wall, strict=True)), rank
    agreed = plots["fingerprint:clean"]["series"]["agreed"]["dots"]
    assert agreed == len(clean["losses"]["0"]), "the clean run's replicas agreed at every step"


def _check_scorecard(page: Any, attacks: dict[str, dict[str, Any]]) -> None:
    rows = page.locator("tr[data-attack]")
    assert [rows.nth(i).get_attribute("data-attack") for i in range(rows.count())] == SHORT
    for name, attack in attacks.items():
        row = page.locator(f'tr[data-attack="{name}"]')
        assert row.get_attribute("data-verdict") == ("caught" if attack["caught"] else "missed")
        ledger = row.locator('td[data-column="ledger entry"]').inner_text()
        if attack["evidence"] is not None:
            assert f"#{attack['evidence']['index']}" in ledger
            assert ("inclusion proof verified" in ledger) is attack["evidence"]["inclusion_proof_verified"]
    assert (
        "b: the optimizer patched at run time" in page.locator('tr[data-attack="flip-one-rank"]').inner_text()
    )


# -- hostile text --------------------------------------------------------------------------------


def _hostile_result() -> DrillResult:
    """A drill result whose every piece of logged text is an attempt to run a script or fetch a file."""

    def run(name: str, loss_of_rank_1: list[float]) -> RunRecord:
        steps = {
            rank: [
                {"step": step, "loss": loss, "seconds": 0.1 + 0.01 * step, "cpu_seconds": 0.05}
                for step, loss in enumerate(losses, 1)
            ]
            for rank, losses in ((0, [4.0, 3.5, 3.1, 2.9, 2.8, 2.7]), (1, loss_of_rank_1))
        }
        rows = [[step, 3.0, 1.0, [0, 0], [0, 0], [0, 0], ["0", "0"], []] for step in range(1, 6)]
        events: list[tuple[int, str, int | None, dict[str, Any]]] = [
            (0, "monitor.start", 0, {"checks": ["fingerprint", "update"]}),
            (1, "monitor.steps", 0, {"columns": [], "rows": rows}),
            (2, "monitor.alert", 0, {"check": "fingerprint", "ranks": [1], "step": 6, "message": HOSTILE}),
            (3, "monitor.alert", 0, {"check": HOSTILE, "ranks": [HOSTILE], "step": 6, "message": HOSTILE}),
            # What a patched job could write to the ledger instead: no number where one belongs.
            (4, "monitor.alert", 0, {"check": "fingerprint", "ranks": HOSTILE, "step": HOSTILE}),
            (5, "monitor.steps", 0, {"columns": [], "rows": [{"step": 1}, HOSTILE, [HOSTILE]]}),
            (6, "monitor.start", 0, {"checks": HOSTILE}),
        ]
        return RunRecord(name, Path("/nonexistent"), 1, HOSTILE, [], steps, events, 12.5)

    attacks = {a.name: a for a in build(2)}
    flip = dataclasses.replace(attacks["flip-one-rank"], what=HOSTILE)
    odd_name = dataclasses.replace(attacks["lr-negated-one-rank"], name='x"><script>alert(3)</script>')
    outcomes = [
        Outcome(
            flip,
            caught=True,
            detected_by=HOSTILE,
            named=HOSTILE,
            step=ATTACK_STEP,
            steps_to_detection=0,
            seconds_to_detection=0.2,
            evidence_index=2,
            evidence_proved=True,
            details=HOSTILE,
            run=run("flip", [4.1, 3.4, 3.2, 3.0, 2.9, 9.0]),
        ),
        Outcome(
            odd_name,
            caught=False,
            detected_by="",
            named=HOSTILE,
            details=HOSTILE,
            run=run("odd", [4.1, math.nan, 3.0, 2.9, 2.8, 2.7]),
        ),
        Outcome(
            attacks["ledger-row-edited"],
            caught=True,
            detected_by="ledger verify",
            named="first bad index: 4",
            details=HOSTILE,
        ),
    ]
    return DrillResult(
        world=2,
        steps=6,
        device=HOSTILE,
        clean=run("clean", [4.1, 3.4, 3.2, 3.0, 2.9, 2.8]),
        false_alarms=[HOSTILE],
        outcomes=outcomes,
        seconds=30.0,
    )


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def test_logged_text_is_escaped_and_nothing_points_outside() -> None:
    page = render(_hostile_result())
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parser = _Tags()
    parser.feed(page)
    tags = {tag for tag, _ in parser.tags}
    assert not tags & {"script", "img", "link", "iframe", "object", "embed", "image", "use", "a"}, tags
    for tag, attrs in parser.tags:
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)
            assert "://" not in (value or "") and "url(" not in (value or ""), (tag, name, value)
    assert "url(" not in page and "@import" not in page


@pytest.mark.browser
def test_hostile_text_stays_text_in_the_browser(browser: Any, tmp_path: Path) -> None:
    result = _hostile_result()
    path = tmp_path / "report.html"
    write_html(result, path)
    with _visit(browser, path) as visit:
        page = visit.page
        assert page.locator("script, img").count() == 0
        details = page.locator('tr[data-attack="flip-one-rank"] td[data-column="details"]').inner_text()
        assert details == HOSTILE
        names = [a.get_attribute("data-attack") for a in page.locator("tr[data-attack]").all()]
        assert names == [o.attack.name for o in result.outcomes]
        assert HOSTILE in page.locator("ul.alarms").inner_text()
        # The NaN loss breaks rank 1's line in two; its other five steps are drawn.
        odd = _plots(page)[f"loss:{result.outcomes[1].attack.name}"]["series"]["rank 1"]
        assert odd == {"lines": [4], "dots": 5}
    assert visit.dialogs == [] and visit.fetched == [] and visit.errors == []


@pytest.mark.browser
def test_the_harness_would_see_a_fetch_a_dialog_and_an_error(browser: Any, tmp_path: Path) -> None:
    """The checks above pass on a page that does none of these: here is one that does all three."""
    page = tmp_path / "bad.html"
    page.write_text('<img src="http://192.0.2.1/x.png"><script>alert("hi"); console.error("bad")</script>')
    with _visit(browser, page) as visit:
        pass
    assert visit.fetched == ["http://192.0.2.1/x.png"]
    assert visit.dialogs == ["hi"]
    assert "bad" in visit.errors
