"""docs/openapi.json is the API's description as the server itself serves it, for tools that work offline.

When a route changes, write the file again with `TRAINGUARD_WRITE_OPENAPI=1 pytest` on this file, and
review the difference like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.server.live_server import make_app, make_ledger

pytest.importorskip("fastapi")

PUBLISHED = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def _served(tmp_path: Path) -> str:
    app = make_app(make_ledger(tmp_path / "ledger"))
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


def test_the_published_description_is_the_one_the_server_serves(tmp_path: Path) -> None:
    served = _served(tmp_path)
    if os.environ.get("TRAINGUARD_WRITE_OPENAPI") == "1":
        PUBLISHED.write_text(served)
    assert PUBLISHED.exists(), f"{PUBLISHED} is missing: write it with TRAINGUARD_WRITE_OPENAPI=1"
    assert PUBLISHED.read_text() == served, (
        f"{PUBLISHED} differs from what the server serves: write it again with TRAINGUARD_WRITE_OPENAPI=1 "
        "and review the difference"
    )


def test_the_description_names_every_api_route_and_says_how_to_authenticate(tmp_path: Path) -> None:
    document = json.loads(_served(tmp_path))
    assert document["openapi"].startswith("3.")
    for path in ("/api/v1/runs/{run}/events", "/api/v1/whoami", "/checkpoint", "/metrics", "/healthz"):
        assert path in document["paths"], path
    schemes = document["components"]["securitySchemes"]
    assert any(scheme.get("scheme") == "bearer" for scheme in schemes.values()), schemes
