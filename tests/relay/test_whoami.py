"""GET /api/v1/whoami: what a token may do, asked before a job starts; never its secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.relay.conftest import RUN, deployment
from trainguard.relay._whoami import ServerRefused, ServerUnreachable, whoami


def test_whoami_tells_a_job_token_s_run_and_expiry_and_refuses_the_rest(tmp_path: Path) -> None:
    with deployment(tmp_path, None) as d:
        answer = d.server.request("GET", "/api/v1/whoami", token=d.job_token)
        assert answer.status == 200
        doc = json.loads(answer.body)
        assert doc["token_id"] == d.job_token[4:15] and doc["scope"] == "job" and doc["run"] == RUN
        assert doc["expires_at"].endswith("Z")
        assert d.job_token[16:] not in answer.body.decode()
        grant = whoami(d.server.url, d.job_token)
        assert (grant.scope, grant.run) == ("job", RUN)
        assert whoami(d.server.url, d.viewer).scope == "viewer"
        assert d.server.request("GET", "/api/v1/whoami").status == 401
        for name in ("revoked", "unknown"):
            with pytest.raises(ServerRefused):
                whoami(d.server.url, d.other_tokens[name].read_text().strip())
        url = d.server.url
    with pytest.raises(ServerUnreachable):
        whoami(url, d.job_token, timeout=5)  # the server is gone
