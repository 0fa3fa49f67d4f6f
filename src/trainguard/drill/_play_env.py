"""The incident's group (c), the shared PyTorch install edited, played against a copy of the job's
environment (`_environment`), and judged by what `trainguard run`'s environment check said.

Each attack tampers with the copy as an insider with write access to the install would, then the job runs
on the copy's interpreter under `trainguard run --baseline` (the baseline the team took at setup). The
attack is caught only if the launch was refused (exit 1), nothing of the job ran (no payload marker,
no step), and the `run.refused` entry in the ledger lists the finding that names what was planted: the
edited file, the `.pth` file, the entry point. The copy is restored after each attack.

Payloads are harmless: they print a marker, and on the last rank reverse AdamW's update from a step on,
as group (b)'s patches do.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

from trainguard.drill._attacks import ATTACK_STEP, MARKER, Attack
from trainguard.drill._environment import CopyFailed, EnvironmentCopy, prepare_environment
from trainguard.drill._play import Context, Outcome, SetupFailed
from trainguard.drill._runs import RunRecord, train

__all__ = ["PLANT", "Expected", "play_environment"]

# The flip every payload installs: AdamW's update reversed on one rank from a step on (AdamW runs
# torch/optim/adam.py's functions); the marker says the planted code ran at all, in any process.
_FLIP = '''

def _drill_flip(adam):
    """Planted: prints a marker; on rank {rank} of a job of {world}, reverses AdamW's update from
    step {step}."""
    import os
    import sys

    print({marker!r}, file=sys.stderr, flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) < {world} or os.environ.get("RANK") != "{rank}":
        return

    def reversed_from_step(original):
        calls = [0]

        def patched(params, *args, **kwargs):
            import torch

            calls[0] += 1
            before = [p.detach().clone() for p in params]
            original(params, *args, **kwargs)
            if calls[0] >= {step}:
                with torch.no_grad():
                    for p, old in zip(params, before):
                        p.copy_(2 * old - p)

        return patched

    adam._single_tensor_adam = reversed_from_step(adam._single_tensor_adam)
    adam._multi_tensor_adam = reversed_from_step(adam._multi_tensor_adam)
'''

# Appended to torch/optim/adam.py itself.
_EDIT = """
{flip}

_drill_flip(__import__("sys").modules[__name__])
"""

# A module a .pth line imports at every interpreter start: it waits for torch.optim.adam to be loaded.
_PTH_MODULE = '''"""Optimizer speed-ups."""
import importlib.machinery
import sys
{flip}

class _AfterAdam:
    def find_spec(self, name, path=None, target=None):
        if name != "torch.optim.adam":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _drill_flip(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterAdam())
'''
PTH_NAME = "zz_optim_speedups.pth"
PTH_MODULE = "_optim_speedups"

# A device-backend plug-in: `import torch` imports and calls every `torch.backends` entry point.
_BACKEND_MODULE = '''"""CPU fast paths for torch."""
{flip}

def autoload():
    import importlib

    _drill_flip(importlib.import_module("torch.optim.adam"))  # torch.optim deletes its `adam` name
'''
ROGUE_DIST = "torch_cpu_fastpath"
ROGUE_VERSION = "0.3.1"
ROGUE_ENTRY_POINT = "cpu_fastpath"


@dataclasses.dataclass(frozen=True)
class Expected:
    """The finding that must be listed in the refusal: its kind, the file of the copy it names, words of
    its message."""

    kind: str
    path: Path
    words: tuple[str, ...] = ()


def _flip(world: int) -> str:
    """The flip for the last rank of a job of `world` processes."""
    return _FLIP.format(rank=world - 1, world=world, step=ATTACK_STEP, marker=MARKER)


def _record_row(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def optimizer_edited(copy: EnvironmentCopy, world: int) -> Expected:
    """torch/optim/adam.py edited, and its row in torch's RECORD rewritten to the new hash and size."""
    source = copy.site / "torch" / "optim" / "adam.py"
    original = source.read_bytes()
    edited = original + _EDIT.format(flip=_flip(world)).encode()
    [record] = copy.site.glob("torch-*.dist-info/RECORD")
    rows = record.read_text()
    old_row = _record_row("torch/optim/adam.py", original)
    if old_row not in rows.splitlines():
        raise SetupFailed(f"{record} has no row {old_row!r} to rewrite")
    copy.replace(source, edited)
    copy.replace(record, rows.replace(old_row, _record_row("torch/optim/adam.py", edited)).encode())
    return Expected("modified", source, ("RECORD row was rewritten to match",))


