"""Server benchmark: `trainguard serve` under 64 reporting jobs, and killed (SIGKILL) and restarted mid-run.

Usage (from the repository root)::

    .venv/bin/python bench/server/run.py [--quick] [--seconds 60] [--jobs 64] [--markdown-out PATH]

Each scenario gets a fresh PostgreSQL schema holding a new ledger (its own Ed25519 signing key) and one
job token per job, made with the TokenStore API. `trainguard serve --store URL --workers 2` runs as a real
subprocess in its own process group on a free loopback port. The jobs run in `--processes` processes
(bench/server/jobs.py, several jobs per process, so that they do not share one GIL), each job with its
own `trainguard.relay.Spool` and `Delivery` under a temporary TRAINGUARD_HOME, putting a per-step summary
every `--step-ms` and an alert after a step with probability `--alert-probability`, for `--seconds`.

Scenarios:

* ``steady``: the server runs throughout.
* ``kill``: at `--kill-at` of the run the whole process group (uvicorn's master and workers) gets SIGKILL;
  after `--outage-s` the server starts again on the same port. The jobs keep putting into their spools.

Measured: events acknowledged per second; delivery latency (from `put()` to the acknowledgement, as the
Delivery removes the event from the spool) at p50/p99, in the kill scenario separately for events put
before the kill, during the outage (kill to ready again) and after; the time after the restart until
every event put before it was acknowledged; the sizes of acknowledged batches; the cost of `put()`.
Then the whole ledger is read back and every (job, seq) counted: an event missing or held twice, a spool
left undrained, `trainguard ledger verify` failing, or a token found in any output makes the run exit 1.

Exit codes: 0 every check held, 1 a check failed (named on stderr and in results.json), 2 the bench could
not run (no PostgreSQL, a server that never answered, a crash).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from trainguard.ledger import Ledger, SigningKey  # noqa: E402
from trainguard.relay import GAP_EVENT, DeliveryLimits  # noqa: E402
from trainguard.server import Scope, TokenStore  # noqa: E402

JOBS_SCRIPT = Path(__file__).with_name("jobs.py")
DEFAULT_WORKDIR = Path("/tmp/trainguard-bench-server")
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
ORIGIN = "bench.trainguard.example/server"
SCENARIOS = ("steady", "kill")
READY_TIMEOUT_S = 120.0
SCHEMA_VERSION = 1


def log(message: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The bench could not run (no PostgreSQL, a server that never answered, a job process that died)."""


# The server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def running_in_group(group: int) -> list[int]:
    """The processes of `group` that are not zombies: a killed worker, orphaned when its master died,
    stays a zombie until the machine's init reaps it, which may take a second."""
    running: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == group and fields[0] != "Z":
            running.append(int(stat.parent.name))
    return running


