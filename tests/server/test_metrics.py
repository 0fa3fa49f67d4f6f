"""GET /metrics: a reader's token, the Prometheus text format (read back with prometheus_client's own
parser), counts that match what was appended, bounded labels, every worker's series from any worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.server.alerting_harness import Receiver, Site, event, make_site, wait_for
from tests.server.serve_process import Serve
from trainguard.ledger import Ledger

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

EVENTS_ROUTE = "/api/v1/runs/{run:path}/events"


def _scrape(server: Serve, site: Site, token: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    answer = server.request("GET", "/metrics", token=token)
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.body.decode()
    for secret in (site.admin, site.viewer, site.job):
        assert secret.split("_", 3)[3] not in text
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return found


def _value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matches = [v for got, v in found.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


@pytest.fixture
def site(tmp_path: Path, location: str) -> Site:
    return make_site(tmp_path / "site", location)


def test_metrics_need_a_reader_and_count_what_was_appended(site: Site) -> None:
    receiver = Receiver(default=500)  # nothing listens: its delivery fails
    site.add_webhook(receiver.url)
    with site.serve("--webhook-attempts", "1") as server:
        assert server.request("GET", "/metrics").status == 401
        assert server.request("GET", "/metrics", token=site.job).status == 403
        items = [
            *((f"a/{i}", event(site.run, "monitor.alert", i=i)) for i in range(3)),
            *((f"s/{i}", event(site.run, f"invented.type.{i}", i=i)) for i in range(2)),
            ("start", event(site.run, "run.start")),
        ]
        assert server.post_events(site.run, items[:3], site.job).status == 200
        assert server.post_events(site.run, items[3:], site.job).status == 200
        wait_for(
            "the failed deliveries",
            lambda: (
                _value(_scrape(server, site, site.viewer), "trainguard_webhook_deliveries", state="failed")
                == 3
            ),
        )
        found = _scrape(server, site, site.admin)
    with Ledger.open(site.store, create=False) as ledger:
        size = ledger.size
    assert _value(found, "trainguard_ledger_entries") == size == 6
    assert _value(found, "trainguard_ledger_checkpoint_age_seconds") >= 0
    assert _value(found, "trainguard_events_appended_total", type="monitor.alert") == 3
    assert _value(found, "trainguard_events_appended_total", type="run.start") == 1
    # Invented types share one label: a job cannot grow the metrics without bound.
    assert _value(found, "trainguard_events_appended_total", type="other") == 2
    assert {labels["type"] for labels, _ in found["trainguard_events_appended_total"]} == {
        "monitor.alert",
        "run.start",
        "other",
    }
    assert _value(found, "trainguard_webhooks") == 1
    assert _value(found, "trainguard_webhook_deliveries", state="pending") == 0
    assert _value(found, "trainguard_webhook_attempts_total", outcome="failed") == 3
    assert (
        _value(found, "trainguard_http_requests_total", route=EVENTS_ROUTE, method="POST", status="200") == 2
    )
    assert _value(found, "trainguard_http_requests_total", route="/metrics", method="GET", status="401") == 1
    assert _value(found, "trainguard_http_requests_total", route="/metrics", method="GET", status="403") == 1
    # No label names a run, a token or a URL.
    for samples in found.values():
        for labels, _ in samples:
            assert set(labels) <= {"type", "state", "worker", "route", "method", "status", "kind", "outcome"}
            assert site.run not in labels.values()
    assert all("secret-path-token" not in json.dumps(s) for s in found.values())


def test_any_worker_reports_every_workers_series(tmp_path: Path, pg_location: str) -> None:
    site = make_site(tmp_path / "site", pg_location)
    with site.serve(workers=2) as server:

        def workers_seen() -> set[str]:
            for _ in range(20):  # fresh connections, spread over both workers by the kernel
                assert server.request("GET", "/healthz").status == 200
            found = _scrape(server, site, site.viewer)
            return {labels["worker"] for labels, _ in found.get("trainguard_http_requests_total", [])}

        wait_for("both workers' series in one scrape", lambda: len(workers_seen()) == 2)
