"""The app factory uvicorn's workers import: ``uvicorn trainguard.server._asgi:app --factory``.

Each worker process calls `app()`, which reads the ledger's location and signing key from the same
environment variables the command line does (TRAINGUARD_LEDGER, TRAINGUARD_LEDGER_KEY); `trainguard serve`
sets them from its flags before it starts the workers. Nothing is kept at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ENV_KEY", "ENV_RATE_LIMITS", "ENV_SILENT_AFTER", "ENV_STORE", "ENV_WEBHOOKS", "app"]

ENV_STORE = "TRAINGUARD_LEDGER"
ENV_KEY = "TRAINGUARD_LEDGER_KEY"
# JSON of RateLimits and WebhookLimits, set by `trainguard serve` from its flags.
ENV_RATE_LIMITS = "TRAINGUARD_SERVE_RATE_LIMITS"
ENV_WEBHOOKS = "TRAINGUARD_SERVE_WEBHOOKS"
# Seconds without word from a run before it is judged silent; absent or 0: not judged.
ENV_SILENT_AFTER = "TRAINGUARD_SERVE_SILENT_AFTER"


def app() -> FastAPI:
    from trainguard.server._app import create_app
    from trainguard.server._ratelimit import RateLimits
    from trainguard.server._webhook_sender import WebhookLimits

    key = os.environ.get(ENV_KEY) or None
    rates = os.environ.get(ENV_RATE_LIMITS)
    hooks = os.environ.get(ENV_WEBHOOKS)
    silent_after = float(os.environ.get(ENV_SILENT_AFTER) or 0)
    return create_app(
        os.environ.get(ENV_STORE) or None,
        key_path=None if key is None else Path(key),
        rate_limits=None if rates is None else RateLimits.from_env(rates),
        webhook_limits=None if hooks is None else WebhookLimits.from_env(hooks),
        silent_after_s=silent_after or None,
    )
