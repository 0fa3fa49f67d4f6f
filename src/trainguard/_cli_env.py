"""Arguments of `trainguard env snapshot` and `trainguard env verify`.

Only argparse here: the handlers import the envcheck room when they run, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainguard._argtypes import handler
from trainguard._cli_provenance import trust_arguments

_EPILOG = (
    "exit codes: 0 verified, 1 findings (modified, missing or unexpected files, injection points, risky "
    "variables) or a baseline that does not check out, 2 usage error, 3 could not decide (unreadable files)"
)


def _target(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--python", metavar="PATH", help="the target's interpreter (never run: its environment is read)"
    )
    where.add_argument(
        "--prefix", metavar="DIR", help="the target environment's directory (a venv or a prefix)"
    )
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="do not compare cached bytecode (__pycache__) with its sources",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    parser.add_argument("--no-ledger", action="store_true", help="do not record the check in the ledger")
    parser.add_argument(
        "--require-ledger", action="store_true", help="fail when the check cannot be recorded in the ledger"
    )


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    env = commands.add_parser(
        "env",
        parents=[common],
        help="prove the Python environment is the one that was installed",
        description="Check an installed Python environment (the venv, its standard library and "
        "interpreter) from the outside, without importing or running any of it.",
    )
    actions = env.add_subparsers(dest="action", required=True, metavar="ACTION")
    snapshot = actions.add_parser(
        "snapshot",
        parents=[common],
        help="write a signed baseline of an environment",
        description="Check the environment against its distributions' RECORDs, then write a signed "
        "baseline of every file's digest, its distributions, entry points and injection points. "
        "Refuses an environment that already fails the check, unless --force.",
        epilog=_EPILOG,
    )
    _target(snapshot)
    snapshot.add_argument(
        "--out", type=Path, metavar="FILE", required=True, help="where to write the baseline"
    )
    snapshot.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        default=os.environ.get("TRAINGUARD_SIGNING_KEY") or None,
        help="private key (PEM; default $TRAINGUARD_HOME/keys/signing.pem; env: TRAINGUARD_SIGNING_KEY)",
    )
    snapshot.add_argument(
        "--lock",
        metavar="FILE",
        help="hash-pinned requirements (pip --require-hashes format): anchor the baseline in the wheels' "
        "own RECORDs, not the installed ones (with --wheels)",
    )
    snapshot.add_argument("--wheels", metavar="DIR", help="the wheels the lock file pins (with --lock)")
    snapshot.add_argument(
        "--force", action="store_true", help="write the baseline even though the RECORD check found problems"
    )
    snapshot.add_argument(
        "--full",
        action="store_true",
        help="re-hash every file; by default files unchanged since the last clean check are taken from "
        "its signed cache",
    )
    snapshot.set_defaults(run=handler("trainguard.envcheck._commands", "cmd_env_snapshot"))

    verify = actions.add_parser(
        "verify",
        parents=[common],
        help="verify an environment against its baseline (or its RECORDs)",
        description="Report modified, missing and unexpected files, replaced bytecode, new distributions "
        "and entry points, injection points (.pth, sitecustomize, user site, shadowed modules) and risky "
        "variables. Without --baseline, each distribution's RECORD is the reference, and the report says "
        "what that cannot see. Files unchanged since the last clean check (same inode, size and times) "
        "are taken from a signed cache; --full re-hashes everything.",
        epilog=_EPILOG,
    )
    _target(verify)
    verify.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        default=os.environ.get("TRAINGUARD_ENV_BASELINE") or None,
        help="signed baseline from `env snapshot` (env: TRAINGUARD_ENV_BASELINE)",
    )
    trust_arguments(verify, " of baselines")
    verify.add_argument("--full", action="store_true", help="re-hash every file, ignoring the cache")
    verify.set_defaults(run=handler("trainguard.envcheck._commands", "cmd_env_verify"))
