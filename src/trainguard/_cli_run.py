"""Arguments of `trainguard run [options] -- CMD...`.

Only argparse here: the handler imports the supervisor room when it runs, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainguard._argtypes import handler, non_negative_int
from trainguard._cli_provenance import trust_arguments

_EPILOG = (
    "exit codes: the job's own (0, its status, or 128+N when it died of signal N); before launch: "
    "1 a pre-flight check failed (environment or inputs), 2 usage error, 3 the ledger cannot be written, "
    "4 the server refuses the token (--server)"
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _server_arguments(run: argparse.ArgumentParser) -> None:
    server = run.add_argument_group(
        "reporting to a server",
        "Record the run in `trainguard serve` instead of the local ledger. The token is checked before the "
        "launch; the job never sees it: its processes' events (the guard's, `trainguard sign` in it) go "
        "through this supervisor, which spools every event and delivers it, idempotently, while the server "
        "answers. Plain http only to a loopback host, unless TRAINGUARD_SERVER_ALLOW_HTTP=1.",
    )
    server.add_argument(
        "--server",
        metavar="URL",
        help="the server's base URL, e.g. https://tg.example (env: TRAINGUARD_SERVER)",
    )
    server.add_argument(
        "--server-token-file",
        type=Path,
        metavar="FILE",
        help="a file (mode 600) holding the run's job token (env: TRAINGUARD_SERVER_TOKEN_FILE)",
    )
    server.add_argument(
        "--run-id",
        metavar="RUN",
        help="the run's id (default: the job token's run, or a new one without a server); needed when "
        "the server does not answer at launch",
    )
    server.add_argument(
        "--flush-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="after the job, deliver for at most this long; the rest stays spooled for "
        "`trainguard spool push` (default 30)",
    )


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    run = commands.add_parser(
        "run",
        parents=[common],
        help="launch a training job under supervision",
        usage="%(prog)s [options] -- CMD [ARGS...]",
        description="Verify the job's Python environment and signed inputs, record a signed run "
        "attestation (code revision and diff, environment digest, config, seeds, world size, hosts, user) "
        "in the ledger, launch CMD, and watch it: every exit with its cause, every lost rank (heartbeats), "
        "and the sender (pid, uid, command line) of every catchable signal sent to the supervisor or to a "
        "rank. A signal to the supervisor stops the job: SIGTERM, then SIGKILL after --grace seconds.",
        epilog=_EPILOG,
    )
    check = run.add_mutually_exclusive_group()
    check.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        default=os.environ.get("TRAINGUARD_ENV_BASELINE") or None,
        help="verify the environment against this signed baseline from `env snapshot` (with --trust; "
        "default: against its RECORDs; env: TRAINGUARD_ENV_BASELINE)",
    )
    check.add_argument(
        "--no-env-check", action="store_true", help="launch without verifying the environment (attested)"
    )
    run.add_argument(
        "--python",
        metavar="PATH",
        help="the job's interpreter, whose environment is verified (default: the one CMD runs on, by its "
        "name or its #! line; else this one)",
    )
    trust_arguments(run, " (baselines and inputs)")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH",
        help="a signed checkpoint or dataset the job reads; it must verify (with --trust); repeatable",
    )
    run.add_argument(
        "--config", type=Path, metavar="FILE", help="the job's config file, hashed into the attestation"
    )
    run.add_argument(
        "--seed",
        type=non_negative_int,
        metavar="N",
        help="the job's seed: attested, and exported as TRAINGUARD_SEED",
    )
    run.add_argument(
        "--heartbeat-timeout",
        type=_seconds,
        default=1.5,
        metavar="SECONDS",
        help="a rank silent this long is lost (default 1.5)",
    )
    run.add_argument(
        "--grace",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="after a signal to the supervisor, SIGKILL what is left of the job after this long (default 10)",
    )
    _server_arguments(run)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="the job, after --")
    run.set_defaults(run=handler("trainguard.supervisor._run", "cmd_run"))