class ServeProcess:
    """`trainguard serve` in its own process group, so that one SIGKILL reaches uvicorn and its workers."""

    def __init__(self, store: str, key: Path, port: int, workers: int, logs: Path) -> None:
        self.store = store
        self.key = key
        self.port = port
        self.workers = workers
        self.logs = logs
        self.url = f"http://127.0.0.1:{port}"
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it and wait until /healthz answers; the CLOCK_MONOTONIC time it did."""
        self.starts += 1
        log_file = self.logs / f"serve-{self.starts}.log"
        command = [sys.executable, "-m", "trainguard", "serve", "--store", self.store, "--key", str(self.key)]
        command += ["--port", str(self.port), "--workers", str(self.workers)]
        with log_file.open("wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"trainguard serve exited {self.proc.returncode}: see {log_file}")
            if self.healthy():
                return time.monotonic()
            time.sleep(0.05)
        self.kill()
        raise BenchError(f"trainguard serve did not answer within {READY_TIMEOUT_S:g} s: see {log_file}")

    @property
    def group(self) -> int:
        """The process group of the running server (start_new_session: the leader's pid)."""
        assert self.proc is not None
        return self.proc.pid

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group, and wait until none of its processes runs any more."""
        if self.proc is None:
            return
        group = self.group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not running_in_group(group):
                return
            time.sleep(0.02)
        raise BenchError(f"processes of the server's group {group} outlived SIGKILL")

    def stop(self) -> None:
        """The ordinary way out: SIGTERM to uvicorn's master, which stops its workers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


# Where the CPU went


class CpuSampler:
    """CPU seconds by the server's processes, the jobs', PostgreSQL's and everyone else's, from /proc.

    Sampled every half second and once more before the server is killed, so a process that dies between
    samples loses at most its last half second. PostgreSQL is shared: its figure includes other users'.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.server_groups: set[int] = set()
        self.job_pids: set[int] = set()
        self.baseline = self._read()
        self.last: dict[int, tuple[str, int]] = {}
        self.started = time.monotonic()
        self.stopped: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> dict[int, tuple[str, int, int]]:
        """pid -> (command name, process group, utime + stime in ticks)."""
        found: dict[int, tuple[str, int, int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue  # gone since the listing
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text[text.rindex(")") + 2 :].split()
            found[int(stat.parent.name)] = (name, int(fields[2]), int(fields[11]) + int(fields[12]))
        return found

    def sample(self) -> None:
        now = self._read()
        with self._lock:
            for pid, (name, group, ticks) in now.items():
                if group in self.server_groups:
                    kind = "server"
                elif pid in self.job_pids:
                    kind = "jobs"
                elif name == "postgres":
                    kind = "postgresql"
                else:
                    kind = "other"
                spent = ticks - self.baseline.get(pid, ("", 0, 0))[2]
                self.last[pid] = (kind, max(0, spent))

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        wall = time.monotonic() - self.started
        seconds: dict[str, float] = collections.defaultdict(float)
        with self._lock:
            for kind, ticks in self.last.values():
                seconds[kind] += ticks / self.tick
        cores = os.cpu_count() or 1
        return {
            "wall_s": round(wall, 1),
            **{
                f"{kind}_cpu_s": round(seconds[kind], 1) for kind in ("server", "jobs", "postgresql", "other")
            },
            "idle_share": round(max(0.0, 1 - sum(seconds.values()) / (wall * cores)), 3),
        }


# The ledger's side


def with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = [*urllib.parse.parse_qsl(parts.query), *params.items()]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@contextlib.contextmanager
def fresh_schema(postgres: str, keep: bool) -> Iterator[str]:
    import psycopg

    schema = f"tg_bench_server_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(postgres, connect_timeout=5):
            pass
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL at {postgres} cannot be reached: {exc}") from exc
    try:
        yield schema
    finally:
        if keep:
            log(f"kept schema {schema}")
        else:
            with psycopg.connect(postgres, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def schema_bytes(postgres: str, schema: str) -> int:
    """Tables, their indexes and TOAST, of the whole schema (ledger, checkpoints, keys, tokens)."""
    import psycopg

    with psycopg.connect(postgres) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
            (schema,),
        ).fetchone()
    return int(row[0]) if row else 0


def count_ledger(store: str) -> tuple[dict[str, collections.Counter[int]], int, int]:
    """Per run, how often each payload seq is in the ledger; the gap events; entries in all."""
    seen: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    gaps = 0
    with Ledger.open(store, create=False) as ledger:
        size = ledger.size
        for _, event in ledger.entries():
            if event.type == GAP_EVENT:
                gaps += 1
            elif event.run_id is not None and isinstance(event.payload.get("seq"), int):
                seen[event.run_id][event.payload["seq"]] += 1
    return seen, gaps, size


@dataclass(frozen=True)
class Tally:
    """What the ledger holds against what the jobs' spools took."""

    expected: int
    found: int
    missing: list[tuple[str, int]]
    duplicated: list[tuple[str, int, int]]
    """(run, seq, times held) for every event held more than once."""
    unexpected: list[tuple[str, int]]
    """Events in the ledger whose put had failed in the job (not a loss; a put that raised after storing)."""


def tally(stored: dict[str, Sequence[int]], seen: dict[str, collections.Counter[int]]) -> Tally:
    missing: list[tuple[str, int]] = []
    duplicated: list[tuple[str, int, int]] = []
    unexpected: list[tuple[str, int]] = []
    for run in sorted(set(stored) | set(seen)):
        wanted = set(stored.get(run, ()))
        held = seen.get(run, collections.Counter())
        missing += [(run, seq) for seq in sorted(wanted) if held[seq] == 0]
        duplicated += [(run, seq, n) for seq, n in sorted(held.items()) if n > 1]
        unexpected += [(run, seq) for seq in sorted(held) if seq not in wanted]
    return Tally(
        expected=sum(len(v) for v in stored.values()),
        found=sum(sum(c.values()) for c in seen.values()),
        missing=missing,
        duplicated=duplicated,
        unexpected=unexpected,
    )


def verify_ledger(store: str, public_key: Path) -> tuple[int, dict[str, Any] | None, float]:
    started = time.monotonic()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "trainguard", "ledger", "verify", "--store", store),
            *("--public-key", str(public_key), "--format", "json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    return done.returncode, report, seconds


# The jobs


@dataclass
class JobProcess:
    proc: subprocess.Popen[str]
    out: Path


def start_jobs(args: argparse.Namespace, url: str, tokens: list[str], home: Path) -> list[JobProcess]:
    processes: list[JobProcess] = []
    per_process = math.ceil(args.jobs / args.processes)
    for p in range(args.processes):
        indexes = range(p * per_process, min(args.jobs, (p + 1) * per_process))
        if not indexes:
            break
        out = home / f"jobs-{p}.json"
        spec = {
            "home": str(home),
            "url": url,
            "seconds": args.seconds,
            "step_s": args.step_ms / 1000,
            "alert_probability": args.alert_probability,
            "poll_s": args.poll_s,
            "backoff_cap_s": args.backoff_cap_s,
            "drain_timeout_s": args.drain_timeout_s,
            "seed": args.seed * 100 + p,
            "out": str(out),
            "jobs": [{"index": i, "run": run_name(i), "token": tokens[i]} for i in indexes],
        }
        proc = subprocess.Popen(
            [sys.executable, str(JOBS_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TRAINGUARD_HOME": str(home)},
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        processes.append(JobProcess(proc, out))
    for job in processes:
        assert job.proc.stdout is not None
        if job.proc.stdout.readline().strip() != "ready":
            raise BenchError(f"a job process exited {job.proc.wait()} before it was ready")
    return processes


def run_name(index: int) -> str:
    return f"bench-job-{index:03d}"


def release(processes: list[JobProcess], start_at: float) -> None:
    for job in processes:
        assert job.proc.stdin is not None
        job.proc.stdin.write(f"{start_at!r}\n")
        job.proc.stdin.close()


def collect(processes: list[JobProcess], timeout: float) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every job's results, and the Delivery's failure streaks by kind over all jobs."""
    results: list[dict[str, Any]] = []
    streaks: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + timeout
    for job in processes:
        code = job.proc.wait(max(1.0, deadline - time.monotonic()))
        if code != 0:
            raise BenchError(f"a job process exited {code}")
        doc = json.loads(job.out.read_text())
        results += doc["jobs"]
        streaks.update(doc["failure_streaks"])
    return results, dict(streaks)


# Figures


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def latency(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    waits = [acked - put for put, acked in pairs]
    return {
        "events": len(waits),
        "p50_ms": _ms(percentile(waits, 0.50)),
        "p99_ms": _ms(percentile(waits, 0.99)),
        "max_ms": _ms(max(waits) if waits else None),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def figures(
    args: argparse.Namespace, jobs: list[dict[str, Any]], start_at: float, events: dict[str, float]
) -> dict[str, Any]:
    end_at = start_at + args.seconds
    pairs = [(put, acked) for job in jobs for put, acked in job["events"] if acked is not None]
    unacknowledged = sum(1 for job in jobs for _, acked in job["events"] if acked is None)
    acked_times = sorted(acked for _, acked in pairs)
    batches = [size for job in jobs for size in job["batch_sizes"]]
    costs = [cost for job in jobs for cost in job["put_cost"]]
    trips = [trip for job in jobs for trip in job["round_trips"]]
    in_window = sum(1 for t in acked_times if t <= end_at)
    result: dict[str, Any] = {
        "events_put": sum(len(job["events"]) for job in jobs),
        "events_acknowledged": len(pairs),
        "events_unacknowledged": unacknowledged,
        "offered_per_s": round(sum(len(job["events"]) for job in jobs) / args.seconds, 1),
        "acknowledged_per_s_during_run": round(in_window / args.seconds, 1),
        "last_ack_after_run_end_s": round(acked_times[-1] - end_at, 2) if acked_times else None,
        "latency": latency(pairs),
        "batches": {
            "count": len(batches),
            "mean": round(statistics.fmean(batches), 1) if batches else None,
            "p50": percentile(batches, 0.5),
            "max": max(batches) if batches else None,
        },
        "put_ms": {"p50": _ms(percentile(costs, 0.5)), "p99": _ms(percentile(costs, 0.99))},
        "round_trip_ms": {
            "p50": _ms(percentile(trips, 0.5)),
            "p99": _ms(percentile(trips, 0.99)),
            "max": _ms(max(trips) if trips else None),
        },
        "resends_answered_as_duplicates": sum(job["duplicates"] for job in jobs),
        "failed_tries": sum(job["failed_tries"] for job in jobs),
        "rejections": sum(job["rejections"] for job in jobs),
        "refused_by_full_spool": sum(job["refused"] for job in jobs),
        "put_errors": sum(len(job["put_errors"]) for job in jobs),
        "late_steps": sum(job["late_steps"] for job in jobs),
        "spools_not_drained": [job["run"] for job in jobs if job["remaining"] or job["gap_pending"]],
        "deliveries_stopped": [job["run"] for job in jobs if job["stopped"]],
    }
    if "killed_at" in events:
        killed, ready = events["killed_at"], events["ready_again_at"]
        before = [(p, a) for p, a in pairs if p < killed]
        during = [(p, a) for p, a in pairs if killed <= p < ready]
        after = [(p, a) for p, a in pairs if p >= ready]
        backlog = [a for p, a in pairs if p < ready]
        caught_up = max(backlog) if backlog else ready
        drained = sum(1 for p, a in pairs if killed <= a <= caught_up)
        result["outage"] = {
            "killed_after_s": round(killed - start_at, 2),
            "down_s": round(ready - killed, 2),
            "kill_to_processes_gone_s": round(events["gone_at"] - killed, 2),
            "restart_to_ready_s": round(ready - events["restarted_at"], 2),
            "backlog_drained_after_ready_s": round(caught_up - ready, 2),
            "acknowledged_while_draining_per_s": (
                round(drained / (caught_up - ready), 1) if caught_up > ready else None
            ),
            "latency_put_before_kill": latency(before),
            "latency_put_during_outage": latency(during),
            "latency_put_after_restart": latency(after),
        }
    return result


# One scenario


def run_scenario(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    folder = workdir / name
    shutil.rmtree(folder, ignore_errors=True)
    home = folder / "home"
    home.mkdir(parents=True)
    os.environ["TRAINGUARD_HOME"] = str(home)  # nothing the bench opens may fall back on the user's
    with fresh_schema(args.postgres, args.keep_schema) as schema:
        store = with_query(args.postgres, schema=schema)
        key = SigningKey.generate(ORIGIN)
        key_file, public_file = folder / "ledger.key", folder / "ledger.pub"
        key.save(key_file)
        key.verifier().save(public_file)
        Ledger.open(store, key=key).close()
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=6)
        with TokenStore.open(store, create=True) as token_store:
            tokens = [
                token_store.create(
                    Scope.JOB, expires_at=expires, created_by="bench", run=run_name(i), label="bench/server"
                ).token
                for i in range(args.jobs)
            ]
        server = ServeProcess(store, key_file, free_port(), args.workers, folder)
        log(f"{name}: starting trainguard serve ({args.workers} workers) on {server.url}, schema {schema}")
        events: dict[str, float] = {}
        processes: list[JobProcess] = []
        try:
            server.start()
            processes = start_jobs(args, server.url, tokens, home)
            cpu = CpuSampler()
            cpu.server_groups.add(server.group)
            cpu.job_pids.update(job.proc.pid for job in processes)
            start_at = time.monotonic() + 0.5
            release(processes, start_at)
            log(f"{name}: {args.jobs} jobs in {len(processes)} processes, {args.seconds:g} s")
            if name == "kill":
                kill_at = start_at + args.seconds * args.kill_at
                time.sleep(max(0.0, kill_at - time.monotonic()))
                cpu.sample()
                events["killed_at"] = time.monotonic()
                server.kill()
                events["gone_at"] = time.monotonic()
                log(f"{name}: SIGKILL sent to the server's process group; restarting in {args.outage_s:g} s")
                time.sleep(args.outage_s)
                events["restarted_at"] = time.monotonic()
                events["ready_again_at"] = server.start()
                cpu.server_groups.add(server.group)
                down = events["ready_again_at"] - events["killed_at"]
                log(f"{name}: the server answers again {down:.1f} s after the kill")
            jobs, streaks = collect(processes, args.seconds + args.drain_timeout_s + 120)
            cpu_seconds = cpu.stop()
        finally:
            for job in processes:
                if job.proc.poll() is None:  # only when the bench itself failed
                    job.proc.kill()
                    job.proc.wait()
            server.stop()
        log(f"{name}: reading the ledger back")
        seen, gaps, size = count_ledger(store)
        stored = {job["run"]: job["stored"] for job in jobs}
        count = tally(stored, seen)
        code, report, verify_s = verify_ledger(store, public_file)
        result = {
            "scenario": name,
            "server_starts": server.starts,
            **figures(args, jobs, start_at, events),
            "cpu": cpu_seconds,
            "failure_streaks_by_kind": streaks,
            "ledger": {
                "entries": size,
                "bytes": schema_bytes(args.postgres, schema),
                "verify_exit": code,
                "verify_ok": bool(report and report.get("ok")),
                "verify_s": round(verify_s, 2),
            },
            "count": {
                "expected": count.expected,
                "found": count.found,
                "missing": len(count.missing),
                "duplicated": len(count.duplicated),
                "unexpected": len(count.unexpected),
                "gap_events": gaps,
                "missing_first": [list(item) for item in count.missing[:20]],
                "duplicated_first": [list(item) for item in count.duplicated[:20]],
            },
        }
        outputs = [path.read_text(errors="replace") for path in sorted(folder.glob("serve-*.log"))]
        outputs.append(json.dumps(result))
        # The secret part alone: a log that cut a token short would still leak what matters.
        secrets_only = [token.split("_", 3)[3] for token in tokens]
        result["tokens_in_outputs"] = sum(1 for secret in secrets_only for text in outputs if secret in text)
        return result


def problems(result: dict[str, Any]) -> list[str]:
    """Why this scenario fails, if it does; speed never does."""
    found: list[str] = []
    count = result["count"]
    name = result["scenario"]
    if count["missing"]:
        found.append(f"{name}: {count['missing']} events lost, first {count['missing_first'][:5]}")
    if count["duplicated"]:
        found.append(
            f"{name}: {count['duplicated']} events held twice or more, first {count['duplicated_first'][:5]}"
        )
    if count["expected"] == 0:
        found.append(f"{name}: no event was put")
    if result["spools_not_drained"]:
        found.append(f"{name}: spools not drained: {', '.join(result['spools_not_drained'])}")
    if result["deliveries_stopped"]:
        found.append(
            f"{name}: deliveries stopped after rejections: {', '.join(result['deliveries_stopped'])}"
        )
    if result["put_errors"]:
        found.append(f"{name}: {result['put_errors']} puts failed in the jobs' spools")
    if result["events_unacknowledged"]:
        found.append(f"{name}: {result['events_unacknowledged']} events never acknowledged")
    if not result["ledger"]["verify_ok"] or result["ledger"]["verify_exit"] != 0:
        found.append(f"{name}: trainguard ledger verify exited {result['ledger']['verify_exit']}")
    if result["tokens_in_outputs"]:
        found.append(f"{name}: a token appears in the server's log or the results")
    if name == "kill" and result["server_starts"] != 2:
        found.append(f"{name}: the server was started {result['server_starts']} times, not 2")
    return found


# Output


def render(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run {when} on {platform.system()} {platform.machine()}; {os.cpu_count()} CPUs, no GPU; "
        f"Python {platform.python_version()}; PostgreSQL on 127.0.0.1.",
        f"Command: `{command}`",
        "",
        f"{args.jobs} jobs in {args.processes} processes, {args.seconds:g} s, a step summary every "
        f"{args.step_ms:g} ms and an alert after {args.alert_probability:.0%} of steps; delivery polls every "
        f"{args.poll_s:g} s and waits at most {args.backoff_cap_s:g} s between failed tries; "
        f"`trainguard serve --workers {args.workers}`. Jobs, server and PostgreSQL share "
        "the same cores.",
        "",
        "| Scenario | Events put | Acked / s during run | p50 ms | p99 ms | Mean batch | Lost | Duplicated "
        "| Resends answered as duplicates | Ledger entries | Ledger MB | verify |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines.extend(
        f"| {r['scenario']} | {r['events_put']:,} | {r['acknowledged_per_s_during_run']:,.1f} "
        f"| {r['latency']['p50_ms']} | {r['latency']['p99_ms']} | {r['batches']['mean']} "
        f"| {r['count']['missing']} | {r['count']['duplicated']} | {r['resends_answered_as_duplicates']} "
        f"| {r['ledger']['entries']:,} | {r['ledger']['bytes'] / 1e6:.1f} "
        f"| {'ok' if r['ledger']['verify_ok'] else 'FAILED'} ({r['ledger']['verify_s']} s) |"
        for r in results
    )
    for r in results:
        outage = r.get("outage")
        if not outage:
            continue
        lines += [
            "",
            "Kill and restart: SIGKILL to the server's process group "
            f"{outage['killed_after_s']} s into the run (all its processes gone "
            f"{outage['kill_to_processes_gone_s']} s later); started again {args.outage_s:g} s after that, "
            f"answering {outage['restart_to_ready_s']} s later (down {outage['down_s']} s in all). "
            "Every event put before it answered again was acknowledged "
            f"{outage['backlog_drained_after_ready_s']} s after it did "
            f"({outage['acknowledged_while_draining_per_s']} events/s acknowledged meanwhile).",
            "",
            "| Events put | Events | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, key in (
            ("before the kill", "latency_put_before_kill"),
            ("while the server was down", "latency_put_during_outage"),
            ("after it answered again", "latency_put_after_restart"),
        ):
            part = outage[key]
            lines.append(
                f"| {label} | {part['events']:,} | {part['p50_ms']} | {part['p99_ms']} | {part['max_ms']} |"
            )
    lines.append("")
    for r in results:
        lines.append(
            f"- {r['scenario']}: put() p50 {r['put_ms']['p50']} ms, p99 {r['put_ms']['p99']} ms; "
            f"an acknowledged batch's round trip p50 {r['round_trip_ms']['p50']} ms, p99 "
            f"{r['round_trip_ms']['p99']} ms, max {r['round_trip_ms']['max']} ms; "
            f"{r['batches']['count']:,} batches acknowledged ({r['batches']['count'] / args.seconds:.1f}/s; "
            f"median {r['batches']['p50']} events, largest "
            f"{r['batches']['max']}); {r['failed_tries']:,} failed tries "
            f"({_streaks(r['failure_streaks_by_kind'])}); last acknowledgement "
            f"{r['last_ack_after_run_end_s']} s after the run's end; {r['late_steps']} steps put late; "
            f"{r['count']['gap_events']} gap events."
        )
    for r in results:
        cpu = r["cpu"]
        lines.append(
            f"- {r['scenario']}, CPU seconds over {cpu['wall_s']} s on {os.cpu_count()} cores: server "
            f"{cpu['server_cpu_s']}, jobs {cpu['jobs_cpu_s']}, PostgreSQL {cpu['postgresql_cpu_s']}, "
            f"anything else on the machine {cpu['other_cpu_s']}; idle {cpu['idle_share']:.0%}."
        )
    return "\n".join(lines) + "\n"


def _streaks(kinds: dict[str, int]) -> str:
    if not kinds:
        return "none"
    return "streaks by kind: " + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 jobs in 2 processes for 8 s")
    parser.add_argument("--seconds", type=float, help="how long the jobs put events (default 60)")
    parser.add_argument("--jobs", type=int, help="simulated jobs (default 64)")
    parser.add_argument("--processes", type=int, help="processes the jobs run in (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    parser.add_argument("--step-ms", type=float, default=100.0, help="one step summary per job every N ms")
    parser.add_argument(
        "--alert-probability", type=float, default=0.02, help="an alert after this share of steps"
    )
    parser.add_argument(
        "--poll-s",
        type=float,
        default=DeliveryLimits().poll_s,
        help="how often an idle Delivery looks at its spool (default: the library's)",
    )
    parser.add_argument(
        "--backoff-cap-s",
        type=float,
        default=DeliveryLimits().backoff_cap_s,
        help="the longest a Delivery waits between failed tries (default: the library's)",
    )
    parser.add_argument(
        "--kill-at", type=float, help="kill the server at this share of the run (default 0.5)"
    )
    parser.add_argument("--outage-s", type=float, help="seconds between the kill and the restart (default 3)")
    parser.add_argument(
        "--drain-timeout-s", type=float, help="how long a job waits for its spool to drain (default 180)"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: steady,kill")
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL URL (a fresh schema per run)"
    )
    parser.add_argument("--keep-schema", action="store_true", help="do not drop the schemas afterwards")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="logs, spools and results.json")
    parser.add_argument("--markdown-out", type=Path, help="also write the markdown to this file")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    # The quick run kills early enough for the server to answer again while the jobs still put.
    quick = {
        "seconds": 8.0,
        "jobs": 4,
        "processes": 2,
        "outage_s": 1.0,
        "kill_at": 0.3,
        "drain_timeout_s": 90.0,
    }
    full = {
        "seconds": 60.0,
        "jobs": 64,
        "processes": 8,
        "outage_s": 3.0,
        "kill_at": 0.5,
        "drain_timeout_s": 180.0,
    }
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if not args.scenarios or set(args.scenarios) - set(SCENARIOS):
        parser.error(f"--scenarios takes some of {', '.join(SCENARIOS)}")
    if args.jobs < 1 or args.processes < 1 or args.seconds <= 0 or not 0 < args.kill_at < 1:
        parser.error("--jobs and --processes must be at least 1, --seconds positive, --kill-at in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(
        [".venv/bin/python", "bench/server/run.py", *(argv if argv is not None else sys.argv[1:])]
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = [run_scenario(name, args, args.workdir) for name in args.scenarios]
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    except Exception:
        # A crash is "could not measure" (2), never "events lost" (1).
        traceback.print_exc()
        return 2
    failures = [problem for result in results for problem in problems(result)]
    doc = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "machine": {"system": platform.system(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {
            name: getattr(args, name)
            for name in (
                *("jobs", "processes", "workers", "seconds", "step_ms", "alert_probability"),
                *("poll_s", "backoff_cap_s", "kill_at", "outage_s"),
            )
        },
        "scenarios": results,
        "problems": failures,
    }
    (args.workdir / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    markdown = render(results, args, command)
    print(markdown)
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(markdown)
    for problem in failures:
        log(f"FAILED: {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
