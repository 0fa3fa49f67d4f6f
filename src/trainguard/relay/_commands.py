"""`trainguard spool push`: deliver what a run's spool still holds (after the server was down, say).

Exit codes: 0 nothing is left in the spool, 2 usage error (no server, a bad token file, a refused token),
3 events remain spooled (the server did not take them in time).
"""

from __future__ import annotations

import argparse

from trainguard.errors import ExitCode, UsageError
from trainguard.relay._destination import server_settings
from trainguard.relay._outbox import Outbox, leftover_message
from trainguard.relay._spool import default_path
from trainguard.relay._whoami import whoami

__all__ = ["cmd_spool_push"]


def cmd_spool_push(args: argparse.Namespace) -> int:
    settings = server_settings(args.server, args.server_token_file)
    if settings is None:
        raise UsageError(
            "no server to push to", hint="give --server URL and --server-token-file FILE (or their variables)"
        )
    token = settings.token()
    run_id = args.run_id or whoami(settings.url, token).run
    if not run_id:
        raise UsageError("the token is bound to no run", hint="give the run with --run RUN")
    path = default_path(run_id)
    if not path.exists():
        print(f"nothing spooled for run {run_id} ({path} does not exist)")
        return int(ExitCode.CLEAN)
    outbox = Outbox.open(run_id, settings.url, token)
    report = outbox.close(args.timeout)
    print(f"run {run_id}: {report.delivered} event(s) delivered, {report.duplicates} already on the server")
    message = leftover_message(report, path, run_id)
    if message is not None:
        print(message)
        return int(ExitCode.UNDECIDED)
    return int(ExitCode.CLEAN)
