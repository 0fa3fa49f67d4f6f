"""Ledger benchmark: trainguard's Merkle proofs and durable appends against pymerkle, side by side.

Usage (from the repository root)::

    .venv/bin/python bench/ledger/run.py [--quick] [--workdir DIR] [--postgres URL] [--markdown-out PATH]

Part 1, proofs at N entries (1,000,000; 50,000 with ``--quick``): the median time to make and to verify an
inclusion proof and a consistency proof, at random indices and sizes, for

* trainguard over an in-memory node table filled from ``Frontier`` (the Merkle code alone);
* trainguard over a SQLite ``Ledger`` holding N real events (node reads included);
* pymerkle ``InmemoryTree`` (``prove_inclusion``/``prove_consistency``, ``verify_inclusion``/
  ``verify_consistency``).

Part 2, durable appends per second (every append committed with fsync before it returns):

* trainguard ``Ledger`` on SQLite: ``append_many`` in batches of 500 and ``append`` one event at a time, with
  1 writer process and with 8; ``append`` from 8 threads of one process (they share commits);
* trainguard ``Ledger`` on PostgreSQL with 8 writer processes (skipped when the server cannot be reached);
* pymerkle ``SqliteTree``, which commits each ``append_entry`` (it has no batch append).

Events are made before the clock starts; canonical JSON, hashing, signing and commit are timed. Writers
start together and the rate is all events over the time from the first start to the last finish.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import platform
import random
import secrets
import shutil
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from trainguard.ledger._events import Actor, Event  # noqa: E402
from trainguard.ledger._merkle import (  # noqa: E402
    Frontier,
    NodeKey,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

DEFAULT_WORKDIR = Path("/tmp/trainguard-bench-ledger")
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
GOALS = {"sqlite": 20_000.0, "postgresql": 5_000.0, "verify_ms": 1.0}
ACTOR = Actor(user="bench", uid=1000, host="bench-host", pid=1)
BATCH = 500


def log(message: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def make_event(i: int, rank: int = 0) -> Event:
    """A typical training event: a checkpoint written, with its digest."""
    return Event(
        type="checkpoint.save",
        time="2026-11-27T23:35:08.123456Z",
        actor=ACTOR,
        run_id="bench-run",
        rank=rank,
        payload={
            "path": f"/ckpt/step_{i:09d}.pt",
            "sha256": hashlib.sha256(i.to_bytes(8, "big")).hexdigest(),
            "step": i,
            "loss": 1.0 / (i + 1),
        },
    )


def median_us(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e6


# --------------------------------------------------------------------------- part 1: proofs


class MemoryNodes:
    """trainguard's NodeSource over a dict, filled as a store fills its node table."""

    def __init__(self) -> None:
        self.table: dict[NodeKey, bytes] = {}

    def nodes(self, keys: Collection[NodeKey]) -> Mapping[NodeKey, bytes]:
        table = self.table
        return {key: table[key] for key in keys}


