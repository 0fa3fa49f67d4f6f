"""How long the dashboard's reads take on one large run: the runs page, the run page, the ledger page.

    .venv/bin/python bench/dashboard/run.py [--events N] [--store LOCATION]

Fills a fresh ledger (default: a SQLite file in a temporary folder; or a postgresql:// URL naming an
empty schema) through the server's own append path (event keys and the type table in the append's
transaction) with one run of N monitor.steps events, its only alert at the very start (the case where a
scan of the run would read it all), and 20 small runs; then times each page's reads (best of 3, the
view functions alone: no HTTP, no rendering).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from trainguard.ledger import Ledger, SigningKey, new_event
from trainguard.server._eventkeys import EventKeys
from trainguard.server._eventtypes import create_type_table, index_types
from trainguard.server._views import ViewLimits, ledger_view, run_view, runs_page

_COLUMNS = ["step", "loss", "grad_norm", "optimizer_off_cpu_ms", "forward_off_cpu_ms", "data_off_cpu_ms"]
_TOKEN = "tg_00000000"


def _fill(ledger: Ledger, keys: EventKeys, events: int) -> None:
    alert = {
        "check": "fingerprint",
        "step": 0,
        "message": "replicas disagree",
        "ranks": [1],
        "action": "stop",
    }
    batch = [("a/0", new_event("monitor.alert", alert, run_id="big").canonical())]
    for step in range(events):
        row = [step, 1.0, 0.1, [1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [0.5, 0.5, 0.5]]
        payload = {"columns": _COLUMNS, "rows": [row]}
        batch.append((f"s/{step}", new_event("monitor.steps", payload, run_id="big").canonical()))
        if len(batch) == 1000:
            keys.append("big", batch, _TOKEN)
            batch = []
    if batch:
        keys.append("big", batch, _TOKEN)
    for run in range(20):
        keys.append(
            f"small-{run}", [("k", new_event("run.start", {}, run_id=f"small-{run}").canonical())], _TOKEN
        )


def _best_ms(read: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events of the large run (100000)")
    parser.add_argument(
        "--store", help="a postgresql:// URL of an empty schema (default: SQLite in a temp dir)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        location = args.store or str(Path(tmp) / "ledger.db")
        key = SigningKey.generate("bench.example/dashboard")
        ledger = Ledger.open(location, key=key)
        create_type_table(ledger.store)
        keys = EventKeys(ledger.store, key, hooks=[index_types])
        started = time.perf_counter()
        _fill(ledger, keys, args.events)
        print(f"{ledger.size} entries written in {time.perf_counter() - started:.1f} s ({ledger.location})")
        limits = ViewLimits()
        print(f"runs page:   {_best_ms(lambda: runs_page(ledger, 0, limits)):.0f} ms")
        print(f"run page:    {_best_ms(lambda: run_view(ledger, 'big', limits)):.0f} ms")
        print(f"ledger page: {_best_ms(lambda: ledger_view(ledger, None, limits)):.0f} ms")
        ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
