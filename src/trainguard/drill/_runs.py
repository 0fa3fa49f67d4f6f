"""One run of the drill's job under `trainguard run`, and the ledger events it left.

The job runs as torchrun would start it, under the supervisor, with the workspace's home, ledger and
trust policy. A run's events are the ledger entries appended while it ran.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trainguard.drill._attacks import SAVE_EVERY
from trainguard.drill._script import Script, plant_overlay
from trainguard.drill._workspace import Workspace

__all__ = ["RunRecord", "job_command", "ledger_events", "ledger_size", "train"]

RUN_TIMEOUT_S = 600


@dataclasses.dataclass
class RunRecord:
    """What a run left: the supervisor's exit status and output, each rank's report and step log,
    the ledger entries it appended (index, type, rank, payload) and how long it took."""

    name: str
    folder: Path
    exit_code: int
    output: str
    ranks: list[dict[str, Any]]
    steps: dict[int, list[dict[str, float]]]
    events: list[tuple[int, str, int | None, dict[str, Any]]]
    seconds: float

    def of_type(self, event_type: str) -> list[tuple[int, str, int | None, dict[str, Any]]]:
        return [event for event in self.events if event[1] == event_type]


def ledger_size(workspace: Workspace) -> int:
    from trainguard.errors import StoreError
    from trainguard.ledger import Ledger

    try:
        with Ledger.open(workspace.home / "ledger.db", create=False) as ledger:
            return ledger.size
    except StoreError:
        return 0


def ledger_events(workspace: Workspace, start: int) -> list[tuple[int, str, int | None, dict[str, Any]]]:
    from trainguard.ledger import Ledger

    if not (workspace.home / "ledger.db").exists():
        return []
    with Ledger.open(workspace.home / "ledger.db", create=False) as ledger:
        return [(i, e.type, e.rank, dict(e.payload)) for i, e in ledger.entries(start, ledger.size)]


def job_command(
    python: Path,
    folder: Path,
    world: int,
    steps: int,
    device: str,
    extra: Sequence[str],
    script: Script | None,
) -> list[str]:
    """The job's command line, as torchrun starts it: the built-in job in `folder`, or the script."""
    launcher = [
        str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        "--max-restarts=0",
    ]  # fmt: skip
    if script is not None:
        return [*launcher, str(script.path), *script.args]
    return [
        *launcher, str(folder / "job" / "train.py"), "--out", str(folder / "out"),
        "--steps", str(steps), "--ckpt", str(folder / "ckpt"), "--save-every", str(SAVE_EVERY),
        "--device", device,
        *extra,
    ]  # fmt: skip


def train(
    workspace: Workspace,
    name: str,
    *,
    world: int,
    steps: int,
    device: str,
    prepare: Callable[[Path], list[str]] | None = None,
    during: Callable[[Path, subprocess.Popen[str]], None] | None = None,
    python: Path | None = None,
    env_baseline: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    plant: str = "",
    script: Script | None = None,
) -> RunRecord:
    """Run the job once: `prepare(folder)` may edit the copy of the job and returns extra job arguments;
    `during(folder, supervisor)` acts while it runs (it returns once it has acted). The job runs on
    `python` (default: this interpreter; the supervisor always does), with `extra_env` added to its
    environment; with `env_baseline`, `trainguard run` checks the job's environment against that signed
    baseline before launch, else it skips the check. `plant` is code an insider slips into the job:
    appended to the built-in job's data module, or, for the user's `script` (run from the run's folder
    instead of the built-in job), imported in its ranks from an overlay on their PYTHONPATH."""
    environment = dict(extra_env or {})
    if script is None:
        folder = workspace.job_copy(name)
        if plant:
            with (folder / "job" / "data.py").open("a") as handle:
                handle.write(plant)
    else:
        folder = workspace.run_folder(name)
        if plant:
            environment.update(plant_overlay(folder, plant))
    extra = prepare(folder) if prepare is not None else []
    job = job_command(python or Path(sys.executable), folder, world, steps, device, extra, script)
    check = ["--baseline", str(env_baseline)] if env_baseline is not None else ["--no-env-check"]
    command = [sys.executable, "-m", "trainguard", "run", *check, "--seed", "1", "--", *job]
    first = ledger_size(workspace)
    began = time.monotonic()
    with subprocess.Popen(
        command,
        cwd=folder,
        env=workspace.environ(environment),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as supervisor:
        if during is not None:
            during(folder, supervisor)
        try:
            output, _ = supervisor.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            output, _ = supervisor.communicate()
            output += f"\n(drill: the run took more than {RUN_TIMEOUT_S} s and was killed)"
    seconds = time.monotonic() - began
    ranks = [json.loads(p.read_text()) for p in sorted((folder / "out").glob("rank*.json"))]
    steps_by_rank: dict[int, list[dict[str, float]]] = {}
    for log in sorted((folder / "out").glob("rank*.steps.jsonl")):
        rank = int(log.name[len("rank") :].split(".")[0])
        steps_by_rank[rank] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    events = ledger_events(workspace, first)
    return RunRecord(name, folder, supervisor.returncode, output, ranks, steps_by_rank, events, seconds)