def _time_proofs(
    label: str,
    n: int,
    samples: int,
    leaf_of: Callable[[int], bytes],
    prove_incl: Callable[[int, int], Any],
    check_incl: Callable[[bytes, int, int, Any, bytes], None],
    prove_cons: Callable[[int, int], Any],
    check_cons: Callable[[int, int, bytes, bytes, Any], None],
    root_of: Callable[[int], bytes],
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    gen_i: list[float] = []
    ver_i: list[float] = []
    gen_c: list[float] = []
    ver_c: list[float] = []
    root = root_of(n)
    clock = time.perf_counter
    for _ in range(samples):
        index = rng.randrange(n)
        leaf = leaf_of(index)
        t0 = clock()
        proof = prove_incl(index, n)
        t1 = clock()
        check_incl(leaf, index, n, proof, root)
        t2 = clock()
        gen_i.append(t1 - t0)
        ver_i.append(t2 - t1)
        old = rng.randrange(1, n)
        old_root = root_of(old)
        t0 = clock()
        proof = prove_cons(old, n)
        t1 = clock()
        check_cons(old, n, old_root, root, proof)
        t2 = clock()
        gen_c.append(t1 - t0)
        ver_c.append(t2 - t1)
    result = {
        "impl": label,
        "entries": n,
        "samples": samples,
        "incl_gen_us": median_us(gen_i),
        "incl_verify_us": median_us(ver_i),
        "cons_gen_us": median_us(gen_c),
        "cons_verify_us": median_us(ver_c),
    }
    log(
        f"  {label}: inclusion make {result['incl_gen_us']:.1f} us, verify {result['incl_verify_us']:.1f} us;"
        f" consistency make {result['cons_gen_us']:.1f} us, verify {result['cons_verify_us']:.1f} us"
    )
    return result


def bench_trainguard_memory(n: int, samples: int) -> dict[str, Any]:
    log(f"trainguard, in-memory nodes: building a tree of {n:,} leaves")
    source = MemoryNodes()
    table = source.table
    frontier = Frontier.empty()
    entries = [i.to_bytes(8, "big") for i in range(n)]
    t0 = time.perf_counter()
    for e in entries:
        for key, value in frontier.append(leaf_hash(e)):
            table[key] = value
    build_s = time.perf_counter() - t0
    result = _time_proofs(
        "trainguard (memory)",
        n,
        samples,
        lambda i: leaf_hash(entries[i]),
        lambda i, size: inclusion_proof(i, size, source),
        verify_inclusion,
        lambda old, new: consistency_proof(old, new, source),
        verify_consistency,
        lambda size: root_hash(size, source),
        seed=1,
    )
    result["build_s"] = build_s
    return result


def _load_ledger(path: Path, key_text: str, n: int) -> float:
    """Fill a SQLite ledger with n events in batches of 10,000; seconds taken."""
    from trainguard.ledger._keys import SigningKey
    from trainguard.ledger._ledger import Ledger

    key = SigningKey.from_text(key_text)
    with Ledger.open(path, key=key, origin="bench/proofs") as ledger:
        have = ledger.size
        t0 = time.perf_counter()
        step = 10_000
        for start in range(have, n, step):
            ledger.append_many([make_event(i) for i in range(start, min(n, start + step))])
            if start // step % 10 == 0:
                log(f"  loaded {min(n, start + step):,} / {n:,}")
        return time.perf_counter() - t0 if have < n else 0.0


def bench_trainguard_sqlite(n: int, samples: int, workdir: Path, key_text: str) -> dict[str, Any] | None:
    try:
        from trainguard.ledger._ledger import Ledger
    except ImportError as exc:
        log(f"trainguard SQLite ledger unavailable ({exc}); skipped")
        return None
    from trainguard.ledger._keys import SigningKey

    path = workdir / f"proofs-{n}.db"
    log(f"trainguard, SQLite ledger: {n:,} events in {path}")
    if path.exists():
        with Ledger.open(path) as ledger:
            if ledger.size > n:
                path.unlink()
    load_s = _load_ledger(path, key_text, n)
    key = SigningKey.from_text(key_text)
    with Ledger.open(path, key=key) as ledger:
        entries = {}

        def leaf_of(i: int) -> bytes:
            if i not in entries:
                entries[i] = leaf_hash(ledger.entry(i).canonical())
            return entries[i]

        result = _time_proofs(
            "trainguard (SQLite ledger)",
            n,
            samples,
            leaf_of,
            lambda i, size: ledger.inclusion_proof(i, size),
            verify_inclusion,
            lambda old, new: ledger.consistency_proof(old, new),
            verify_consistency,
            lambda size: ledger.root(size),
            seed=1,
        )
    result["build_s"] = load_s
    return result


def bench_pymerkle_memory(n: int, samples: int) -> dict[str, Any] | None:
    try:
        import pymerkle
    except ImportError:
        log("pymerkle not installed; skipped")
        return None
    log(f"pymerkle InmemoryTree: building a tree of {n:,} leaves")
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    entries = [i.to_bytes(8, "big") for i in range(n)]
    t0 = time.perf_counter()
    for e in entries:
        tree.append_entry(e)
    build_s = time.perf_counter() - t0

    # pymerkle counts leaves from 1; its proofs carry their own sizes and structure.
    def check_incl(leaf: bytes, index: int, size: int, proof: Any, root: bytes) -> None:
        pymerkle.verify_inclusion(leaf, root, proof)

    def check_cons(old: int, new: int, old_root: bytes, new_root: bytes, proof: Any) -> None:
        pymerkle.verify_consistency(old_root, new_root, proof)

    result = _time_proofs(
        f"pymerkle {pymerkle_version()} InmemoryTree",
        n,
        samples,
        lambda i: tree.get_leaf(i + 1),
        lambda i, size: tree.prove_inclusion(i + 1, size),
        check_incl,
        lambda old, new: tree.prove_consistency(old, new),
        check_cons,
        lambda size: tree.get_root(size),
        seed=1,
    )
    result["build_s"] = build_s
    # Same hashing: the roots must agree, or the comparison is meaningless.
    frontier = Frontier.empty()
    for e in entries[:1000]:
        frontier.append(leaf_hash(e))
    assert tree.get_root(1000) == frontier.root(), "pymerkle and trainguard disagree on the root"
    return result


def pymerkle_version() -> str:
    from importlib.metadata import version

    try:
        return version("pymerkle")
    except Exception:
        return "?"


# --------------------------------------------------------------------------- part 2: appends


def _writer(
    location: str,
    key_text: str,
    mode: str,
    count: int,
    rank: int,
    threads: int,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """One writer process: open the ledger, wait for the start, append `count` events, report times."""
    from trainguard.ledger._keys import SigningKey
    from trainguard.ledger._ledger import Ledger

    events = [make_event(rank * 10_000_000 + i, rank) for i in range(count)]
    try:
        with Ledger.open(location, key=SigningKey.from_text(key_text)) as ledger:
            ready.wait()
            go.wait()
            start = time.monotonic()
            if mode == "batch":
                for i in range(0, count, BATCH):
                    ledger.append_many(events[i : i + BATCH])
            elif threads > 1:
                per = (count + threads - 1) // threads

                def work(part: Sequence[Event]) -> None:
                    for e in part:
                        ledger.append(e)

                pool = [
                    threading.Thread(target=work, args=(events[t * per : (t + 1) * per],))
                    for t in range(threads)
                ]
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
            else:
                for e in events:
                    ledger.append(e)
            end = time.monotonic()
        out.put((rank, start, end, count, ""))
    except BaseException as exc:  # report, so the parent does not wait forever
        out.put((rank, 0.0, 0.0, 0, f"{type(exc).__name__}: {exc}"))


def run_writers(
    location: str, key_text: str, mode: str, writers: int, per_writer: int, threads: int = 1
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(writers + 1)
    go = ctx.Event()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(location, key_text, mode, per_writer, r, threads, ready, go, out))
        for r in range(writers)
    ]
    for p in procs:
        p.start()
    ready.wait(timeout=300)
    go.set()
    results = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    errors = [r[4] for r in results if r[4]]
    if errors:
        raise RuntimeError(f"writer failed: {errors[0]}")
    start = min(r[1] for r in results)
    end = max(r[2] for r in results)
    total = sum(r[3] for r in results)
    return {"events": total, "seconds": end - start, "per_s": total / (end - start)}


def bench_appends(args: argparse.Namespace, workdir: Path, key_text: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        import trainguard.ledger._ledger  # noqa: F401
    except ImportError as exc:
        log(f"trainguard Ledger unavailable ({exc}); trainguard appends skipped")
    else:
        batch_n = 20_000 if args.quick else 200_000
        single_n = 300 if args.quick else 2_000
        plans = [
            ("sqlite", "batch", 1, batch_n, 1),
            ("sqlite", "batch", 8, batch_n // 8, 1),
            ("sqlite", "single", 1, single_n, 1),
            ("sqlite", "single", 8, single_n // 8, 1),
            ("sqlite", "single", 1, single_n * 4, 8),
        ]
        pg = postgres_schema(args.postgres) if not args.no_postgres else None
        if pg is not None:
            plans += [
                ("postgresql", "batch", 8, batch_n // 8, 1),
                ("postgresql", "single", 8, single_n // 8, 1),
                ("postgresql", "single", 1, single_n * 4, 8),
            ]
        for backend, mode, writers, per_writer, threads in plans:
            if backend == "sqlite":
                location = str(workdir / f"append-{mode}-{writers}-{threads}.db")
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        Path(location + suffix).unlink()
                _create_ledger(location, key_text)
            else:
                assert pg is not None
                location = pg.fresh()
                _create_ledger(location, key_text)
            how = "append_many(500)" if mode == "batch" else "append()"
            who = f"{writers} process{'es' if writers > 1 else ''}" + (
                f" x {threads} threads" if threads > 1 else ""
            )
            log(f"trainguard {backend}: {who}, {how}, {writers * per_writer:,} events")
            r = run_writers(location, key_text, mode, writers, per_writer, threads)
            _check_ledger(location, writers * per_writer)
            log(f"  {r['per_s']:,.0f} events/s")
            rows.append({"impl": "trainguard", "backend": backend, "call": how, "writers": who, **r})
        if pg is not None:
            pg.cleanup()
    rows.extend(bench_pymerkle_appends(args, workdir))
    return rows


def _create_ledger(location: str, key_text: str) -> None:
    from trainguard.ledger._keys import SigningKey
    from trainguard.ledger._ledger import Ledger

    Ledger.open(location, key=SigningKey.from_text(key_text), origin="bench/appends").close()


def _check_ledger(location: str, expected: int) -> None:
    from trainguard.ledger._ledger import Ledger

    with Ledger.open(location) as ledger:
        if ledger.size != expected:
            raise RuntimeError(f"{location} holds {ledger.size} entries, expected {expected}")


class _Postgres:
    """A fresh schema per run in the given database, dropped at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.schemas: list[str] = []

    def fresh(self) -> str:
        import psycopg

        name = f"tg_bench_{secrets.token_hex(4)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        self.schemas.append(name)
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}options=-csearch_path%3D{name}"

    def cleanup(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            for name in self.schemas:
                conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def postgres_schema(url: str) -> _Postgres | None:
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        log(f"PostgreSQL at {url} unavailable ({exc}); PostgreSQL appends skipped")
        return None
    return _Postgres(url)


def bench_pymerkle_appends(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    try:
        import pymerkle
    except ImportError:
        return []
    n = 300 if args.quick else 2_000
    path = workdir / "pymerkle.db"
    for suffix in ("", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(str(path) + suffix).unlink()
    entries = [make_event(i).canonical() for i in range(n)]
    log(f"pymerkle SqliteTree: 1 writer, append_entry(), {n:,} events")
    with pymerkle.SqliteTree(str(path)) as tree:
        t0 = time.perf_counter()
        for e in entries:
            tree.append_entry(e)
        seconds = time.perf_counter() - t0
    log(f"  {n / seconds:,.0f} events/s")
    return [
        {
            "impl": f"pymerkle {pymerkle_version()}",
            "backend": "sqlite",
            "call": "append_entry()",
            "writers": "1 process",
            "events": n,
            "seconds": seconds,
            "per_s": n / seconds,
        }
    ]


# --------------------------------------------------------------------------- report


def render(results: dict[str, Any]) -> str:
    lines = [
        f"Run {results['when']} on {results['machine']}; {results['cpus']} CPUs; Python {results['python']}.",
        "",
    ]
    proofs = [p for p in results["proofs"] if p]
    if proofs:
        peer = next((p for p in proofs if p["impl"].startswith("pymerkle")), None)
        lines += [
            f"Proofs at {proofs[0]['entries']:,} entries, median over random indices and sizes "
            "(microseconds; x = pymerkle time / this time):",
            "",
            "| Implementation | Proofs | Build (s) | Inclusion: make | verify | Consistency: make | verify |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for p in proofs:
            cells = []
            for k in ("incl_gen_us", "incl_verify_us", "cons_gen_us", "cons_verify_us"):
                ratio = f" ({peer[k] / p[k]:.1f}x)" if peer is not None and p is not peer else ""
                cells.append(f"{p[k]:,.1f}{ratio}")
            lines.append(
                f"| {p['impl']} | {p['samples']:,} | {p.get('build_s', 0):,.1f} | " + " | ".join(cells) + " |"
            )
        best = max(p["incl_verify_us"] for p in proofs if p["impl"].startswith("trainguard"))
        lines += [
            "",
            f"Goal: verify < {GOALS['verify_ms']:.0f} ms at 1M entries: worst trainguard inclusion verify "
            f"{best:.1f} us -> {'met' if best < GOALS['verify_ms'] * 1000 else 'MISSED'}.",
            "",
        ]
    appends = results["appends"]
    if appends:
        peer_rate = next((a["per_s"] for a in appends if a["impl"].startswith("pymerkle")), None)
        lines += [
            "Durable appends (each call committed with fsync before it returns; x = this rate / pymerkle's):",
            "",
            "| Implementation | Store | Call | Writers | Events | Seconds | Events/s |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for a in appends:
            ratio = (
                f" ({a['per_s'] / peer_rate:.1f}x)"
                if peer_rate and not a["impl"].startswith("pymerkle")
                else ""
            )
            lines.append(
                f"| {a['impl']} | {a['backend']} | {a['call']} | {a['writers']} | {a['events']:,} | "
                f"{a['seconds']:.2f} | {a['per_s']:,.0f}{ratio} |"
            )
        lines.append("")
        for backend, goal in (("sqlite", GOALS["sqlite"]), ("postgresql", GOALS["postgresql"])):
            rates = [
                a["per_s"]
                for a in appends
                if a["impl"] == "trainguard" and a["backend"] == backend and a["writers"].startswith("8 ")
            ]
            if rates:
                top = max(rates)
                lines.append(
                    f"Goal: >= {goal:,.0f} appends/s on {backend} with 8 writers: best {top:,.0f}/s -> "
                    f"{'met' if top >= goal else 'MISSED'}."
                )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 50,000-entry trees, fewer appends")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"ledger files live here (default {DEFAULT_WORKDIR})",
    )
    parser.add_argument("--entries", type=int, help="tree size for the proof part (default 1,000,000)")
    parser.add_argument("--samples", type=int, help="proofs timed per implementation (default 2,000)")
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help=f"database URL (default {DEFAULT_POSTGRES})"
    )
    parser.add_argument(
        "--sqlite-samples", type=int, help="proofs timed on the SQLite ledger (default: as --samples)"
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL appends")
    parser.add_argument(
        "--no-sqlite-proofs", action="store_true", help="skip loading a SQLite ledger for proofs"
    )
    parser.add_argument("--only", choices=["proofs", "appends"], help="run one part only")
    parser.add_argument("--markdown-out", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first (reloads the ledger)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    workdir: Path = args.workdir
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n = args.entries or (50_000 if args.quick else 1_000_000)
    samples = args.samples or (300 if args.quick else 2_000)
    key_text = _bench_key(workdir)
    results: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "proofs": [],
        "appends": [],
    }
    if args.only in (None, "proofs"):
        results["proofs"].append(bench_trainguard_memory(n, samples))
        if not args.no_sqlite_proofs:
            sqlite_samples = args.sqlite_samples or samples
            results["proofs"].append(bench_trainguard_sqlite(n, sqlite_samples, workdir, key_text))
        results["proofs"].append(bench_pymerkle_memory(n, samples))
    if args.only in (None, "appends"):
        results["appends"] = bench_appends(args, workdir, key_text)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    table = render(results)
    print(table)
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(table)
    return 0


def _bench_key(workdir: Path) -> str:
    """One signing key for every bench ledger, kept so that a reused proof ledger still opens."""
    from trainguard.ledger._keys import SigningKey

    path = workdir / "bench.key"
    if path.exists():
        return SigningKey.load(path).text()
    key = SigningKey.generate("bench")
    key.save(path)
    return key.text()


if __name__ == "__main__":
    sys.exit(main())
