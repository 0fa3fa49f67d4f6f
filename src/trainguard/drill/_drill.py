"""The drill: a clean run of the job (the built-in one, or the user's script), then each attack, then
the scorecard.

Every run happens in a throwaway workspace (its own TRAINGUARD_HOME, ledger, keys, trust policy and
copies of the job), so the user's environment, checkpoints and ledger are never touched. Each piece of
evidence the scorecard cites is checked against the workspace ledger with an RFC 9162 inclusion proof.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainguard.drill._attacks import Attack
from trainguard.drill._live import LiveTable
from trainguard.drill._play import Context, Outcome, play
from trainguard.drill._runs import RunRecord, train
from trainguard.drill._script import NO_WATCH, Script
from trainguard.drill._workspace import Workspace

__all__ = ["DrillResult", "run_drill"]

SCHEMA_VERSION = "1"


@dataclasses.dataclass
class DrillResult:
    world: int
    steps: int | None  # None: the user's script sets its own
    device: str
    clean: RunRecord
    false_alarms: list[str]
    outcomes: list[Outcome]
    seconds: float
    script: Script | None = None
    # Alerts of alert-only checks in the clean run (data_wait, spike: noisy on a loaded machine, they
    # never stop a job): shown, counted, but not false alarms.
    clean_notices: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No false alarm, and every attack caught that could be played against the job."""
        return not self.false_alarms and all(o.caught or not o.applicable for o in self.outcomes)

    def tally(self) -> str:
        """ "N of N attacks caught, 0 false alarm(s) in the clean run", counting applicable attacks only
        (and saying how many were not) when some were not."""
        caught = sum(o.caught for o in self.outcomes)
        applicable = sum(o.applicable for o in self.outcomes)
        alarms = f"{len(self.false_alarms)} false alarm(s) in the clean run"
        if self.clean_notices:
            alarms += f" ({len(self.clean_notices)} alert(s) of alert-only checks)"
        if applicable == len(self.outcomes):
            return f"{caught} of {applicable} attacks caught, {alarms}"
        return (
            f"{caught} of {applicable} applicable attacks caught, {len(self.outcomes) - applicable} not "
            f"applicable, {alarms}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "world_size": self.world,
            "steps": self.steps,
            "device": self.device,
            "script": self.script.to_json() if self.script is not None else None,
            "seconds": round(self.seconds, 2),
            "clean_run": {
                "exit_code": self.clean.exit_code,
                "false_alarms": self.false_alarms,
                "alerts_of_alert_only_checks": self.clean_notices,
                "seconds": round(self.clean.seconds, 2),
                **run_series(self.clean),
            },
            "attacks": [
                {**outcome.to_json(), "run": _attack_run(outcome.run) if outcome.run is not None else None}
                for outcome in self.outcomes
            ],
            "caught": sum(o.caught for o in self.outcomes),
            "missed": [o.attack.name for o in self.outcomes if o.verdict == "missed"],
            "not_applicable": [o.attack.name for o in self.outcomes if not o.applicable],
        }


def run_series(run: RunRecord) -> dict[str, dict[str, list[float | None]]]:
    """Each rank's per-step series, from step 1 on: loss, wall seconds and the training thread's CPU
    seconds (their difference is time off the CPU). A non-finite loss is null, as JSON has no NaN."""
    return {
        "losses": _per_rank(run, "loss"),
        "step_seconds": _per_rank(run, "seconds"),
        "cpu_seconds": _per_rank(run, "cpu_seconds"),
    }


def _per_rank(run: RunRecord, key: str) -> dict[str, list[float | None]]:
    return {str(rank): [_finite(entry.get(key)) for entry in log] for rank, log in sorted(run.steps.items())}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _attack_run(run: RunRecord) -> dict[str, Any]:
    return {"exit_code": run.exit_code, "seconds": round(run.seconds, 2), **run_series(run)}


def _clean_alerts(clean: RunRecord, *, stopping: bool) -> list[str]:
    """The clean run's monitor alerts whose action stops the job (or, with `stopping` False, the others)."""
    return [
        f"{p.get('check')} at step {p.get('step')}: {p.get('message')}"
        for _, _, _, p in clean.of_type("monitor.alert")
        if (p.get("action") != "alert") == stopping
    ]


