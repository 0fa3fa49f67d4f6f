"""One event from a command (`trainguard sign`, `verify`, `env ...`), wherever this process reports to.

- In a job under `trainguard run --server` ($TRAINGUARD_EVENTS): to the supervisor, which spools it with
  the run's other events; the job holds no token.
- With $TRAINGUARD_SERVER (and its token file): through the run's spool to the server. The run is
  $TRAINGUARD_RUN_ID, else the one the job token is bound to.
- Otherwise: the local ledger, as `trainguard.ledger._record.record` writes it.

A failure is a warning, unless the caller requires the event (then a StoreError): required means it
reached the supervisor, the server, or the ledger, not merely a spool on this host.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from trainguard.errors import StoreError, TrainguardError
from trainguard.ledger._events import Event, new_event
from trainguard.ledger._record import record as record_in_ledger
from trainguard.ledger._record import valid_text
from trainguard.relay._destination import ServerSettings, server_settings
from trainguard.relay._jobsocket import ENV_EVENTS, EventSender

__all__ = ["ENV_RUN_ID", "record"]

ENV_RUN_ID = "TRAINGUARD_RUN_ID"
_FLUSH_S = 10.0


def record(event_type: str, payload: Mapping[str, Any], *, require: bool = False) -> int | None:
    """Record an event; its ledger index when it went to the local ledger, else None."""
    socket_path = os.environ.get(ENV_EVENTS) or None
    try:
        settings = None if socket_path else server_settings()
    except TrainguardError as exc:
        _failed(event_type, exc, require)
        return None
    if socket_path is None and settings is None:
        return record_in_ledger(event_type, payload, require=require)
    try:
        if socket_path is not None:
            run_id = os.environ.get(ENV_RUN_ID) or ""
            _to_supervisor(socket_path, new_event(event_type, valid_text(payload), run_id=run_id))
        else:
            assert settings is not None
            _to_server(settings, event_type, payload, require=require)
    # Any failure, bugs included: the command's own work is done, and the warning says what was lost.
    except Exception as exc:
        _failed(event_type, exc, require)
    return None


def _to_supervisor(path: str, event: Event) -> None:
    sender = EventSender(path)
    try:
        sender.send(event)
    finally:
        sender.close()


def _to_server(
    settings: ServerSettings, event_type: str, payload: Mapping[str, Any], *, require: bool
) -> None:
    from trainguard.relay._outbox import Outbox, leftover_message
    from trainguard.relay._whoami import whoami

    token = settings.token()
    run_id = os.environ.get(ENV_RUN_ID) or whoami(settings.url, token).run
    if not run_id:
        raise StoreError(
            f"the token in {settings.token_file} is not bound to a run, and {ENV_RUN_ID} is not set",
            hint="report with a job token (`trainguard server token create --scope job --run RUN`)",
        )
    outbox = Outbox.open(run_id, settings.url, token)
    outbox.put(new_event(event_type, valid_text(payload), run_id=run_id))
    report = outbox.close(_FLUSH_S)
    message = leftover_message(report, outbox.spool_path, run_id)
    if message is not None:
        if require:
            raise StoreError(message)
        print(f"trainguard: warning: {message}", file=sys.stderr)


def _failed(event_type: str, exc: Exception, require: bool) -> None:
    message = exc.diagnostics() if isinstance(exc, TrainguardError) else f"{type(exc).__name__}: {exc}"
    if require:
        raise StoreError(
            f"could not record {event_type}: {message}",
            hint="fix the server or ledger, or run without requiring it",
        ) from exc
    print(f"trainguard: warning: {event_type} not recorded: {message}", file=sys.stderr)
