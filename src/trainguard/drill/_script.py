"""The user's own training script as the drill's job: `trainguard drill --script train.py -- ARGS...`.

The script runs as the built-in job does (torchrun under `trainguard run`, with the workspace's home,
ledger and trust policy), from its run's folder in the workspace, so that what it writes to relative
paths lands there. It is never edited nor copied: code is planted from outside, as an insider would
plant it in a colleague's job, through an overlay folder put first on the job's PYTHONPATH whose
`sitecustomize.py` imports the attack's module in every rank at interpreter start-up.

The attacks that reach the built-in job's training-loop locals from its data module reach the same
objects in a script from a thread the planted module starts (`_attacks._IN_A_THREAD`). Those that need
what only the built-in job has (its resume flag) are "not applicable" for a script, with the reason.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from trainguard.drill._attacks import Attack
from trainguard.errors import UsageError

__all__ = [
    "ACTED_VARIABLE",
    "NEVER_ACTED",
    "NEVER_REACHED",
    "NO_SIGNED_CHECKPOINT",
    "NO_WATCH",
    "Script",
    "not_for_scripts",
    "plant_overlay",
    "planted_code_acted",
    "rank_process",
]

# The planted code touches the file this variable names the first time it acts (`_attacks._ACTED`).
ACTED_VARIABLE = "TRAINGUARD_DRILL_ACTED"
_ACTED_FILE = "planted-code-acted"
_PLANT_MODULE = "_trainguard_drill_plant"

# Every interpreter of the job reads it; only the ranks (torchrun sets both variables for them, not
# for itself nor for the supervisor) import the planted module.
_SITECUSTOMIZE = f'''"""Site customisation of this job (planted by `trainguard drill`)."""

import os

if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
    import {_PLANT_MODULE}  # noqa: F401
'''

NEVER_ACTED = "not applicable: the script never ran the patched function"
NEVER_REACHED = (
    "not applicable: the planted thread never acted (it found no guard, or the script's guard never "
    "reached the attack's step)"
)
NO_SIGNED_CHECKPOINT = "not applicable: the script saved no signed checkpoint through trainguard.save"
NO_WATCH = "the script never started trainguard.watch: the drill needs a guarded job"

_RESUMES = (
    "not applicable: the attack is a checkpoint the job resumes from, and the drill cannot know how "
    "the script resumes"
)
_NOT_FOR_SCRIPTS = {
    "checkpoint-payload": _RESUMES,
    "checkpoint-payload-signed": _RESUMES,
    "weight-altered": _RESUMES,
}


@dataclasses.dataclass(frozen=True)
class Script:
    """The user's training script (resolved) and its own arguments."""

    path: Path
    args: tuple[str, ...]

    @classmethod
    def from_arguments(cls, path: Path, args: Sequence[str]) -> Script:
        """The script, or UsageError naming it when it cannot be read."""
        arguments = list(args)
        if arguments[:1] == ["--"]:
            arguments = arguments[1:]
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise UsageError(
                f"--script {path}: cannot read it ({exc.strerror or exc})",
                hint="give the path of your training script, e.g. --script train.py -- --epochs 1",
            ) from None
        return cls(path.resolve(), tuple(arguments))

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.path), "args": list(self.args)}


def not_for_scripts(attack: Attack) -> str:
    """Why `attack` cannot be played against a script, or "" when it can."""
    return _NOT_FOR_SCRIPTS.get(attack.name, "")


def plant_overlay(folder: Path, code: str) -> dict[str, str]:
    """Plant `code` in the ranks of a run in `folder` from outside the script; the environment to add."""
    overlay = folder / "overlay"
    overlay.mkdir()
    (overlay / f"{_PLANT_MODULE}.py").write_text(code)
    (overlay / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return {"PYTHONPATH": str(overlay), ACTED_VARIABLE: str(folder / _ACTED_FILE)}


def planted_code_acted(folder: Path) -> bool:
    return (folder / _ACTED_FILE).exists()


def rank_process(root: int, rank: int) -> int | None:
    """The process of `rank` among the descendants of `root` (Linux /proc): the first, nearest the root,
    whose environment says RANK=rank (its own children, data loader workers, inherit it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: the command name may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    wanted = f"RANK={rank}".encode()
    queue = sorted(children.get(root, []))
    while queue:
        pid = queue.pop(0)
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environ and pid != os.getpid():
            return pid
        queue.extend(sorted(children.get(pid, [])))
    return None
