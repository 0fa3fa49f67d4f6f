"""Simulated training jobs for bench/server/run.py: one process runs several jobs, each a thread.

Started by run.py, never by hand. It reads one JSON line from stdin (the jobs, their tokens, the server's
URL, the rates), opens one `trainguard.relay.Spool` and one `Delivery` per job, prints ``ready``, then
reads a second line: the CLOCK_MONOTONIC time at which every job starts (the clock is the machine's, so
the jobs of all processes and the driver share it). Tokens come through stdin so that no command line
shown by ``ps`` holds one.

Each job puts a per-step summary every `step_s` seconds, and an alert after a step with probability
`alert_probability`, until `end_at`; every payload carries ``(job, seq)`` so that the driver can count
each event in the ledger. Then it closes its Delivery, which sends what is left, and the process writes
its results (no token in them) to the file the spec names.

The time an event was acknowledged is when the Delivery removes it from the spool, which it does only
for keys the server acknowledged: `TimedSpool.remove` notes that time, and the size of each
acknowledged batch.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from trainguard.errors import StoreError  # noqa: E402
from trainguard.ledger import new_event  # noqa: E402
from trainguard.relay import Delivery, DeliveryLimits, Spool, SpooledEvent, SpoolFull  # noqa: E402

RANKS = 8
COLUMNS = [
    "step",
    "loss",
    "grad_norm",
    "optimizer_off_cpu_ms",
    "forward_off_cpu_ms",
    "data_off_cpu_ms",
    "data_order_digest",
    "hyperparameter_changes",
]
ALERT_CHECKS = ("step_time", "update_direction", "fingerprint", "data_wait")


class TimedSpool(Spool):
    """A Spool that notes when the Delivery removes events, i.e. when the server acknowledged them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acked_at: dict[int, float] = {}
        self.batch_sizes: list[int] = []
        self.round_trips: list[float] = []
        self._taken_at: float | None = None
        self._notes = threading.Lock()

    def oldest(self, max_events: int, max_bytes: int) -> list[SpooledEvent]:
        # The Delivery reads its next batch right before it posts it: from here to `remove` is one
        # request's round trip, the server's answer time included.
        batch = super().oldest(max_events, max_bytes)
        self._taken_at = time.monotonic()
        return batch

    def remove(self, seqs: Iterable[int]) -> int:
        # Taken before the spool's own commit: the answer has arrived, the fsync of its removal is ours.
        now = time.monotonic()
        wanted = list(seqs)
        with self._notes:
            for seq in wanted:
                self.acked_at.setdefault(seq, now)
            self.batch_sizes.append(len(wanted))
            if self._taken_at is not None:
                self.round_trips.append(now - self._taken_at)
        return super().remove(wanted)


class FailureKinds(logging.Handler):
    """Counts streaks of failed tries by the failure that began each ("network: TimeoutError", "HTTP 500",
    ...): the Delivery warns once per kind ("network", "HTTP 500") until delivery works again."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.kinds: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "will retry: " in message:
            reason = message.split("will retry: ", 1)[1]
            parts = reason.split(":", 2)
            # "network: TimeoutError: timed out" -> "network: TimeoutError"; "HTTP 503: {...}" -> "HTTP 503"
            self.kinds[":".join(parts[:2] if parts[0] == "network" else parts[:1]).strip()] += 1


def step_event(job: int, seq: int, step: int, rng: random.Random) -> dict[str, Any]:
    """What the guard's per-step summary holds for an 8-rank job (monitor.steps, one row)."""
    off_cpu = [[round(rng.uniform(5, 40), 1) for _ in range(RANKS)] for _ in range(3)]
    row = [step, round(rng.uniform(1.5, 4.0), 5), round(rng.uniform(0.1, 2.0), 5), *off_cpu]
    row += [f"{rng.getrandbits(64):016x}", []]
    return {"job": job, "seq": seq, "columns": COLUMNS, "rows": [row]}


def alert_event(job: int, seq: int, step: int, rng: random.Random) -> dict[str, Any]:
    rank = rng.randrange(RANKS)
    check = rng.choice(ALERT_CHECKS)
    return {
        "job": job,
        "seq": seq,
        "check": check,
        "ranks": [rank],
        "step": step,
        "message": f"{check}: rank {rank} differs from the other {RANKS - 1} at step {step}",
        "action": "alert",
    }


