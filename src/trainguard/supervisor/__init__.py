"""`trainguard run`: verify the environment and inputs, attest the run in the ledger, launch the job,
and record every exit, every lost rank and the sender of every catchable signal.

Only the command line imports this room; the job's side (heartbeats, signal attribution) lives in
`trainguard.monitor._heartbeat` and `trainguard.monitor._signals`. Nothing here imports torch.
"""

from __future__ import annotations

__all__: list[str] = []
