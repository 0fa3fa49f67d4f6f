"""A witness for signed checkpoints: the server side of C2SP tlog-witness (``POST /add-checkpoint``).

For every log it is configured with (origin -> log verifier key) the witness remembers the latest checkpoint
it cosigned, in a small SQLite file. It cosigns a new checkpoint only if the log's signature verifies, the
client's ``old`` size equals the remembered size, and a consistency proof shows the new tree extends the
remembered one. A log that rolls back or forks its history can then no longer collect this witness's
cosignature. The new state is committed to disk before the cosignature leaves the process.

Status codes: 200 cosignature line; 400 malformed request; 403 no valid signature by the log's key;
404 unknown origin or path; 409 ``old`` is not the remembered size (body: that size), or the same size with
a different root; 413 request too large; 422 consistency proof does not verify.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import logging
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from trainguard.errors import StoreError, TrainguardError, UsageError, VerificationFailed
from trainguard.ledger._keys import ALG_COSIGNATURE_V1, ALG_ED25519, SigningKey, VerifierKey, b64decode_strict
from trainguard.ledger._merkle import EMPTY_ROOT, HASH_SIZE, verify_consistency
from trainguard.ledger._note import MAX_NOTE_BYTES, Checkpoint, Note, cosign, open_checkpoint

__all__ = [
    "MAX_PROOF_LINES",
    "MAX_REQUEST_BYTES",
    "SIZE_CONTENT_TYPE",
    "WitnessState",
    "WitnessStore",
    "serve",
]

logger = logging.getLogger("trainguard.witness")

MAX_REQUEST_BYTES = MAX_NOTE_BYTES + 4096  # a note plus the old-size and proof lines
# After refusing a body, how long and how much of it is read and dropped so the refusal reaches the client.
_LINGER_S = 2.0
_LINGER_BYTES = 16 * MAX_REQUEST_BYTES
MAX_PROOF_LINES = 63  # tlog-witness: clients must not send more
SIZE_CONTENT_TYPE = "text/x.tlog.size"
_READ_TIMEOUT_S = 10  # a client that stalls mid-request holds one thread for at most this long


@dataclasses.dataclass(frozen=True)
class WitnessState:
    """What the witness last cosigned for one log."""

    origin: str
    size: int
    root: bytes
    note: str


class WitnessStore:
    """Per-origin witness state in SQLite; each check-and-update runs in one immediate transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a cosignature must never outlive a lost commit
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS witness_state ("
                " origin TEXT PRIMARY KEY, size INTEGER NOT NULL, root BLOB NOT NULL,"
                " note TEXT NOT NULL, cosigned_at INTEGER NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the witness state {self.path}: {exc}") from None
        self._lock = threading.Lock()

    def get(self, origin: str) -> WitnessState | None:
        with self._lock:
            return self._get(origin)

    def _get(self, origin: str) -> WitnessState | None:
        row = self._db.execute(
            "SELECT size, root, note FROM witness_state WHERE origin = ?", (origin,)
        ).fetchone()
        if row is None:
            return None
        return WitnessState(origin, int(row[0]), bytes(row[1]), str(row[2]))

    @contextlib.contextmanager
    def transaction(
        self, origin: str
    ) -> Iterator[tuple[WitnessState | None, Callable[[WitnessState, int], None]]]:
        """Yield (current state, put); commit on normal exit, roll back on an exception.

        The thread lock orders requests in this process; BEGIN IMMEDIATE orders any other process that
        opens the same file, so the check of the old size and the update are one atomic step.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot lock the witness state {self.path}: {exc}") from None

            def put(state: WitnessState, cosigned_at: int) -> None:
                self._db.execute(
                    "INSERT INTO witness_state (origin, size, root, note, cosigned_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT(origin) DO UPDATE SET size = excluded.size, root = excluded.root,"
                    " note = excluded.note, cosigned_at = excluded.cosigned_at",
                    (state.origin, state.size, state.root, state.note, cosigned_at),
                )

            try:
                yield self._get(origin), put
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise StoreError(f"cannot write the witness state {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Reject(Exception):
    """An HTTP error answer: status, reason for the log, and the response body."""

    def __init__(self, status: int, reason: str, body: str = "", content_type: str = "text/plain") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.body = body or reason + "\n"
        self.content_type = content_type


@dataclasses.dataclass(frozen=True)
class _Request:
    old: int
    proof: tuple[bytes, ...]
    note: str


def _parse_request(body: bytes) -> _Request:
    """Split an add-checkpoint body into old size, proof hashes and the checkpoint note."""
    try:
        text = body.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise _Reject(400, "request body is not valid UTF-8") from None
    first, sep, rest = text.partition("\n")
    old_text = first[4:] if first.startswith("old ") else ""
    if not sep or not old_text or not old_text.isascii() or not old_text.isdigit():
        raise _Reject(400, "request must start with an 'old <size>' line")
    if (old_text != "0" and old_text.startswith("0")) or len(old_text) > 19:
        raise _Reject(400, "the old size is not a decimal without leading zeros")
    proof: list[bytes] = []
    while True:
        line, sep, rest = rest.partition("\n")
        if not sep:
            raise _Reject(400, "request has no empty line before the checkpoint")
        if not line:
            break
        if len(proof) == MAX_PROOF_LINES:
            raise _Reject(400, f"more than {MAX_PROOF_LINES} consistency proof lines")
        try:
            node = b64decode_strict(line)
        except ValueError:
            raise _Reject(400, "a consistency proof line is not base64") from None
        if len(node) != HASH_SIZE:
            raise _Reject(400, f"a consistency proof hash has {len(node)} bytes, not {HASH_SIZE}")
        proof.append(node)
    return _Request(int(old_text), tuple(proof), rest)


class _WitnessServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a stop never waits for idle keep-alive connections; commits are atomic anyway

    def __init__(
        self,
        address: tuple[str, int],
        key: SigningKey,
        logs: Mapping[str, VerifierKey],
        store: WitnessStore,
    ) -> None:
        super().__init__(address, _Handler)
        self.key = key
        self.logs = dict(logs)
        self.store = store

    def add_checkpoint(self, body: bytes) -> str:
        """Decide one request: the cosignature line, or _Reject."""
        request = _parse_request(body)
        try:
            parsed = Note.parse(request.note)
            checkpoint = Checkpoint.from_body(parsed.text)
        except VerificationFailed as exc:
            raise _Reject(400, exc.message) from None
        origin = checkpoint.origin
        log_key = self.logs.get(origin)
        if log_key is None:
            raise _Reject(404, f"unknown log origin {origin!r}")
        try:
            open_checkpoint(request.note, log_key)
        except VerificationFailed as exc:
            raise _Reject(403, f"origin {origin!r}: {exc.message}") from None
        if request.old > checkpoint.size:
            raise _Reject(
                400,
                f"origin {origin!r}: old size {request.old} is above the checkpoint size {checkpoint.size}",
            )
        if request.old == 0 and request.proof:
            raise _Reject(400, f"origin {origin!r}: a consistency proof from size 0 must be empty")
        if checkpoint.size == 0 and checkpoint.root != EMPTY_ROOT:
            raise _Reject(422, f"origin {origin!r}: size 0 with a root that is not the empty tree's")

        with self.store.transaction(origin) as (state, put):
            known = state.size if state else 0
            if request.old != known:
                raise _Reject(
                    409,
                    f"origin {origin!r}: old size {request.old}, but the witness has cosigned size {known}",
                    f"{known}\n",
                    SIZE_CONTENT_TYPE,
                )
            if state is not None and known == checkpoint.size and state.root != checkpoint.root:
                raise _Reject(
                    409,
                    f"origin {origin!r}: FORK at size {known}: a different root than the one cosigned",
                    f"{known}\n",
                    SIZE_CONTENT_TYPE,
                )
            if state is not None and 0 < known < checkpoint.size:
                try:
                    verify_consistency(known, checkpoint.size, state.root, checkpoint.root, request.proof)
                except VerificationFailed as exc:
                    raise _Reject(
                        422,
                        f"origin {origin!r}: FORK? consistency proof {known} -> {checkpoint.size} "
                        f"does not verify: {exc.message}",
                    ) from None
            now = int(time.time())
            put(WitnessState(origin, checkpoint.size, checkpoint.root, request.note), now)
            line = cosign(checkpoint, self.key, now)
        logger.info("cosigned origin=%r size=%d (was %d)", origin, checkpoint.size, known)
        return line


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _WitnessServer
    protocol_version = "HTTP/1.1"  # keep-alive, as tlog-witness recommends
    timeout = _READ_TIMEOUT_S
    server_version = "trainguard-witness"
    sys_version = ""

    def do_POST(self) -> None:
        try:
            if self.path != "/add-checkpoint":
                raise _Reject(404, f"no such endpoint {self.path[:100]!r}")
            body = self._read_body()
            line = self.server.add_checkpoint(body)
        except _Reject as reject:
            level = logging.WARNING if reject.status in (409, 422, 403) else logging.INFO
            logger.log(level, "refused %d from %s: %s", reject.status, self.client_address[0], reject.reason)
            self._answer(reject.status, reject.body, reject.content_type)
            return
        except TrainguardError as exc:
            logger.error("internal error: %s", exc.message)
            self._answer(500, "internal error\n", "text/plain")
            return
        self._answer(200, line, "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        self._answer(404 if self.path != "/add-checkpoint" else 405, "not found\n", "text/plain")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._unread_body = True  # the client may still be sending chunks
            raise _Reject(411, "chunked requests are not accepted; send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self.close_connection = True
            self._unread_body = True
            raise _Reject(411, "Content-Length is required")
        length = int(length_text)
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True  # the unread body must not be parsed as a next request
            self._unread_body = True
            raise _Reject(413, f"request of {length} bytes is above the limit of {MAX_REQUEST_BYTES}")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _Reject(400, "request body ended early")
        return body

    def _answer(self, status: int, body: str, content_type: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        if getattr(self, "_unread_body", False):
            self._lingering_close()

    def _lingering_close(self) -> None:
        """Read and drop what the client still sends, for a bounded time and size, before closing: a
        socket closed with unread data answers with a reset, which can destroy the answer in flight."""
        self.wfile.flush()
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(_LINGER_S)
            deadline = time.monotonic() + _LINGER_S
            drained = 0
            while drained < _LINGER_BYTES and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass  # the client went away: nothing left to protect

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.client_address[0], format % args)


def _ensure_stderr_logging() -> None:
    # Decisions must reach stderr even when no application configured logging.
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s witness %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def serve(
    host: str,
    port: int,
    key: SigningKey,
    logs: Mapping[str, VerifierKey],
    state_path: Path,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Run a witness until SIGTERM or SIGINT; `ready` gets the bound port (useful with port 0)."""
    if key.alg != ALG_COSIGNATURE_V1:
        raise UsageError(
            f"the witness key {key.ident} is not a cosignature/v1 witness key",
            hint="generate a witness key (algorithm 0x04); a log key cannot cosign",
        )
    for origin, log_key in logs.items():
        if log_key.alg != ALG_ED25519:
            raise UsageError(f"the key for log {origin!r} ({log_key.ident}) is not an Ed25519 note key")
    if not logs:
        raise UsageError("a witness needs at least one log to witness")
    _ensure_stderr_logging()
    store = WitnessStore(Path(state_path))
    try:
        try:
            server = _WitnessServer((host, port), key, logs, store)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        with server:
            bound = int(server.server_address[1])
            stop = _install_stop_handlers(server)
            try:
                logger.info(
                    "witness %s listening on %s:%d for %s; state %s",
                    key.verifier().text(),
                    host,
                    bound,
                    ", ".join(sorted(logs)),
                    state_path,
                )
                if ready is not None:
                    ready(bound)
                server.serve_forever(poll_interval=0.2)
            finally:
                stop()
            logger.info("witness stopped")
    finally:
        store.close()


def _install_stop_handlers(server: _WitnessServer) -> Callable[[], None]:
    """Stop the server on SIGTERM/SIGINT; returns a function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach only the main thread; the caller stops the server itself

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        # shutdown() waits for serve_forever to return, which runs in this very thread: call it elsewhere.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