def _false_alarms(clean: RunRecord, script: Script | None) -> list[str]:
    alarms = _clean_alerts(clean, stopping=True)
    if clean.exit_code != 0:
        alarms.append(f"the clean run exited {clean.exit_code}: {clean.output.strip().splitlines()[-1:]}")
    if script is not None and not clean.of_type("monitor.start"):
        alarms.append(NO_WATCH)
    unfinished = [r["rank"] for r in clean.ranks if not r.get("finished")]
    if unfinished:
        alarms.append(f"ranks {unfinished} did not finish the clean run")
    return alarms


def _prove(workspace: Workspace, outcomes: Sequence[Outcome]) -> None:
    """Check each cited ledger entry with an inclusion proof against the current signed head."""
    from trainguard.ledger import Ledger, ProofError, leaf_hash, verify_inclusion

    with Ledger.open(workspace.home / "ledger.db", create=False) as ledger:
        checkpoint, _ = ledger.head()
        for outcome in outcomes:
            index = outcome.evidence_index
            if index is None:
                continue
            data = next(iter(ledger.store.entries(index, index + 1)))[1]
            try:
                verify_inclusion(
                    leaf_hash(data),
                    index,
                    checkpoint.size,
                    ledger.inclusion_proof(index, checkpoint.size),
                    checkpoint.root,
                )
                outcome.evidence_proved = True
            except ProofError:
                outcome.evidence_proved = False


def run_drill(
    workspace: Workspace,
    attacks: Sequence[Attack],
    *,
    world: int,
    steps: int,
    device: str,
    progress: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
    table: LiveTable | None = None,
    script: Script | None = None,
) -> DrillResult:
    """With `script`, the user's script is the job (`steps` is then its own business: nothing passes it)."""
    began = time.monotonic()
    workspace.prepare()
    job = f"{script.path.name}, " if script is not None else ""
    length = "" if script is not None else f", {steps} steps"
    progress(f"drill: clean run ({job}{world} processes{length})")
    clean = train(workspace, "clean", world=world, steps=steps, device=device, script=script)
    false_alarms = _false_alarms(clean, script)
    verdict = f"raised {len(false_alarms)} false alarm(s)" if false_alarms else "clean"
    progress(f"drill: clean run {verdict} in {clean.seconds:.1f} s")
    if NO_WATCH in false_alarms:
        # Every attack would be judged against a job with no guard: say that once, play none.
        progress(f"drill: {NO_WATCH}; no attack was played")
        attacks = ()
    ctx = Context(workspace, world, steps, device, clean, script)
    outcomes = []
    table = table if table is not None else LiveTable(len(attacks))
    table.header()
    for number, attack in enumerate(attacks, 1):
        start = time.monotonic()
        table.running(number, attack)
        outcome = play(attack, ctx)
        # Paths inside the throwaway workspace read shorter from its root (printed with --keep).
        outcome.named = outcome.named.replace(f"{workspace.root}{os.sep}", "")
        outcome.details = outcome.details.replace(f"{workspace.root}{os.sep}", "")
        outcomes.append(outcome)
        table.row(number, outcome, time.monotonic() - start)
    _prove(workspace, outcomes)
    return DrillResult(
        world,
        None if script is not None else steps,
        device,
        clean,
        false_alarms,
        outcomes,
        time.monotonic() - began,
        script,
        _clean_alerts(clean, stopping=False),
    )


def write_json(result: DrillResult, path: Path) -> None:
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")


# As the scorecard prints them: a miss stands out.
_VERDICTS = {"caught": "caught", "missed": "MISSED", "not applicable": "not applicable"}


def _steps(steps: int | None) -> str:
    if steps is None:
        return "-"
    return f"{-steps} before" if steps < 0 else str(steps)


def scorecard(result: DrillResult) -> str:
    """The scorecard as a text table."""
    rows = [("attack", "group", "verdict", "detected by", "steps", "named")]
    rows.extend(
        (
            o.attack.name,
            o.attack.group,
            _VERDICTS[o.verdict],
            o.detected_by or "-",
            _steps(o.steps_to_detection),
            (o.named or o.details)[: 70 if o.applicable else 160],
        )
        for o in result.outcomes
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    job = f"{result.steps} steps" if result.script is None else f"script {result.script.path.name}"
    lines.append("")
    lines.append(f"{result.tally()}; world size {result.world}, {job}, {result.seconds:.0f} s")
    return "\n".join(lines) + "\n"
