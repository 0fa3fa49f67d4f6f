"""Arguments of `trainguard keygen`, `trainguard ledger ...` and `trainguard witness serve`.

Only argparse here: the handlers import the ledger when they run, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from trainguard._argtypes import handler, non_negative_int

_LEDGER_EPILOG = (
    "exit codes: 0 verified, 1 verification failed (tampering, wrong key, rollback), 2 usage error, "
    "3 the store could not be read"
)


def _run(name: str) -> Callable[[argparse.Namespace], int]:
    return handler("trainguard.ledger._commands", name)


def _keygen(args: argparse.Namespace) -> int:
    """Note keys for the ledger and witnesses; PEM keys for signing checkpoints."""
    from trainguard.errors import UsageError

    if args.out is None:
        if args.witness or args.name:
            raise UsageError("a ledger or witness key needs a FILE to write it to")
        from trainguard._cli_common import default_signing_key

        # The checkpoint signing key, where `trainguard sign` and `trainguard.save` look for it.
        args.pem, args.out = True, default_signing_key()
    if not args.pem:
        return int(_run("cmd_keygen")(args))
    from trainguard.gate._commands import cmd_keygen_pem

    if args.witness or args.name:
        raise UsageError("--pem makes a checkpoint signing key; it takes neither --witness nor --name")
    return int(cmd_keygen_pem(args))


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    _add_keygen(commands, common)
    _add_ledger(commands, common)
    _add_witness(commands, common)


def _add_keygen(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    keygen = commands.add_parser(
        "keygen",
        parents=[common],
        help="create a signing key (ledger, witness, or checkpoint signing with --pem)",
        description="Write a private key file (mode 0600, never overwritten) and its public key next to it "
        "as FILE.pub: a C2SP signed-note key for the ledger or a witness, or with --pem a PEM key for "
        "`trainguard sign`.",
    )
    keygen.add_argument(
        "out",
        type=Path,
        nargs="?",
        metavar="FILE",
        help="private key file to create; without FILE, the default checkpoint signing key "
        "($TRAINGUARD_HOME/keys/signing.pem) that `trainguard sign` uses",
    )
    keygen.add_argument("--name", help="key name (note keys); for a ledger key, the ledger's origin")
    keygen.add_argument(
        "--witness", action="store_true", help="a witness cosigning key (cosignature/v1) instead of a log key"
    )
    keygen.add_argument("--pem", action="store_true", help="a PEM key for signing checkpoints")
    keygen.add_argument(
        "--alg",
        choices=("ed25519", "ecdsa-p256"),
        default="ed25519",
        help="with --pem: the algorithm (ecdsa-p256 for OMS bundles that model_signing verifies)",
    )
    keygen.set_defaults(run=_keygen)


def _add_ledger(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        metavar="LOCATION",
        default=os.environ.get("TRAINGUARD_LEDGER") or None,
        help="SQLite file or postgresql:// URL (default $TRAINGUARD_HOME/ledger.db; env: TRAINGUARD_LEDGER)",
    )
    public = argparse.ArgumentParser(add_help=False)
    public.add_argument(
        "--public-key",
        metavar="KEY",
        help="the ledger's verifier key (text or file) kept apart from the store; "
        "default: $TRAINGUARD_HOME/keys/ledger.pub for the default ledger",
    )
    witness = argparse.ArgumentParser(add_help=False)
    witness.add_argument("--witness", metavar="URL", help="a witness to submit the latest checkpoint to")
    witness.add_argument(
        "--witness-key", metavar="KEY", help="the witness's verifier key (text or file), with --witness"
    )

    ledger = commands.add_parser(
        "ledger",
        parents=[common],
        help="the tamper-evident evidence log: append, verify, prove",
        description="An append-only log of events in an RFC 9162 Merkle tree with signed checkpoints.",
        epilog=_LEDGER_EPILOG,
    )
    actions = ledger.add_subparsers(dest="action", required=True, metavar="ACTION")

    append = actions.add_parser(
        "append", parents=[common, store], help="append one event", epilog=_LEDGER_EPILOG
    )
    append.add_argument("--type", required=True, dest="event_type", help="event type, e.g. run.start")
    source = append.add_mutually_exclusive_group()
    source.add_argument("--payload", metavar="JSON", help="payload as a JSON object (default {})")
    source.add_argument(
        "--payload-file", type=Path, metavar="FILE", help="payload from a JSON file ('-' for stdin)"
    )
    append.add_argument("--run-id", help="the run this event belongs to")
    append.add_argument("--rank", type=non_negative_int, help="the rank that produced it")
    append.add_argument(
        "--key",
        type=Path,
        default=os.environ.get("TRAINGUARD_LEDGER_KEY") or None,
        help="signing key file (default $TRAINGUARD_HOME/keys/ledger.key; env: TRAINGUARD_LEDGER_KEY)",
    )
    append.set_defaults(run=_run("cmd_append"))

    head = actions.add_parser(
        "head",
        parents=[common, store, public, witness],
        help="print the latest signed checkpoint",
        epilog=_LEDGER_EPILOG,
    )
    head.set_defaults(run=_run("cmd_head"))

    verify = actions.add_parser(
        "verify",
        parents=[common, store, public, witness],
        help="recompute the tree from every entry and check every checkpoint",
        description="Check every entry, stored hash and signed checkpoint; name the first bad index. A "
        "rollback to an older consistent state needs --checkpoint or --witness to be seen.",
        epilog=_LEDGER_EPILOG,
    )
    verify.add_argument(
        "--checkpoint", type=Path, metavar="FILE", help="a signed checkpoint kept elsewhere that must hold"
    )
    verify.add_argument(
        "--export", type=Path, metavar="FILE", help="verify an export file instead of a store"
    )
    verify.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    verify.set_defaults(run=_run("cmd_verify"))

    prove = actions.add_parser(
        "prove",
        parents=[common, store, public],
        help="print an inclusion or consistency proof",
        epilog=_LEDGER_EPILOG,
    )
    prove.add_argument("index", type=non_negative_int, nargs="?", help="entry to prove included")
    prove.add_argument(
        "--consistency", type=non_negative_int, metavar="OLD_SIZE", help="prove the tree extends OLD_SIZE"
    )
    prove.add_argument("--size", type=non_negative_int, help="tree size (default: the latest checkpoint)")
    prove.set_defaults(run=_run("cmd_prove"))

    show = actions.add_parser(
        "show", parents=[common, store], help="print entries as JSON lines", epilog=_LEDGER_EPILOG
    )
    show.add_argument("index", type=non_negative_int, nargs="?", help="one entry (default: all)")
    show.add_argument("--start", type=non_negative_int, default=0, help="first index")
    show.add_argument("--end", type=non_negative_int, help="stop before this index")
    show.add_argument("--type", dest="event_type", help="only events of this type")
    show.set_defaults(run=_run("cmd_show"))

    export = actions.add_parser(
        "export",
        parents=[common, store],
        help="write entries and checkpoints to a file an offline verifier can check",
        epilog=_LEDGER_EPILOG,
    )
    export.add_argument("out", type=Path, metavar="FILE", help="JSON lines file to write ('-' for stdout)")
    export.set_defaults(run=_run("cmd_export"))

    tiles = actions.add_parser(
        "tiles",
        parents=[common, store],
        help="write the log as C2SP tlog-tiles static files that transparency-log clients audit",
        description="Write the checkpoint, hash tiles and entry bundles of the latest signed checkpoint "
        "into DIR (https://c2sp.org/tlog-tiles), the checkpoint last. Tiles already in DIR are checked "
        "and kept; one that differs is refused as tampering (exit 1).",
        epilog=_LEDGER_EPILOG,
    )
    tiles.add_argument("out", type=Path, metavar="DIR", help="folder to write (created if missing)")
    tiles.set_defaults(run=_run("cmd_tiles"))


def _add_witness(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    witness = commands.add_parser(
        "witness",
        parents=[common],
        help="run a witness that cosigns only consistent checkpoints",
        description="A witness keeps the last checkpoint it cosigned for each log and cosigns a new one "
        "only with a valid consistency proof from it (C2SP tlog-witness).",
    )
    actions = witness.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", parents=[common], help="serve the witness over HTTP")
    serve.add_argument("--key", type=Path, required=True, help="the witness's private key (keygen --witness)")
    serve.add_argument(
        "--log",
        action="append",
        required=True,
        metavar="KEY",
        help="verifier key (text or file) of a log to witness; its name is the log's origin; repeatable",
    )
    serve.add_argument("--state", type=Path, required=True, help="SQLite file for the witness's state")
    serve.add_argument(
        "--listen", default="127.0.0.1:7490", metavar="HOST:PORT", help="address (default 127.0.0.1:7490)"
    )
    serve.set_defaults(run=_run("cmd_witness_serve"))
