"""What `trainguard env snapshot` and `trainguard env verify` do.

Both are recorded in the ledger (``env.snapshot``, ``env.verify``) with the environment digest, so the
ranks of one job, and one job and the next, can be compared. Exit codes: 0 verified, 1 findings, 2 usage
error, 3 could not decide (unreadable files, bytecode that could not be compared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from trainguard._cli_common import load_signing_key, trusted_keys
from trainguard.envcheck._baseline import read_baseline, write_baseline
from trainguard.envcheck._findings import EnvFinding
from trainguard.envcheck._verify import EnvReport, Progress
from trainguard.errors import ExitCode, UsageError, VerificationFailed
from trainguard.relay._record import record

__all__ = ["EVENT_SNAPSHOT", "EVENT_VERIFY", "cmd_env_snapshot", "cmd_env_verify"]

EVENT_SNAPSHOT = "env.snapshot"
EVENT_VERIFY = "env.verify"
_MAX_EVENT_FINDINGS = 200


def _progress(args: argparse.Namespace) -> Progress | None:
    if not sys.stderr.isatty() and not args.verbose:
        return None

    def show(message: str) -> None:
        print(f"trainguard: {message}", file=sys.stderr)

    return show


def _exit_code(report: EnvReport) -> int:
    if report.findings:
        return int(ExitCode.FINDINGS)
    if report.undecided:
        return int(ExitCode.UNDECIDED)
    return int(ExitCode.CLEAN)


def _event(report: EnvReport, **extra: Any) -> dict[str, Any]:
    findings = report.findings + report.undecided
    return {
        "prefix": report.prefix,
        "mode": report.mode,
        "reference": report.reference,
        "ok": report.ok,
        "digest": report.digest,
        "baseline_digest": report.baseline_digest,
        "files": report.files,
        "findings": len(report.findings),
        "undecided": len(report.undecided),
        "problems": [f"{f.kind} {f.path}" for f in findings[:_MAX_EVENT_FINDINGS]],
        **extra,
    }


def _print_finding(finding: EnvFinding) -> None:
    owner = f" [{finding.distribution}]" if finding.distribution else ""
    print(f"{finding.severity.value.upper():8} {finding.kind}: {finding.path}{owner}")
    print(f"         {finding.message}")
    print(f"         fix: {finding.advice}")


def _print_report(report: EnvReport, title: str, *, limitations: bool = True) -> None:
    print(title)
    for finding in report.findings:
        _print_finding(finding)
    for finding in report.undecided:
        _print_finding(finding)
    if report.accepted:
        print(f"accepted (in the baseline): {len(report.accepted)} injection point(s)")
        for finding in report.accepted:
            print(f"  {finding.kind}: {finding.path}")
    for limitation in report.limitations if limitations else ():
        print(f"cannot see: {limitation}")
    verdict = (
        "verified" if report.ok else f"{len(report.findings)} finding(s), {len(report.undecided)} undecided"
    )
    print(
        f"{verdict}: {report.files} files ({report.cached} unchanged since the last clean check, "
        f"{report.hashed} hashed, {report.bytecode_checked} bytecode files compiled) "
        f"in {report.seconds:.2f} s"
    )
    print(f"environment digest {report.digest}")


def cmd_env_snapshot(args: argparse.Namespace) -> int:
    from trainguard.envcheck._api import snapshot_environment

    key = load_signing_key(args)
    out = Path(args.out)
    baseline, report = snapshot_environment(
        python=args.python,
        prefix=args.prefix,
        check_bytecode=not args.no_bytecode,
        lock=args.lock,
        wheels=args.wheels,
        progress=_progress(args),
        full=bool(args.full),
    )
    # Injection points are recorded as accepted and variables belong to this shell: neither blocks.
    accepted = set(baseline.injections)
    blocking = [f for f in report.findings if (f.kind, f.path) not in accepted and f.kind != "env-var"]
    refused = bool(blocking or report.undecided) and not args.force
    if not args.no_ledger:  # first: with --require-ledger, no baseline is written that the ledger lacks
        record(
            EVENT_SNAPSHOT,
            _event(
                report,
                baseline=os.path.realpath(out) if not refused else None,
                key_id=key.key_id,
                written=not refused,
            ),
            require=args.require_ledger,
        )
    if not refused:
        write_baseline(out, baseline, [key])
    if args.format == "json":
        doc = {"schema_version": "1", "written": not refused, "baseline": str(out), **report.to_json()}
        print(json.dumps(doc, indent=2))
    else:
        _print_report(
            report,
            f"trainguard env snapshot: {report.prefix} (checked against its RECORDs)",
            limitations=False,
        )
        if refused:
            why = "fails its RECORD check" if blocking else "has files that could not be checked"
            print(f"not written: the environment already {why}; fix it, or pass --force")
        else:
            print(f"baseline written to {out}, signed by {key.key_id}")
            print(
                "the standard library and the interpreter, which no RECORD covers, are taken as they are now"
            )
            if report.findings:
                print("the injection points above are accepted by this baseline; later ones are findings")
    if refused:
        return int(ExitCode.FINDINGS if blocking else ExitCode.UNDECIDED)
    return int(ExitCode.CLEAN)


def cmd_env_verify(args: argparse.Namespace) -> int:
    from trainguard.envcheck._api import verify_environment

    baseline = signer = None
    if args.baseline is not None:
        trusted = trusted_keys(args, required=True)
        try:
            baseline, signer = read_baseline(Path(args.baseline), trusted)
        except VerificationFailed as exc:
            if not args.no_ledger:  # a forged or foreign baseline is evidence too
                payload = {
                    "prefix": args.prefix or args.python,
                    "baseline": os.path.realpath(args.baseline),
                    "ok": False,
                    "problems": [exc.message],
                }
                record(EVENT_VERIFY, payload, require=args.require_ledger)
            raise
    elif args.trust:  # a policy may come from the environment; it matters only with a baseline
        raise UsageError("--trust needs --baseline", hint="pass the baseline that these keys signed")
    report = verify_environment(
        baseline=baseline,
        python=args.python,
        prefix=args.prefix,
        full=args.full,
        check_bytecode=not args.no_bytecode,
        progress=_progress(args),
    )
    if not args.no_ledger:
        record(
            EVENT_VERIFY,
            _event(
                report,
                baseline=os.path.realpath(args.baseline) if args.baseline is not None else None,
                key_id=signer.key_id if signer is not None else None,
            ),
            require=args.require_ledger,
        )
    if args.format == "json":
        doc = {
            "schema_version": "1",
            "baseline": str(args.baseline) if args.baseline is not None else None,
            "signer": signer.key_id if signer is not None else None,
            **report.to_json(),
        }
        print(json.dumps(doc, indent=2))
    else:
        against = (
            f"baseline {args.baseline} (signed by {signer.label})"
            if signer is not None
            else "its distributions' RECORDs (no baseline)"
        )
        _print_report(report, f"trainguard env verify ({report.mode}): {report.prefix} against {against}")
    return _exit_code(report)
