"""The drill's report: one HTML file with the verdict, the scorecard and plots of every run.

The file stands alone and opens offline: inline CSS, plots drawn here as inline SVG, no script, and no
address of any kind (no font, image or stylesheet fetched); a Content-Security-Policy says so to the
browser as well. All text from the runs is escaped: alert messages, command lines and file names come
from logs that an attacker can write to.
"""

from __future__ import annotations

import html
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainguard import __version__
from trainguard.drill._attacks import ATTACK_STEP, GROUPS
from trainguard.drill._chart import Marker, Plot, Series, figure
from trainguard.drill._drill import DrillResult
from trainguard.drill._play import Outcome
from trainguard.drill._runs import RunRecord

__all__ = ["write_html"]

# Okabe-Ito colours, told apart by colour-blind readers; red is kept for alerts and detections.
RANK_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#8C564B", "#7F7F7F", "#BCBD22")
ALERT = "#C62828"
ATTACK = "#555555"
CAUGHT = AGREED = "#009E73"
DISAGREED, NO_VERDICT = ALERT, "#9E9E9E"


def write_html(result: DrillResult, path: Path) -> None:
    path.write_text(render(result), encoding="utf-8")


def render(result: DrillResult) -> str:
    body = [
        _header(result),
        _scorecard(result.outcomes),
        _run_section("clean", result.clean, None),
        _detection_section(result.outcomes),
        *(_run_section(o.attack.name, o.run, o) for o in result.outcomes if o.run is not None),
    ]
    return _page(_verdict(result), "\n".join(body))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


# -- header and scorecard ------------------------------------------------------------------------


def _verdict(result: DrillResult) -> str:
    return f"{'PASSED' if result.ok else 'FAILED'}: {result.tally()}"


def _header(result: DrillResult) -> str:
    facts: list[tuple[str, object]] = [("world size", result.world)]
    if result.script is not None:
        facts.append(("script", shlex.join([str(result.script.path), *result.script.args])))
    facts += [
        ("steps per run", result.steps if result.steps is not None else "set by the script"),
        ("drill time", f"{result.seconds:.0f} s"),
        ("device", result.device),
        ("trainguard", __version__),
    ]
    alarms = "".join(f"<li>{_e(alarm)}</li>" for alarm in result.false_alarms)
    notices = "".join(f"<li>{_e(notice)}</li>" for notice in result.clean_notices)
    state = "ok" if result.ok else "failed"
    return (
        "<header>\n<h1>trainguard drill</h1>\n"
        f'<p class="verdict {state}" data-verdict="{state}">'
        f"{_e(_verdict(result))}</p>\n"
        '<dl class="facts">'
        + "".join(f"<div><dt>{_e(name)}</dt><dd>{_e(value)}</dd></div>" for name, value in facts)
        + "</dl>\n"
        + (f'<h2>False alarms in the clean run</h2>\n<ul class="alarms">{alarms}</ul>\n' if alarms else "")
        + (
            f'<h2>Alerts of alert-only checks in the clean run</h2>\n<ul class="notices">{notices}</ul>\n'
            if notices
            else ""
        )
        + "</header>"
    )


_COLUMNS = (
    "attack",
    "group",
    "verdict",
    "detected by",
    "steps to detection",
    "seconds to detection",
    "named",
    "ledger entry",
    "details",
)
# Each column's share of the width: the free text gets the room, the short facts little.
_WIDTHS = ("wide", "mid", "narrow", "mid", "narrow", "narrow", "text", "narrow", "text")


def _scorecard(outcomes: Sequence[Outcome]) -> str:
    head = "".join(f"<th>{_e(column)}</th>" for column in _COLUMNS)
    widths = "".join(f'<col class="{width}">' for width in _WIDTHS)
    rows = "\n".join(_scorecard_row(outcome) for outcome in outcomes)
    return (
        '<section id="scorecard">\n<h2>Scorecard</h2>\n'
        f'<table class="scorecard">\n<colgroup>{widths}</colgroup>\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>\n"
        f'<p class="note">Attacks are armed to act at step {ATTACK_STEP}; a negative number of steps means '
        "the attack was caught before it acted (its planted code was seen first).</p>\n</section>"
    )


