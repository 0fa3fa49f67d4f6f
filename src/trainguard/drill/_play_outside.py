"""Attacks judged on evidence that has left the job: the supervisor's alarms, and a running witness.

A guard switched off inside its rank cannot be trusted to say so. What counts is what already left the
process: the peers' verdict (`monitor.alert`, drawn from the reports the rank still sends) and the
supervisor's alarms (`run.guard_alarm`: a rank's guard that fell silent, was closed, dropped checks or
did not stop on its own finding). A ledger restored to an older copy of itself is consistent inside;
only a checkpoint kept elsewhere shows the rollback: here a witness that the drill runs beside it, with
its own key and state in the workspace, which cosigned a newer head before the copy was put back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import select
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trainguard.drill._attacks import ATTACK_STEP, Attack
from trainguard.drill._play import (
    Context,
    Outcome,
    SetupFailed,
    _ledger_copy,
    _patched,
    _seconds_between,
    _trainguard,
)
from trainguard.drill._runs import RunRecord

__all__ = ["OUTSIDE"]

# Supervisor alarms that stop the job; "failed" only records a check the guard itself reported.
_STOPPING_ALARMS = ("not-stopped", "checks-dropped", "closed", "silent")
# These name the last step the rank's guard was heard at; the switch-off came after it.
_LAST_HEARD = ("closed", "silent")
# The fewest replicas among which a majority names the one that disagrees.
_MAJORITY = 3
_WITNESS_START_S = 60.0
_WITNESS_STOP_S = 10.0


# A guard switched off from inside its rank.


def _switched_off(attack: Attack, ctx: Context) -> Outcome:
    """The peers' verdict first (as for any patch in the job), then the supervisor's alarms.

    The rank's own findings are dropped, so only its peers can name it: two replicas that disagree are
    a tie (the job stops, but neither is named), so this attack runs with a third replica at least."""
    outcome = _patched(attack, dataclasses.replace(ctx, world=max(_MAJORITY, ctx.world)))
    if outcome.caught or outcome.run is None:
        return outcome
    found = _supervisor_alarm(attack, outcome.run)
    if found is not None:
        return found
    outcome.details += f"; no supervisor alarm names rank {attack.expected_ranks[0]} either " + (
        "(the job exited 0)" if outcome.run.exit_code == 0 else f"(the job exited {outcome.run.exit_code})"
    )
    return outcome


def _supervisor_alarm(attack: Attack, run: RunRecord) -> Outcome | None:
    rank = attack.expected_ranks[0]
    for index, _, _, payload in run.of_type("run.guard_alarm"):
        kind = payload.get("kind")
        if payload.get("rank") != rank or kind not in _STOPPING_ALARMS:
            continue
        step = int(payload.get("step", 0)) + (1 if kind in _LAST_HEARD else 0)
        if step < ATTACK_STEP:
            continue
        return Outcome(
            attack,
            run.exit_code != 0,
            f"supervisor: guard {kind}",
            f"rank {rank}",
            step=step,
            steps_to_detection=step - ATTACK_STEP,
            seconds_to_detection=_seconds_between(run, ATTACK_STEP, step),
            evidence_index=index,
            details=str(payload.get("message", ""))[:300],
            run=run,
        )
    return None


# A ledger rolled back to an older copy of itself, after a witness cosigned a newer head.


def _rolled_back(attack: Attack, ctx: Context) -> Outcome:
    copy = _ledger_copy(ctx, attack.name)
    older = copy.with_name("older.db")
    _restore(copy, older)  # the insider's backup, kept while the log grows
    public = ctx.workspace.home / "keys" / "ledger.pub"
    store = ("--store", str(copy), "--public-key", str(public))
    with _witness(ctx, public) as (url, witness_key):
        witnessed = (*store, "--witness", url, "--witness-key", str(witness_key))
        backup = _cosigned(ctx, witnessed)
        _require(
            _trainguard(ctx, "ledger", "append", "--store", str(copy), *_AFTER_THE_BACKUP), "ledger append"
        )
        size = _cosigned(ctx, witnessed)
        _restore(older, copy)
        alone = _trainguard(ctx, "ledger", "verify", *store)
        checked = _trainguard(ctx, "ledger", "verify", *witnessed)
    named = _rollback_named(checked.stdout)
    caught = checked.returncode == 1 and named.startswith("rollback")
    return Outcome(
        attack,
        caught,
        "ledger verify against a running witness" if caught else "",
        named[:200],
        details=f"the witness cosigned the copy's head at size {size}, then the copy was restored to its "
        f"backup of size {backup}; verify alone exit {alone.returncode}, with the witness exit "
        f"{checked.returncode}",
    )


# An alert the insider wants gone: appended after the backup was taken, and cosigned.
_AFTER_THE_BACKUP = (
    "--type",
    "monitor.alert",
    "--payload",
    json.dumps({"check": "gradient_path", "message": "an alert the insider wants gone"}),
)


def _rollback_named(output: str) -> str:
    """What `verify --witness` said of the rollback ("rollback: the witness has cosigned size N ...")
    and the first index the store lacks, or "" when it said neither."""
    lines = [line.strip() for line in output.splitlines()]
    rollback = next((line[line.index("rollback") :] for line in lines if "rollback" in line), "")
    first_bad = next((line for line in lines if line.startswith("first bad index")), "")
    return "; ".join(part for part in (rollback, first_bad) if part)


def _restore(source: Path, target: Path) -> None:
    with (
        contextlib.closing(sqlite3.connect(source)) as old,
        contextlib.closing(sqlite3.connect(target)) as new,
    ):
        old.backup(new)


def _cosigned(ctx: Context, witnessed: tuple[str, ...]) -> int:
    """The size the witness cosigned: `ledger verify --witness` submits the head and stores the
    cosignature."""
    done = _require(_trainguard(ctx, "ledger", "verify", "--format", "json", *witnessed), "ledger verify")
    document: dict[str, Any] = json.loads(done.stdout)
    return int(document["size"])


def _require(done: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    if done.returncode != 0:
        raise SetupFailed(f"`trainguard {what}` exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return done


@contextlib.contextmanager
def _witness(ctx: Context, log_key: Path) -> Iterator[tuple[str, Path]]:
    """A witness serving on a free local port, with its key and state in the workspace; it is always
    stopped on the way out."""
    folder = ctx.workspace.root / "witness"
    folder.mkdir(exist_ok=True)
    key = folder / "witness.key"
    if not key.exists():
        _require(_trainguard(ctx, "keygen", str(key), "--name", "drill-witness", "--witness"), "keygen")
    command = [
        sys.executable, "-m", "trainguard", "witness", "serve", "--key", str(key), "--log", str(log_key),
        "--state", str(folder / "witness.db"), "--listen", "127.0.0.1:0",
    ]  # fmt: skip
    with (folder / "witness.log").open("a") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, env=ctx.workspace.environ()
        )
        try:
            port = _announced_port(process, lambda: (folder / "witness.log").read_text()[-300:])
            yield f"http://127.0.0.1:{port}", key.with_name(key.name + ".pub")
        finally:
            _stop(process)


def _announced_port(process: subprocess.Popen[str], log: Callable[[], str]) -> int:
    """The port the witness bound, from its first line ("port N"), or SetupFailed."""
    assert process.stdout is not None
    deadline = time.monotonic() + _WITNESS_START_S
    while time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith("port ") and line.split()[1].isdigit():
                return int(line.split()[1])
            break
    raise SetupFailed(f"the witness did not start: {log().strip()}")


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=_WITNESS_STOP_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


OUTSIDE: dict[str, Callable[[Attack, Context], Outcome]] = {
    "guard-switched-off": _switched_off,
    "ledger-rolled-back": _rolled_back,
}
