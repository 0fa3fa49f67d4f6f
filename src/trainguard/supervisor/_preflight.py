"""Checks before launch: the job's Python environment, and the signed inputs it will read.

Any finding refuses the launch (exit 1); nothing of the job runs before both have passed.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard.errors import UndecidableError, UsageError, VerificationFailed
from trainguard.provenance import PublicKey, verify_path
from trainguard.supervisor._say import say

if TYPE_CHECKING:
    from trainguard.envcheck._findings import EnvFinding

__all__ = ["Refused", "check_environment", "check_inputs", "job_interpreter"]


class Refused(VerificationFailed):
    """A pre-flight check failed: the job is not launched."""


@dataclasses.dataclass(frozen=True)
class EnvironmentResult:
    summary: dict[str, Any]  # the attestation's "environment"
    digest: str | None


# Without a baseline, RECORDs show tampering but cannot tell a wanted install from an unwanted one. Two
# kinds of finding describe how the environment was installed rather than a change to it, and do not
# reach the job: they are shown and attested, not refused. A baseline accepts them for good, or not.
_NOTED_WHY = (
    "describe how the environment was installed, not a change to it, and do not reach this job: "
    "launching anyway (`trainguard env snapshot` takes a baseline that accepts them; with --baseline "
    "every finding refuses the launch)"
)


def _beside_the_job(finding: EnvFinding, command: Sequence[str]) -> bool:
    """An editable install (its code is not hashed, which the report says), or a pytest plug-in when the
    job is not a pytest run. A torch device-backend autoload always refuses: `import torch` runs it."""
    if finding.kind == "editable-install":
        return True
    return (
        finding.kind == "autoload-entry-point"
        and finding.group == "pytest11"
        and not any("pytest" in Path(arg).name for arg in command)
    )


_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)?)?")
_SHEBANG_CAP = 4096
_TRAMPOLINE = "'''exec' "  # pip's launcher for interpreters whose path is too long for a #! line


def job_interpreter(command: Sequence[str]) -> str | None:
    """The Python interpreter the job's first program runs on: the program itself when it is named like
    one, else the interpreter its `#!` line names (a console script such as torchrun, `#!/usr/bin/env
    python3`, pip's `/bin/sh` trampoline); None for anything else (a shell script, a binary, a program
    not found). The program is read, never run."""
    found = shutil.which(command[0]) if command else None
    if found is None:
        return None
    program = Path(found).absolute()  # not resolved: a venv's bin/python is a link out of the venv
    if _PYTHON_NAME.fullmatch(program.name):
        return str(program)
    words = _shebang(program)
    if words and Path(words[0]).name == "env":
        words = [word for word in words[1:] if not word.startswith("-") and "=" not in word]
        if words:
            words[0] = shutil.which(words[0]) or words[0]
    if words and _PYTHON_NAME.fullmatch(Path(words[0]).name) and Path(words[0]).is_file():
        return words[0]
    return None


def _shebang(program: Path) -> list[str]:
    """The words of a script's `#!` line (of the exec line, for pip's trampoline)."""
    try:
        with program.open("rb") as handle:
            lines = handle.read(_SHEBANG_CAP).decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    if not lines or not lines[0].startswith("#!"):
        return []
    if lines[0].split()[:1] == ["#!/bin/sh"] and len(lines) > 1 and lines[1].startswith(_TRAMPOLINE):
        return lines[1][len(_TRAMPOLINE) :].split()[:1]
    return lines[0][2:].split()


def _job_python(command: Sequence[str]) -> str | None:
    """The job's interpreter when it lives in another environment than this one, so that the check is of
    the environment the job runs in; None when it is this one, or not Python, or cannot be told (then
    this environment is checked, as before; a note says so in the last case)."""
    from trainguard.envcheck._layout import resolve_layout

    python = job_interpreter(command)
    if python is None:
        return None
    try:
        prefix = resolve_layout(python=python).prefix
    except UsageError as exc:
        say(
            f"note: cannot tell the environment of the job's interpreter {python} ({exc.message}); "
            f"checking this one, {sys.prefix} (--python chooses)"
        )
        return None
    return python if Path(prefix).resolve() != Path(sys.prefix).resolve() else None


def _progress() -> Callable[[str], None] | None:
    # On a terminal only: a job's log gets the verdict, not the hashing rate.
    return say if sys.stderr.isatty() else None


def check_environment(
    *,
    skip: bool,
    python: str | None,
    baseline_path: Path | None,
    trusted: Sequence[PublicKey],
    command: Sequence[str] = (),
) -> EnvironmentResult:
    """Verify the environment of the job's interpreter (default: the one `command` runs on when that is in
    another environment, else this one) against a signed baseline, or against its RECORDs; Refused
    listing the findings (those `_beside_the_job` are only shown)."""
    if skip:
        return EnvironmentResult({"checked": False, "digest": None}, None)
    if python is None:
        python = _job_python(command)
    from trainguard.envcheck._api import verify_environment
    from trainguard.envcheck._baseline import read_baseline

    baseline = signer = None
    if baseline_path is not None:
        try:
            baseline, signer = read_baseline(baseline_path, trusted)
        except VerificationFailed as exc:
            raise Refused(
                f"baseline {baseline_path} does not check out: {exc.message}", hint=exc.hint
            ) from None
    prefix = None if python is not None else sys.prefix
    report = verify_environment(baseline=baseline, python=python, prefix=prefix, progress=_progress())
    noted = [f for f in report.findings if baseline is None and _beside_the_job(f, command)]
    if noted:
        listed = "".join(f"\n  {f.kind} {f.path}: {f.message}" for f in noted)
        say(f"note: {len(noted)} finding(s) {_NOTED_WHY}:{listed}")
    problems = [
        f"{f.kind} {f.path}: {f.message}" for f in report.findings + report.undecided if f not in noted
    ]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise Refused(
            f"the environment {report.prefix} fails its check ({len(problems)} problem(s)); not launching:"
            f"\n  {shown}{more}",
            hint="see `trainguard env verify` for details and advice; --no-env-check skips the check",
        )
    summary = {
        "checked": True,
        "digest": report.digest,
        "prefix": report.prefix,
        "reference": report.reference,
        "baseline_digest": report.baseline_digest,
        "signer": signer.key_id if signer is not None else None,
        "noted": [{"kind": f.kind, "path": f.path, "message": f.message} for f in noted],
    }
    return EnvironmentResult(summary, report.digest)


def check_inputs(paths: Sequence[Path], trusted: Sequence[PublicKey]) -> list[dict[str, Any]]:
    """Verify each input's signed manifest (re-hashing every file); Refused naming the first that fails."""
    if paths and not trusted:
        raise UsageError(
            "--input needs trusted keys to verify its signature",
            hint="pass --trust KEY (or --trust-policy FILE) with the key that signed the inputs",
        )
    results = []
    for path in paths:
        try:
            result = verify_path(path, trusted)
        except UndecidableError as exc:
            raise Refused(f"input {path} could not be verified: {exc.message}", hint=exc.hint) from None
        except VerificationFailed as exc:
            raise Refused(f"input {path} does not verify: {exc.message}", hint=exc.hint) from None
        results.append(
            {
                "path": str(Path(path).resolve()),
                "root": result.root,
                "signer": result.signer.key_id,
                "files": len(result.manifest.files),
                "bytes": result.manifest.total_bytes,
            }
        )
    return results