def _scorecard_row(outcome: Outcome) -> str:
    attack = outcome.attack
    verdict = {"caught": "caught", "missed": "MISSED"}.get(outcome.verdict, outcome.verdict)
    cells = (
        f"<strong>{_e(attack.name)}</strong><br><small>{_e(attack.what)}</small>",
        f"{_e(attack.group)}: {_e(GROUPS.get(attack.group, '?'))}",
        f'<span class="{_slug(verdict)}">{verdict}</span>',
        _e(outcome.detected_by or "-"),
        _e(_steps_to_detection(outcome.steps_to_detection)),
        _e("-" if outcome.seconds_to_detection is None else f"{outcome.seconds_to_detection:.2f} s"),
        _e(outcome.named or "-"),
        _e(_evidence(outcome)),
        _e(outcome.details or "-"),
    )
    tds = "".join(
        f'<td data-column="{_e(column)}">{cell}</td>' for column, cell in zip(_COLUMNS, cells, strict=True)
    )
    return f'<tr data-attack="{_e(attack.name)}" data-verdict="{_slug(verdict)}">{tds}</tr>'


def _slug(verdict: str) -> str:
    """A verdict as a class or attribute value: "caught", "missed", "not-applicable"."""
    return verdict.lower().replace(" ", "-")


def _steps_to_detection(steps: int | None) -> str:
    if steps is None:
        return "-"
    return f"{steps} (before it acted)" if steps < 0 else str(steps)


def _evidence(outcome: Outcome) -> str:
    if outcome.evidence_index is None:
        return "-"
    proof = {
        True: "inclusion proof verified",
        False: "inclusion proof FAILED",
        None: "inclusion proof not checked",
    }[outcome.evidence_proved]
    return f"#{outcome.evidence_index}, {proof}"


# -- what the plots show, from a run's record ----------------------------------------------------
#
# The step logs and the ledger's events were written by the job, whose code an attacker may have
# patched: a value that is not a finite number is no value, never a crash of the report.


def _per_rank(run: RunRecord, value: str) -> tuple[Series, ...]:
    """One series per rank: `value` of each step ("loss", "seconds", "off_cpu")."""
    return tuple(
        Series(
            f"rank {rank}",
            tuple(
                (step, _value(entry, value))
                for entry in log
                if (step := _number(entry.get("step"))) is not None
            ),
            _rank_colour(rank),
        )
        for rank, log in sorted(run.steps.items())
    )


def _value(entry: dict[str, Any], value: str) -> float | None:
    if value == "off_cpu":
        # Logs of jobs older than the CPU time have no "cpu_seconds": nothing to plot, not zero.
        wall, cpu = _number(entry.get("seconds")), _number(entry.get("cpu_seconds"))
        return None if wall is None or cpu is None else wall - cpu
    return _number(entry.get(value))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _step(payload: dict[str, Any]) -> int | None:
    step = payload.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _rank_colour(rank: int) -> str:
    return RANK_COLOURS[rank % len(RANK_COLOURS)]


def _alerts(run: RunRecord) -> list[dict[str, Any]]:
    return [payload for _, _, _, payload in run.of_type("monitor.alert")]


def _judged_steps(run: RunRecord) -> set[int]:
    """Steps of rank 0's `monitor.steps` summaries: every rank's report was gathered and judged."""
    steps: set[int] = set()
    for _, _, _, payload in run.of_type("monitor.steps"):
        rows = payload.get("rows")
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, list) and row and isinstance(row[0], int):
                steps.add(row[0])
    return steps


def _fingerprint_compared(run: RunRecord) -> bool:
    return any(
        isinstance(checks := p.get("checks"), list) and "fingerprint" in checks
        for _, _, _, p in run.of_type("monitor.start")
    )


_FINGERPRINT_STATES = ("no verdict recorded", "disagreed", "agreed")


def _fingerprint_states(run: RunRecord) -> dict[int, int]:
    """Per step, an index in _FINGERPRINT_STATES: derived from the ledger's events, see the caption."""
    logged = {
        int(step) for log in run.steps.values() for e in log if (step := _number(e.get("step"))) is not None
    }
    judged = _judged_steps(run) if _fingerprint_compared(run) else set()
    disagreed = {
        step for p in _alerts(run) if p.get("check") == "fingerprint" and (step := _step(p)) is not None
    }
    states: dict[int, int] = {}
    for step in sorted(logged | judged | disagreed):
        if step in disagreed:
            states[step] = 1
        elif step in judged:
            states[step] = 2
        else:
            states[step] = 0
    return states


