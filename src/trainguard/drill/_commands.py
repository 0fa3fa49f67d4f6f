"""`trainguard drill`: run it, print the scorecard, write the JSON and the HTML report."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from trainguard.drill._script import Script

__all__ = ["cmd_drill"]

DEFAULT_STEPS = 20


def cmd_drill(args: argparse.Namespace) -> int:
    from trainguard.drill._attacks import MIN_STEPS, build, select
    from trainguard.drill._drill import run_drill, scorecard, write_json
    from trainguard.drill._report import write_html
    from trainguard.drill._workspace import Workspace

    script = _script(args)
    if script is not None and args.steps is not None:
        raise UsageError(
            "--steps sets the built-in job's steps: with --script, give your script's own arguments after "
            "--, e.g. --script train.py -- --steps 12"
        )
    steps: int = args.steps if args.steps is not None else DEFAULT_STEPS
    if args.world_size < 2:
        raise UsageError("--world-size must be at least 2: the attacks on one rank need peers to compare")
    if steps < MIN_STEPS:
        raise UsageError(
            f"--steps must be at least {MIN_STEPS}: the attacks act at step 6 and the checkpoint attacks "
            "need two saved checkpoints (one every 5 steps)"
        )
    try:
        attacks = select(build(args.world_size), args.attacks)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="trainguard-drill-"))
    workspace = Workspace(root)
    try:
        result = run_drill(
            workspace, attacks, world=args.world_size, steps=steps, device=args.device, script=script
        )
    finally:
        if args.keep:
            print(f"drill: the workspace is kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    sys.stdout.write(scorecard(result))
    write_json(result, out / "drill.json")
    print(f"drill: scorecard written to {out / 'drill.json'}", file=sys.stderr)
    write_html(result, out / "report.html")
    print(f"drill: report written to {out / 'report.html'} (one file, opens offline)", file=sys.stderr)
    for notice in result.clean_notices:
        print(
            f"drill: alert of an alert-only check in the clean run (not a false alarm): {notice}",
            file=sys.stderr,
        )
    if not result.ok:
        missed = ", ".join(result.to_json()["missed"]) or "none"
        print(f"drill: FAILED: missed {missed}; false alarms {len(result.false_alarms)}", file=sys.stderr)
        for alarm in result.false_alarms:
            print(f"drill: false alarm: {alarm}", file=sys.stderr)
        return int(ExitCode.FINDINGS)
    return int(ExitCode.CLEAN)


def _script(args: argparse.Namespace) -> Script | None:
    """The user's script and its arguments; arguments without --script are a usage error."""
    from trainguard.drill._script import Script

    if args.script is None:
        if [a for a in args.script_args if a != "--"]:
            raise UsageError(
                f"unexpected arguments {' '.join(args.script_args)!r}: only a --script takes arguments"
            )
        return None
    return Script.from_arguments(args.script, args.script_args)
