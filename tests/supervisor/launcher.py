"""A small torchrun: starts N ranks (each in a session of its own, as torchrun does), reaps them slowly,
and when one fails stops the others and exits 1.

    python launcher.py N [rank.py arguments...]
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

RANK = Path(__file__).with_name("rank.py")


def main() -> int:
    count, rest = int(sys.argv[1]), sys.argv[2:]
    ranks = [
        subprocess.Popen([sys.executable, str(RANK), "--rank", str(i), *rest], start_new_session=True)
        for i in range(count)
    ]
    while True:
        time.sleep(0.5)  # slow on purpose: a dead rank stays a zombie a while, as under a busy launcher
        codes = [rank.poll() for rank in ranks]
        if any(code not in (None, 0) for code in codes):
            for rank in ranks:
                if rank.poll() is None:
                    rank.send_signal(signal.SIGTERM)
            for rank in ranks:
                rank.wait()
            return 1
        if all(code == 0 for code in codes):
            return 0


if __name__ == "__main__":
    sys.exit(main())
