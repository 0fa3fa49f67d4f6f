"""A job's durable, bounded queue of ledger events waiting to reach `trainguard serve`.

from trainguard.relay._spool import Spool, SpoolFull

with Spool.open("r42") as spool:              # $TRAINGUARD_HOME/spool/r42-<hash>.db
    key = spool.put(new_event("monitor.signal", {...}, run_id="r42"))   # durable when it returns
    batch = spool.oldest(500, 4 << 20)        # what a Delivery sends next, oldest first
    spool.remove([item.seq for item in batch])  # only once the server acknowledged them

One file per run, not per process: the server's endpoint and a job token are per run, and a job restarted
after a crash (same run id) opens the same file and delivers what its predecessor left. Several processes
may share the file: SQLite serialises their writes.

Idempotency keys read ``<spool id>/<sequence>``. The spool id is 128 random bits drawn when the file is
created; the sequence is an AUTOINCREMENT rowid, which SQLite never hands out twice in one file, even after
the newest rows are deleted. The key is stored with the event in the same transaction, so every retry and
every restart sends the same key for the same event, and two events never share one: a file deleted and
made again gets a new spool id, so its sequence 1 is not mistaken for the old file's sequence 1. (A hash of
the event would make two identical events one; a bare sequence would collide across files.)

Durability: WAL with ``synchronous=FULL``: a commit fsyncs the WAL before `put` returns, so neither a
killed process nor a power cut loses an acknowledged event. A crash during `put` loses only that event,
and its caller never got a key for it.

Bounds: a spool holds at most `SpoolLimits.max_events` events and `max_bytes` bytes of canonical JSON. A
`put` beyond them raises SpoolFull and adds the event to a durable count of dropped events; once delivery
frees space, the count is spooled as one ``spool.gap`` event in the dropped events' place, so the server
records exactly how many were lost and when. Nothing is ever dropped silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from trainguard.errors import StoreError, UsageError
from trainguard.ledger._events import Event, new_event, utc_now

__all__ = ["GAP_EVENT", "Spool", "SpoolFull", "SpoolLimits", "SpoolStats", "SpooledEvent", "default_path"]

GAP_EVENT = "spool.gap"
"""The type of the event that stands in for events the spool had to refuse."""

_FORMAT = "trainguard-spool-1"
_BUSY_TIMEOUT_MS = 30_000
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # AUTOINCREMENT, not a plain rowid: a plain one reuses the largest seq once it is deleted, and a reused
    # key would be taken by the server for a duplicate of an event it already holds.
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL)",
    # One row of running totals, updated in the transaction that changes `events`, so a bound check is one
    # read and not a scan; and the pending gap, durable until it is spooled.
    """CREATE TABLE IF NOT EXISTS totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        events INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        gap_events INTEGER NOT NULL,
        gap_bytes INTEGER NOT NULL,
        gap_first TEXT,
        gap_last TEXT,
        dropped_total INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO totals VALUES (1, 0, 0, 0, 0, NULL, NULL, 0)",
)
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class SpoolLimits:
    """How much a spool holds before it refuses events: 100,000 events or 256 MiB of canonical JSON.

    At a few events per training step, that is hours of an unreachable server.
    """

    max_events: int = 100_000
    max_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        # Room for at least the gap event itself, or a full spool could never say what it lost.
        if self.max_events < 2:
            raise UsageError(f"a spool must hold at least 2 events, not {self.max_events}")
        if self.max_bytes < 4096:
            raise UsageError(f"a spool must hold at least 4096 bytes, not {self.max_bytes}")


@dataclasses.dataclass(frozen=True)
class SpoolStats:
    """What a spool holds now; `gap_pending` events were refused and are not yet reported by a gap event."""

    events: int
    bytes: int
    gap_pending: int
    dropped_total: int


@dataclasses.dataclass(frozen=True)
class SpooledEvent:
    seq: int
    key: str
    data: bytes
    """The event's RFC 8785 canonical JSON."""