def pth_hook(copy: EnvironmentCopy, world: int) -> Expected:
    """A .pth file whose import line loads a module that patches AdamW once torch loads it."""
    copy.add(copy.site / f"{PTH_MODULE}.py", _PTH_MODULE.format(flip=_flip(world)).encode())
    copy.add(copy.site / PTH_NAME, f"import {PTH_MODULE}\n".encode())
    return Expected("pth-import", copy.site / PTH_NAME, (f"import {PTH_MODULE}",))


def rogue_entry_point(copy: EnvironmentCopy, world: int) -> Expected:
    """A distribution installed as pip would (a valid RECORD) whose torch.backends entry point patches
    AdamW when `import torch` autoloads it."""
    meta = f"{ROGUE_DIST}-{ROGUE_VERSION}.dist-info"
    files = {
        f"{ROGUE_DIST}.py": _BACKEND_MODULE.format(flip=_flip(world)),
        f"{meta}/METADATA": f"Metadata-Version: 2.1\nName: {ROGUE_DIST.replace('_', '-')}\n"
        f"Version: {ROGUE_VERSION}\nSummary: CPU fast paths for torch\n",
        f"{meta}/WHEEL": "Wheel-Version: 1.0\nGenerator: bdist_wheel\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{meta}/INSTALLER": "pip\n",
        f"{meta}/entry_points.txt": f"[torch.backends]\n{ROGUE_ENTRY_POINT} = {ROGUE_DIST}:autoload\n",
    }
    rows = [_record_row(path, text.encode()) for path, text in files.items()]
    files[f"{meta}/RECORD"] = "\n".join([*rows, f"{meta}/RECORD,,"]) + "\n"
    for path, text in files.items():
        copy.add(copy.site / path, text.encode())
    return Expected(
        "autoload-entry-point",
        copy.site / meta / "entry_points.txt",
        (f"'{ROGUE_ENTRY_POINT}'", "'torch.backends'"),
    )


PLANT: dict[str, Callable[[EnvironmentCopy, int], Expected]] = {
    "torch-optimizer-edited": optimizer_edited,
    "pth-hook": pth_hook,
    "rogue-entry-point": rogue_entry_point,
}


def play_environment(attack: Attack, ctx: Context) -> Outcome:
    """Tamper with the copy of the job's environment, run the job on it under `trainguard run` with the
    environment check against the team's baseline, judge the refusal, and restore the copy."""
    try:
        copy = prepare_environment(ctx.workspace)
    except (CopyFailed, OSError) as exc:
        raise SetupFailed(f"no copy of the job's environment: {exc}") from exc
    try:
        expected = PLANT[attack.name](copy, ctx.world)
        run = train(
            ctx.workspace,
            attack.name,
            world=ctx.world,
            steps=ctx.steps,
            device=ctx.device,
            python=copy.python,
            env_baseline=copy.baseline,
            script=ctx.script,
            # The job writes no bytecode into the copy: it stays as the baseline saw it but for the attack.
            extra_env={"PYTHONDONTWRITEBYTECODE": "1"},
        )
    except CopyFailed as exc:
        raise SetupFailed(str(exc)) from exc
    finally:
        copy.restore()
    return _judge(attack, run, expected, copy)


def _judge(attack: Attack, run: RunRecord, expected: Expected, copy: EnvironmentCopy) -> Outcome:
    refusals = run.of_type("run.refused")
    reason = str(refusals[0][3].get("reason", "")) if refusals else ""
    named = next((line.strip() for line in reason.splitlines() if _names(line, expected)), "")
    ran = MARKER in run.output
    stepped = any(run.steps.values())
    caught = run.exit_code == 1 and bool(named) and not ran and not stepped
    seen = (
        f"launch refused, {len(reason.splitlines()) - 1} problem(s) listed"
        if refusals
        else f"the job was launched and exited {run.exit_code}"
    )
    details = ["THE PAYLOAD RAN"] if ran else []
    details.append(seen)
    if refusals and not named:
        details.append(f"none is {expected.kind} {expected.path}: {reason[:300]}")
    details.append(copy.describe())
    return Outcome(
        attack,
        caught,
        "preflight: environment check against the baseline" if named else "",
        _shorten(named, copy) if named else "",
        evidence_index=refusals[0][0] if refusals and caught else None,
        details="; ".join(details),
        run=run,
    )


def _names(line: str, expected: Expected) -> bool:
    """Whether a problem line of the refusal (`KIND PATH: MESSAGE`) is the expected finding: of that
    kind, naming that file of the copy (so the environment checked was the job's), with those words."""
    head, _, message = line.strip().partition(": ")
    kind, _, path = head.partition(" ")
    return (
        kind == expected.kind
        and path == str(expected.path)
        and all(word in message for word in expected.words)
    )


def _shorten(line: str, copy: EnvironmentCopy) -> str:
    """A problem line with the copy's site-packages left out of its path."""
    return line.replace(f"{copy.site}/", "")[:200]
