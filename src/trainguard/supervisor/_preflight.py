"""Checks before launch: the job's Python environment, and the signed inputs it will read.

Any finding refuses the launch (exit 1); nothing of the job runs before both have passed.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard.errors import UndecidableError, UsageError, VerificationFailed
from trainguard.provenance import PublicKey, verify_path
from trainguard.supervisor._say import say

if TYPE_CHECKING:
    from trainguard.envcheck._findings import EnvFinding

__all__ = ["Refused", "check_environment", "check_inputs"]


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
        and "'pytest11'" in finding.message
        and not any("pytest" in Path(arg).name for arg in command)
    )


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
    """Verify the environment of the job's interpreter (default: this one) against a signed baseline, or
    against its RECORDs; Refused listing the findings (those `_beside_the_job` are only shown)."""
    if skip:
        return EnvironmentResult({"checked": False, "digest": None}, None)
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
