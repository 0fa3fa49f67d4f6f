"""The supervisor's messages on stderr, which the job's ranks share.

A rank may have left a line unfinished (a progress bar redrawn with a carriage return, a print without
its newline): a message written after it would run into it. Each message therefore starts on a line of
its own; the cost is a blank line where the job's output did end with a newline.
"""

from __future__ import annotations

import sys

__all__ = ["say"]


def say(message: str) -> None:
    sys.stderr.write(f"\ntrainguard: {message}\n")
    sys.stderr.flush()