class SpoolFull(StoreError):
    """The spool is at its bounds: the event was not stored, and is counted in the next gap event."""

    def __init__(self, path: Path, stats: SpoolStats) -> None:
        super().__init__(
            f"event spool {path} is full ({stats.events} events, {stats.bytes} bytes): the event is "
            f"dropped, {stats.gap_pending} so far; the server is told how many once delivery frees space",
            hint="check that the server is reachable, or raise the spool's limits",
        )
        self.stats = stats


def default_path(run_id: str) -> Path:
    """$TRAINGUARD_HOME/spool/<run id, made safe>-<hash of the run id>.db: readable, and never shared by
    two runs whose ids differ only in characters a file name cannot hold."""
    from trainguard.ledger._ledger import default_home

    digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    readable = _UNSAFE_NAME.sub("_", run_id)[:64]
    return default_home() / "spool" / f"{readable}-{digest}.db"


class Spool:
    """A spool file, safe to share between threads (one lock) and between processes (SQLite's)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, run_id: str, spool_id: str, limits: SpoolLimits):
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.run_id = run_id
        self.spool_id = spool_id
        self.limits = limits

    @classmethod
    def open(cls, run_id: str, *, path: str | Path | None = None, limits: SpoolLimits | None = None) -> Spool:
        """The spool of `run_id` at `path` (default: `default_path`), created when missing.

        StoreError when the file cannot be opened or belongs to another run.
        """
        given: object = run_id  # checked as an object: callers outside mypy may pass anything
        if not isinstance(given, str) or not given:
            raise UsageError(f"a spool needs a run id (a non-empty string), not {given!r}")
        where = Path(path) if path is not None else default_path(run_id)
        try:
            conn = _connect(where)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the event spool {where}: {exc}") from exc
        try:
            stored_run, spool_id = _identity(conn, run_id)
        except BaseException:
            conn.close()
            raise
        if stored_run != run_id:
            conn.close()
            raise StoreError(
                f"event spool {where} belongs to run {stored_run!r}, not {run_id!r}",
                hint="give each run its own spool file",
            )
        return cls(conn, where, run_id, spool_id, limits or SpoolLimits())

    def key(self, seq: int) -> str:
        return f"{self.spool_id}/{seq}"

    def put(self, event: Event) -> str:
        """Store `event`; its idempotency key once it is durable. SpoolFull when the spool is at its bounds
        (the event is counted as dropped); UsageError for an event JSON cannot carry; StoreError when the
        file cannot be written."""
        return self.put_many([event])[0]

    def put_many(self, events: Sequence[Event]) -> list[str]:
        """Store `events` in one transaction (one fsync): all of them, or none and SpoolFull, which counts
        every one as dropped."""
        encoded = [event.canonical() for event in events]
        if not encoded:
            return []
        with self._transaction() as cur:
            self._spool_gap(cur)
            count, size = _totals(cur)
            added = sum(len(data) for data in encoded)
            if count + len(encoded) > self.limits.max_events or size + added > self.limits.max_bytes:
                now = utc_now()
                cur.execute(
                    "UPDATE totals SET gap_events = gap_events + ?, gap_bytes = gap_bytes + ?,"
                    " gap_first = COALESCE(gap_first, ?), gap_last = ?, dropped_total = dropped_total + ?",
                    (len(encoded), added, now, now, len(encoded)),
                )
                full = SpoolFull(self.path, self._stats(cur))
            else:
                return [self._insert(cur, data) for data in encoded]
        raise full

    def oldest(self, max_events: int, max_bytes: int) -> list[SpooledEvent]:
        """The oldest events, at most `max_events` and `max_bytes` of them, but always one if any."""
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT seq, event FROM events ORDER BY seq LIMIT ?", (max(1, max_events),)
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the event spool {self.path}: {exc}") from exc
        batch: list[SpooledEvent] = []
        size = 0
        for seq, data in rows:
            size += len(data)
            if batch and size > max_bytes:
                break
            batch.append(SpooledEvent(int(seq), self.key(int(seq)), bytes(data)))
        return batch

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete delivered events; how many were still here. Spools the pending gap when it now fits."""
        wanted = sorted(set(seqs))
        if not wanted:
            return 0
        with self._transaction() as cur:
            removed = 0
            freed = 0
            for seq in wanted:
                row = cur.execute(
                    "DELETE FROM events WHERE seq = ? RETURNING length(event)", (seq,)
                ).fetchone()
                if row is not None:
                    removed += 1
                    freed += int(row[0])
            cur.execute("UPDATE totals SET events = events - ?, bytes = bytes - ?", (removed, freed))
            self._spool_gap(cur)
        return removed

    def stats(self) -> SpoolStats:
        with self._lock:
            try:
                return self._stats(self._conn.cursor())
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the event spool {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r}, run={self.run_id!r})"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        # IMMEDIATE takes the write lock before reading the totals, so two processes cannot both see room
        # for one more event.
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.rollback()
                raise StoreError(f"cannot write the event spool {self.path}: {exc}") from exc

    def _insert(self, cur: sqlite3.Cursor, data: bytes) -> str:
        cur.execute("INSERT INTO events (event) VALUES (?)", (data,))
        cur.execute("UPDATE totals SET events = events + 1, bytes = bytes + ?", (len(data),))
        seq = cur.lastrowid
        assert seq is not None
        return self.key(seq)

    def _spool_gap(self, cur: sqlite3.Cursor) -> None:
        """Turn the pending count of dropped events into a gap event, if there is one and it fits."""
        row = cur.execute("SELECT gap_events, gap_bytes, gap_first, gap_last FROM totals").fetchone()
        dropped, dropped_bytes, first, last = row
        if not dropped:
            return
        gap = new_event(
            GAP_EVENT,
            {
                "dropped_events": dropped,
                "dropped_bytes": dropped_bytes,
                "first_dropped_at": first,
                "last_dropped_at": last,
                "spool": self.spool_id,
                "limits": {"max_events": self.limits.max_events, "max_bytes": self.limits.max_bytes},
            },
            run_id=self.run_id,
        ).canonical()
        count, size = _totals(cur)
        if count + 1 > self.limits.max_events or size + len(gap) > self.limits.max_bytes:
            return
        self._insert(cur, gap)
        cur.execute("UPDATE totals SET gap_events = 0, gap_bytes = 0, gap_first = NULL, gap_last = NULL")

    @staticmethod
    def _stats(cur: sqlite3.Cursor) -> SpoolStats:
        events, size, gap, dropped = cur.execute(
            "SELECT events, bytes, gap_events, dropped_total FROM totals"
        ).fetchone()
        return SpoolStats(int(events), int(size), int(gap), int(dropped))


def _totals(cur: sqlite3.Cursor) -> tuple[int, int]:
    events, size = cur.execute("SELECT events, bytes FROM totals").fetchone()
    return int(events), int(size)


def _connect(path: Path) -> sqlite3.Connection:
    # Events name hosts, users and files: the spool is the job owner's alone. SQLite gives its -wal and
    # -shm files the database file's mode.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"the file system does not support WAL (journal mode {mode})")
        # FULL: in WAL mode, NORMAL may lose the last commits on a power cut; FULL fsyncs each commit.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def _identity(conn: sqlite3.Connection, run_id: str) -> tuple[str, str]:
    """(run id, spool id) recorded in the file; written now if the file is new."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (_FORMAT,))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('run_id', ?)", (run_id,))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('spool_id', ?)", (secrets.token_hex(16),))
        conn.execute("COMMIT")
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the event spool's identity: {exc}") from exc
    if meta.get("format") != _FORMAT:
        raise StoreError(f"not an event spool of this version: format {meta.get('format')!r}")
    return str(meta["run_id"]), str(meta["spool_id"])