_FINGERPRINT_CAPTION = (
    "The monitor records no per-step fingerprint values; this is derived from the ledger. A step is "
    "'agreed' where rank 0's monitor.steps summary has a row for it (every rank's report, fingerprints "
    "included, was gathered and judged, with the fingerprint check on, per monitor.start) and no "
    "monitor.alert of check 'fingerprint' is at that step; 'disagreed' where such an alert is; 'no "
    "verdict recorded' where the ranks logged the step but the ledger holds neither (summaries are "
    "written in batches and are lost with a rank that is killed). Red lines: monitor alerts of any "
    "check, with the ranks they named."
)


# -- plots ---------------------------------------------------------------------------------------


def _run_section(name: str, run: RunRecord, outcome: Outcome | None) -> str:
    heading = f"Run: {name}" if outcome is not None else "The clean run"
    facts = f"exit code {run.exit_code}, {run.seconds:.1f} s, {len(run.steps)} rank(s) logged steps"
    if not any(run.steps.values()):
        body = (
            '<p class="empty">The job stopped before its first training step: there is no step to plot.</p>'
        )
    else:
        body = (
            '<div class="plots">\n'
            + "\n".join(figure(p) for p in _run_plots(name, run, outcome))
            + "\n</div>"
        )
    return (
        f'<section class="run" data-run="{_e(name)}">\n<h2>{_e(heading)}</h2>\n'
        f'<p class="note">{_e(facts)}</p>\n{body}\n</section>'
    )


def _run_plots(name: str, run: RunRecord, outcome: Outcome | None) -> list[Plot]:
    markers = _acted(outcome) + _detected(outcome)
    return [
        Plot(
            f"loss:{name}",
            "Training loss per rank",
            "step",
            "loss",
            _per_rank(run, "loss"),
            markers,
            "Cross-entropy of each rank's own batch, as each rank logged it; a gap is a loss that was not "
            "finite.",
        ),
        Plot(
            f"step-time:{name}",
            "Step time per rank",
            "step",
            "seconds",
            _per_rank(run, "seconds"),
            markers,
            "Wall time of each training step (forward, backward, optimizer step), as each rank logged it.",
        ),
        Plot(
            f"off-cpu:{name}",
            "Time off the CPU per rank",
            "step",
            "seconds",
            _per_rank(run, "off_cpu"),
            markers,
            "Wall time of the step less the CPU time of the rank's training thread (time.thread_time; "
            "torch runs on one thread): waiting for the other ranks, I/O, sleeping or for a CPU.",
        ),
        # The alerts, the detecting one among them, have their own markers there.
        _fingerprint_plot(name, run, _acted(outcome) + _alert_markers(run)),
    ]


def _acted(outcome: Outcome | None) -> tuple[Marker, ...]:
    """Where the attack acted: a signal after the step, a planted patch at the step it is armed for."""
    if outcome is None:
        return ()
    if outcome.attack.kind == "signal":
        return (Marker(ATTACK_STEP, f"signal sent after step {ATTACK_STEP}", ATTACK),)
    if outcome.attack.job_patch:
        return (Marker(ATTACK_STEP, f"attack acts at step {ATTACK_STEP}", ATTACK),)
    return ()


def _detected(outcome: Outcome | None) -> tuple[Marker, ...]:
    if outcome is None or outcome.step is None:
        return ()
    return (Marker(outcome.step, f"detected at step {outcome.step}", ALERT, dashed=False),)


def _fingerprint_plot(name: str, run: RunRecord, markers: tuple[Marker, ...]) -> Plot:
    states = _fingerprint_states(run)
    colours = (NO_VERDICT, DISAGREED, AGREED)
    points = tuple(sorted(states.items()))
    dots = tuple(
        Series(
            state,
            tuple((step, float(index)) for step, index in points if index == number),
            colours[number],
            line=False,
        )
        for number, state in enumerate(_FINGERPRINT_STATES)
    )
    verdicts = Series("verdict per step", tuple((s, float(i)) for s, i in points), "#BDBDBD")
    return Plot(
        f"fingerprint:{name}",
        "Replicas' fingerprints per step",
        "step",
        "",
        (verdicts, *dots),
        markers,
        _FINGERPRINT_CAPTION,
        _FINGERPRINT_STATES,
    )


