"""Arguments of `trainguard spool push`.

Only argparse here: the handler imports the relay room when it runs, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainguard._argtypes import handler, positive_int

_EPILOG = (
    "exit codes: 0 the spool is empty, 2 usage error (no server, a bad token file, a refused token), "
    "3 events remain spooled"
)


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    spool = commands.add_parser(
        "spool",
        parents=[common],
        help="a run's events waiting for the server",
        description="Events for `trainguard serve` wait in a spool per run ($TRAINGUARD_HOME/spool/) until "
        "the server takes them.",
    )
    actions = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    push = actions.add_parser(
        "push",
        parents=[common],
        help="deliver what a run's spool holds",
        description="Deliver a run's spooled events to the server, oldest first. The server keeps each "
        "event once, however often it is sent, so pushing twice, or beside a running job, duplicates "
        "nothing.",
        epilog=_EPILOG,
    )
    push.add_argument(
        "--run", dest="run_id", metavar="RUN", help="the run (default: the one the job token is bound to)"
    )
    push.add_argument("--server", metavar="URL", help="the server's base URL (env: TRAINGUARD_SERVER)")
    push.add_argument(
        "--server-token-file",
        type=Path,
        metavar="FILE",
        help="a file (mode 600) holding the run's job token (env: TRAINGUARD_SERVER_TOKEN_FILE)",
    )
    push.add_argument(
        "--timeout",
        type=positive_int,
        default=60,
        metavar="SECONDS",
        help="deliver for at most this long (default 60)",
    )
    push.set_defaults(run=handler("trainguard.relay._commands", "cmd_spool_push"))
