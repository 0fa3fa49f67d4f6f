"""bench/server in its quick mode: 4 jobs report to a real `trainguard serve` on PostgreSQL, which is
killed with SIGKILL and started again while they put; every event must be in the ledger exactly once.

Only what the bench counts is asserted, never how fast anything went.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.ledger.conftest import PG_URL, require_pg

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "server" / "run.py"


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_server_run", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: its dataclasses look their module up while the file runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_count_names_lost_and_duplicated_events() -> None:
    bench = _bench_module()
    stored = {"a": [0, 1, 2, 3], "b": [0, 1]}
    seen = {"a": collections.Counter({0: 1, 1: 2, 3: 1}), "b": collections.Counter({0: 1, 1: 1, 5: 1})}
    count = bench.tally(stored, seen)
    assert count.missing == [("a", 2)]
    assert count.duplicated == [("a", 1, 2)]
    assert count.unexpected == [("b", 5)]
    assert (count.expected, count.found) == (6, 7)
    exact = bench.tally(stored, {run: collections.Counter(seqs) for run, seqs in stored.items()})
    assert (exact.missing, exact.duplicated, exact.unexpected) == ([], [], [])


@pytest.mark.slow
def test_a_server_killed_mid_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    require_pg()
    done = subprocess.run(
        [
            *(sys.executable, str(BENCH), "--quick", "--scenarios", "kill"),
            *("--workdir", str(tmp_path), "--postgres", PG_URL),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["problems"] == []
    (kill,) = doc["scenarios"]
    count = kill["count"]
    assert count["expected"] > 0 and count["expected"] == kill["events_put"]
    assert (count["missing"], count["duplicated"], count["gap_events"]) == (0, 0, 0)
    assert count["found"] == count["expected"] == kill["ledger"]["entries"]
    assert kill["server_starts"] == 2
    # Events were put while the server was down, and reached the ledger through the spools.
    assert kill["outage"]["latency_put_during_outage"]["events"] > 0
    assert kill["failed_tries"] > 0
    assert kill["spools_not_drained"] == [] and kill["events_unacknowledged"] == 0
    assert kill["ledger"]["verify_ok"] and kill["ledger"]["verify_exit"] == 0
    assert kill["tokens_in_outputs"] == 0
    assert "| kill |" in done.stdout
