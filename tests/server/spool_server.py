"""A stand-in for `trainguard serve`'s event endpoint, run as its own process by tests/server/test_spool.py.

python spool_server.py --db received.db --port-file port.txt --token TOKEN [--port N] [--fail N] [--hang N]
                       [--mode ok|not-json|huge|wrong-keys|ack-half|reject]

It stores each key once (its `received` table, committed before it answers, so a SIGKILL loses nothing it
acknowledged), answers duplicates as such, and counts every key it was sent in `sent`. --fail N answers the
first N requests 503, --hang N never answers the first N; --mode makes every answer hostile.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_PREFIX = "/api/v1/runs/"


class _State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.requests = 0
        self.db = sqlite3.connect(args.db, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS received (key TEXT PRIMARY KEY, run TEXT, event TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS sent (key TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS posts (n INTEGER NOT NULL)")

    def store(self, run: str, events: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        accepted: list[str] = []
        duplicates: list[str] = []
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            for item in events:
                key = item["key"]
                self.db.execute("INSERT INTO sent VALUES (?)", (key,))
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO received VALUES (?, ?, ?)", (key, run, json.dumps(item["event"]))
                )
                (accepted if cur.rowcount == 1 else duplicates).append(key)
            self.db.execute("COMMIT")
        return accepted, duplicates


class _Handler(BaseHTTPRequestHandler):
    state: _State

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the tests read the database
        pass

    def do_POST(self) -> None:
        state = self.state
        with state.lock:
            state.requests += 1
            number = state.requests
            state.db.execute("INSERT INTO posts VALUES (?)", (number,))
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if number <= state.args.hang:
            time.sleep(3600)
        if number <= state.args.hang + state.args.fail:
            return self._answer(503, b"try later")
        if self.headers.get("Authorization") != f"Bearer {state.args.token}":
            return self._answer(401, b'{"error": "token rejected"}')
        if not self.path.startswith(_PREFIX) or not self.path.endswith("/events"):
            return self._answer(404, b"no such endpoint")
        run = self.path[len(_PREFIX) : -len("/events")]
        events = json.loads(body)["events"]
        mode = state.args.mode
        if mode == "reject":
            return self._answer(403, b'{"error": "forbidden"}')
        if mode == "not-json":
            return self._answer(200, b"<html>ok</html>")
        if mode == "huge":
            return self._answer(200, b'{"accepted": [' + b'"x",' * (2 << 20) + b'"x"], "duplicates": []}')
        if mode == "wrong-keys":
            return self._answer(200, json.dumps({"accepted": ["nope/1", 7, None], "duplicates": {}}).encode())
        if mode == "wrong-keys-list":
            return self._answer(200, json.dumps({"accepted": ["nope/1"], "duplicates": []}).encode())
        accepted, duplicates = state.store(run, events)
        if mode == "ack-half":
            accepted = accepted[: (len(accepted) + 1) // 2]
            duplicates = duplicates[: (len(duplicates) + 1) // 2]
        return self._answer(200, json.dumps({"accepted": accepted, "duplicates": duplicates}).encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port-file", required=True, type=Path)
    parser.add_argument("--token", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail", type=int, default=0)
    parser.add_argument("--hang", type=int, default=0)
    parser.add_argument("--mode", default="ok")
    args = parser.parse_args(argv)
    _Handler.state = _State(args)
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    server.daemon_threads = True
    # Written last and renamed into place, so a test that sees the file can connect.
    partial = args.port_file.with_suffix(".partial")
    partial.write_text(str(server.server_address[1]))
    partial.replace(args.port_file)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