class Job:
    def __init__(self, spec: dict[str, Any], job: dict[str, Any], home: Path, limits: DeliveryLimits) -> None:
        self.index = int(job["index"])
        self.run = str(job["run"])
        spool = TimedSpool.open(self.run, path=home / "spool" / f"{self.run}.db")
        assert isinstance(spool, TimedSpool)  # Spool.open builds the class it is called on
        self.spool = spool
        self.delivery = Delivery(self.spool, spec["url"], job["token"], limits=limits)
        self.step_s = float(spec["step_s"])
        self.alert_probability = float(spec["alert_probability"])
        self.drain_timeout_s = float(spec["drain_timeout_s"])
        self.rng = random.Random(int(spec["seed"]) * 1000 + self.index)
        self.put_at: dict[int, float] = {}
        self.put_cost: list[float] = []
        self.stored: list[int] = []
        """The payload seqs whose put returned: the events the ledger must hold exactly once."""
        self.refused = 0
        self.put_errors: list[str] = []
        self.late_steps = 0
        self.result: dict[str, Any] = {}

    def run_until(self, start_at: float, end_at: float) -> None:
        seq = 0
        step = 0
        # Jobs start at random phases, as real jobs do, rather than all putting in the same millisecond.
        next_at = start_at + self.rng.uniform(0, self.step_s)
        while next_at < end_at:
            wait = next_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            elif wait < -self.step_s:
                self.late_steps += 1
            self.put("monitor.steps", step_event(self.index, seq, step, self.rng))
            seq += 1
            if self.rng.random() < self.alert_probability:
                self.put("monitor.alert", alert_event(self.index, seq, step, self.rng))
                seq += 1
            step += 1
            next_at += self.step_s
        report = self.delivery.close(timeout=self.drain_timeout_s)
        self.result = {
            "job": self.index,
            "run": self.run,
            "stored": self.stored,
            "refused": self.refused,
            "put_errors": self.put_errors,
            "late_steps": self.late_steps,
            # (put time, acknowledgement time or None), one per event the spool took, in spool order.
            "events": [[at, self.spool.acked_at.get(seq)] for seq, at in sorted(self.put_at.items())],
            "put_cost": self.put_cost,
            "batch_sizes": self.spool.batch_sizes,
            "round_trips": self.spool.round_trips,
            "delivered": report.delivered,
            "duplicates": report.duplicates,
            "failed_tries": report.failed_tries,
            "rejections": report.rejections,
            "remaining": report.remaining,
            "gap_pending": report.gap_pending,
            "stopped": report.stopped is not None,
        }
        self.spool.close()

    def put(self, kind: str, payload: dict[str, Any]) -> None:
        event = new_event(kind, payload, run_id=self.run, rank=0)
        started = time.monotonic()
        try:
            key = self.spool.put(event)
        except SpoolFull:
            self.refused += 1  # the spool counts it, and delivers a gap event in its place
            return
        except StoreError as exc:
            # The job goes on, as a training job would; the driver reports the events it could not spool.
            self.put_errors.append(exc.diagnostics())
            return
        self.put_cost.append(time.monotonic() - started)
        self.put_at[int(key.rsplit("/", 1)[1])] = started
        self.stored.append(int(payload["seq"]))
        # A training loop does not wake the delivery thread: it polls, and batches what a poll finds.


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    home = Path(spec["home"])
    limits = DeliveryLimits(poll_s=float(spec["poll_s"]), backoff_cap_s=float(spec["backoff_cap_s"]))
    failures = FailureKinds()
    logging.getLogger("trainguard.delivery").addHandler(failures)
    jobs = [Job(spec, job, home, limits) for job in spec["jobs"]]
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    end_at = start_at + float(spec["seconds"])
    threads = [threading.Thread(target=job.run_until, args=(start_at, end_at)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = {"jobs": [job.result for job in jobs], "failure_streaks": dict(failures.kinds)}
    Path(spec["out"]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
