"""A stand-in for one training rank: beats to the supervisor, reports signals, steps; standard library only.

    python rank.py --rank 0 --steps 20 --ready DIR

It writes DIR/rank<N>.json ({"pid", "watching", "blocked"}) once it beats, so that a test knows whom to
signal. Without --steps it steps until it is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from trainguard.monitor._heartbeat import ENV_SOCKET, HeartbeatSender, encode_datagram
from trainguard.monitor._signals import SignalEvent, blocked, watch_signals


def send_junk(path: str) -> None:
    """Not JSON, the wrong shape, an unknown kind, and a datagram that claims another process's pid."""
    good = json.loads(encode_datagram("beat", 0, 0, {}))
    junk = [
        b"\x80\x04K\x01.",  # a pickle
        json.dumps({**good, "rank": -1}).encode(),
        json.dumps({**good, "kind": "exec"}).encode(),
        json.dumps({**good, "pid": os.getppid()}).encode(),
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for data in junk:
            sock.sendto(data, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0, help="0: until stopped")
    parser.add_argument("--step-time", type=float, default=0.05)
    parser.add_argument("--ready", type=Path, help="folder for the ready file")
    parser.add_argument("--no-watch", action="store_true", help="do not call watch_signals")
    parser.add_argument("--exit", type=int, default=0, help="exit status after the last step")
    parser.add_argument("--junk", action="store_true", help="first send four datagrams to be refused")
    parser.add_argument("--handler", action="store_true", help="a Python SIGTERM handler that exits 7")
    args = parser.parse_args()

    if args.handler:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    if args.junk:
        send_junk(os.environ[ENV_SOCKET])
    sender = HeartbeatSender.from_environment(args.rank)

    def report(event: SignalEvent) -> None:
        if sender is not None:
            sender.send("signal", event.payload())

    watching = False if args.no_watch else watch_signals(report)
    if args.ready is not None:
        doc = {"pid": os.getpid(), "watching": watching, "blocked": blocked()}
        tmp = args.ready / f".rank{args.rank}.tmp"
        tmp.write_text(json.dumps(doc))
        tmp.replace(args.ready / f"rank{args.rank}.json")
    step = 0
    while not args.steps or step < args.steps:
        step += 1
        if sender is not None:
            sender.set_step(step)
        time.sleep(args.step_time)
    if sender is not None:
        sender.close()
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
