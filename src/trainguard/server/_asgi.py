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

__all__ = ["ENV_KEY", "ENV_STORE", "app"]

ENV_STORE = "TRAINGUARD_LEDGER"
ENV_KEY = "TRAINGUARD_LEDGER_KEY"


def app() -> FastAPI:
    from trainguard.server._app import create_app

    key = os.environ.get(ENV_KEY) or None
    return create_app(os.environ.get(ENV_STORE) or None, key_path=None if key is None else Path(key))