def _alert_markers(run: RunRecord) -> tuple[Marker, ...]:
    """One marker per step and set of ranks named, listing the checks that alerted."""
    checks: dict[tuple[int, str], list[str]] = {}
    for payload in _alerts(run):
        step, named = _step(payload), payload.get("ranks")
        if step is not None:
            ranks = ", ".join(map(str, named if isinstance(named, list) else [named])) or "none"
            checks.setdefault((step, ranks), []).append(str(payload.get("check")))
    return tuple(
        Marker(step, f"{', '.join(names)} alert(s) name rank(s) {ranks}", ALERT)
        for (step, ranks), names in checks.items()
    )


def _detection_section(outcomes: Sequence[Outcome]) -> str:
    timed = [o for o in outcomes if o.step is not None]
    caption = (
        f"For each attack caught by an alert at a step: a line from step {ATTACK_STEP}, where the attacks "
        "act, to the step of the alert; a dot left of the dashed line means it was caught before it acted. "
        "Attacks caught otherwise (the supervisor, the load gate, verify, ledger verify) have no step: see "
        "the scorecard."
    )
    if not timed:
        shown = (
            '<figure class="plot" data-plot="detection"><p class="empty">No attack was caught by an '
            f"alert at a step.</p><figcaption>{_e(caption)}</figcaption></figure>"
        )
    else:
        shown = figure(
            Plot(
                "detection",
                "Steps from attack to detection",
                "step",
                "",
                tuple(series for row, o in enumerate(timed) for series in _detection_series(row, o)),
                (Marker(ATTACK_STEP, f"attacks act at step {ATTACK_STEP}", ATTACK),),
                caption,
                tuple(o.attack.name for o in timed),
                legend=False,
            )
        )
    return f'<section id="detection">\n<h2>Detection</h2>\n<div class="plots">\n{shown}\n</div>\n</section>'


def _detection_series(row: int, outcome: Outcome) -> tuple[Series, Series]:
    """A line from the step the attacks act to the step of detection, and a dot at the detection."""
    step = outcome.step or 0
    colour = CAUGHT if outcome.caught else ALERT
    name = outcome.attack.name
    return (
        Series(
            f"{name}: from step {ATTACK_STEP} to {step}",
            ((ATTACK_STEP, row), (step, row)),
            colour,
            dots=False,
        ),
        Series(f"{name}: detected at step {step}", ((step, row),), colour, line=False),
    )


_CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: #1b1b1b; background: #fff; margin: 0 auto; padding: 24px; max-width: 1280px; }
h1 { font-size: 24px; margin: 0 0 8px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.verdict { font-size: 18px; font-weight: 600; padding: 8px 12px; border-radius: 6px; display: inline-block; }
.verdict.ok { background: #e6f4ea; color: #1e5b2c; }
.verdict.failed { background: #fdecea; color: #8a1c1c; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 12px 0; }
.facts dt { font-size: 12px; color: #666; }
.facts dd { margin: 0; font-weight: 600; }
table.scorecard { border-collapse: collapse; width: 100%; font-size: 13px; table-layout: fixed; }
.scorecard col.wide { width: 18%; } .scorecard col.mid { width: 11%; } .scorecard col.narrow { width: 6%; }
.scorecard col.text { width: 18%; }
.scorecard td[data-column="details"], .scorecard td[data-column="named"] { font-size: 12px; }
.scorecard th, .scorecard td { border: 1px solid #ddd; padding: 5px 7px; text-align: left;
  vertical-align: top; }
.scorecard th { background: #f4f4f4; }
.scorecard td { overflow-wrap: anywhere; }
.caught { color: #1e5b2c; font-weight: 600; }
.missed { color: #b00020; font-weight: 700; }
.not-applicable { color: #5f6368; font-style: italic; }
small, .note, figcaption { color: #555; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 16px; }
figure.plot { margin: 0; border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px; background: #fff; }
figcaption { font-size: 12px; margin-top: 4px; }
svg.chart { width: 100%; height: auto; display: block; font-family: inherit; }
.plot-title { font-size: 13px; font-weight: 600; fill: #1b1b1b; }
.tick, .legend text { font-size: 11px; fill: #444; }
.axis-label { font-size: 12px; fill: #333; }
.marker-label { font-size: 10.5px; }
line.grid { stroke: #ececec; stroke-width: 1; }
path.axis { stroke: #888; stroke-width: 1; }
.empty { color: #666; font-style: italic; }
"""

_POLICY = "default-src 'none'; style-src 'unsafe-inline'"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # Nothing may be fetched or run, even if some text slipped through unescaped.
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>trainguard drill: {_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )
