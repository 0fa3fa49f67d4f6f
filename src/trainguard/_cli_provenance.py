"""Arguments of `trainguard sign`, `trainguard verify` and `trainguard ckpt audit`.

Only argparse here: the handlers import the provenance and gate rooms when they run, so `--help` stays
instant.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from trainguard._argtypes import handler, positive_int

_EPILOG = (
    "exit codes: 0 signed or verified, 1 verification failed (files changed, untrusted or bad signature), "
    "2 usage error, 3 could not decide (unreadable files)"
)


def _run(name: str) -> Callable[[argparse.Namespace], int]:
    return handler("trainguard.gate._commands", name)


def trust_arguments(parser: argparse.ArgumentParser, signs: str = "") -> None:
    """--trust and --trust-policy; `signs` says what the trusted keys sign, for the help."""
    parser.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="KEY",
        help=f"a public key file (PEM) whose signatures{signs} are trusted; repeatable",
    )
    parser.add_argument(
        "--trust-policy",
        type=Path,
        metavar="FILE",
        default=os.environ.get("TRAINGUARD_TRUST_POLICY") or None,
        help="TOML file of trusted keys, [[trust.key]] name/path (env: TRAINGUARD_TRUST_POLICY)",
    )


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    sign = commands.add_parser(
        "sign",
        parents=[common],
        help="sign a checkpoint file or directory",
        description="Hash every file (large ones in shards, in parallel), write a manifest that binds names, "
        "sizes, modes and digests, and sign it. A directory's signature is DIR/.trainguard.sig, a file's "
        "FILE.trainguard.sig. The signing is recorded in the ledger.",
        epilog=_EPILOG,
    )
    sign.add_argument("path", type=Path, metavar="PATH", help="checkpoint file or directory")
    sign.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        default=os.environ.get("TRAINGUARD_SIGNING_KEY") or None,
        help="private key (PEM, from keygen --pem; default $TRAINGUARD_HOME/keys/signing.pem; "
        "env: TRAINGUARD_SIGNING_KEY)",
    )
    sign.add_argument(
        "--format",
        choices=("trainguard", "oms"),
        default="trainguard",
        help="signature format: trainguard's, or an OpenSSF Model Signing (OMS v1.0) bundle",
    )
    sign.add_argument("--out", type=Path, metavar="FILE", help="where to write the signature")
    sign.add_argument(
        "--shard-size", type=positive_int, metavar="BYTES", help="shard size for large files (1 GiB)"
    )
    sign.add_argument("--jobs", type=positive_int, metavar="N", help="hashing threads (default: every core)")
    sign.add_argument("--no-ledger", action="store_true", help="do not record the signing in the ledger")
    sign.add_argument(
        "--require-ledger", action="store_true", help="fail when the signing cannot be recorded in the ledger"
    )
    sign.set_defaults(run=_run("cmd_sign"))

    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="verify a signed checkpoint against trusted keys",
        description="Check the signature with the trusted keys, then every file: added, removed, renamed and "
        "modified files are named. Unchanged files are taken from a signed cache keyed on their inode and "
        "times; --full re-hashes everything.",
        epilog=_EPILOG,
    )
    verify.add_argument("path", type=Path, metavar="PATH", help="checkpoint file or directory")
    trust_arguments(verify)
    verify.add_argument("--signature", type=Path, metavar="FILE", help="signature file (trainguard or OMS)")
    verify.add_argument("--full", action="store_true", help="re-hash every file, ignoring the cache")
    verify.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    verify.add_argument("--no-ledger", action="store_true", help="do not record the check in the ledger")
    verify.add_argument(
        "--require-ledger", action="store_true", help="fail when the check cannot be recorded in the ledger"
    )
    verify.set_defaults(run=_run("cmd_verify"))

    ckpt = commands.add_parser(
        "ckpt", parents=[common], help="checkpoint registry: audit what was signed against what is on disk"
    )
    actions = ckpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    audit = actions.add_parser(
        "audit",
        parents=[common],
        help="report altered, missing (deleted) and unsigned checkpoints",
        description="Compare every signing the ledger recorded under the given folders with the files on "
        "disk.",
        epilog=_EPILOG,
    )
    audit.add_argument("paths", type=Path, nargs="+", metavar="DIR", help="folders holding checkpoints")
    trust_arguments(audit)
    audit.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    audit.set_defaults(run=_run("cmd_ckpt_audit"))
