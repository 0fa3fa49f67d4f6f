"""Where `trainguard run` records the run: the local ledger, or `trainguard serve` through the run's spool.

With a server (--server and --server-token-file, or $TRAINGUARD_SERVER and $TRAINGUARD_SERVER_TOKEN_FILE),
the token is checked before anything is launched: a server that refuses it would refuse the job's
evidence, so the job is not started (fail closed). A server that does not answer does not stop the launch:
the events wait in the spool, and this or a later delivery sends them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from trainguard.errors import TrainguardError, UsageError
from trainguard.relay._destination import server_settings
from trainguard.relay._outbox import Outbox
from trainguard.relay._spool import default_path
from trainguard.relay._whoami import ServerRefused, ServerUnreachable, whoami
from trainguard.supervisor._journal import Journal
from trainguard.supervisor._say import say

__all__ = ["ServerRefusedLaunch", "open_journal"]

_MAX_RUN_ID = 256


class ServerRefusedLaunch(TrainguardError):
    """The server refuses the token, or it is not a job token: the job is not launched."""


def open_journal(args: argparse.Namespace, new_run_id: Callable[[], str]) -> Journal:
    """The run's journal, with its run id: --run-id, else the job token's run, else a new one."""
    chosen: str | None = args.run_id
    if chosen is not None and (not chosen or len(chosen) > _MAX_RUN_ID or not chosen.isprintable()):
        raise UsageError(f"a run id is 1 to {_MAX_RUN_ID} printable characters")
    settings = server_settings(args.server, args.server_token_file)
    if settings is None:
        return Journal(chosen or new_run_id())
    token = settings.token()
    try:
        grant = whoami(settings.url, token)
    except ServerRefused as exc:
        raise ServerRefusedLaunch(f"not launching: {exc.message}", hint=exc.hint) from None
    except ServerUnreachable as exc:
        if chosen is None:
            raise UsageError(
                f"{exc.message}, so the run its token is bound to is unknown",
                hint="give the run with --run-id RUN, and the job starts with its events spooled",
            ) from None
        say(f"{exc.message}; the run's events wait in {default_path(chosen)} until it answers")
        run_id = chosen
    else:
        if grant.scope != "job" or not grant.run:
            raise ServerRefusedLaunch(
                f"not launching: token {grant.token_id} is a {grant.scope} token, not a job's",
                hint="give the job a token of its own run: "
                "`trainguard server token create --scope job --run RUN --expires 7d`",
            )
        if chosen is not None and chosen != grant.run:
            raise ServerRefusedLaunch(
                f"not launching: token {grant.token_id} is bound to run {grant.run!r}, not {chosen!r}",
                hint="a job token writes only its own run: drop --run-id, or give that run's token",
            )
        run_id = grant.run
    return Journal(run_id, outbox=Outbox.open(run_id, settings.url, token))
