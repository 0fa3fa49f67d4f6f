"""A process that blocks the catchable signals (as `trainguard run` leaves them), watches them, and sends
itself one: python target.py MODE. Prints one JSON line per reported signal."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from trainguard.monitor._signals import CATCHABLE, SignalEvent, watch_signals

MODES = {
    "ignored": signal.SIGUSR1,  # SIG_IGN: reported, then dropped
    "interrupt": signal.SIGINT,  # Python's default handler: KeyboardInterrupt in the main thread
    "default": signal.SIGHUP,  # SIG_DFL: the process dies of SIGHUP
    "failing-report": signal.SIGTERM,  # the report raises; the signal is still delivered
}


def main() -> int:
    mode = sys.argv[1]
    if mode == "unblocked":
        print(json.dumps({"watching": watch_signals(lambda event: None)}))
        return 0
    signal.pthread_sigmask(signal.SIG_BLOCK, CATCHABLE)
    reported = threading.Event()

    def report(event: SignalEvent) -> None:
        print(json.dumps(event.payload()), flush=True)
        reported.set()
        if mode == "failing-report":
            raise RuntimeError("the ledger is down")

    if mode == "ignored":
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    assert watch_signals(report)
    os.kill(os.getpid(), MODES[mode])
    try:
        reported.wait()
        for _ in range(200):  # delivery follows the report; the main thread must be running to see it
            time.sleep(0.01)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
        return 3
    print("alive", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
