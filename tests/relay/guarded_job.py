"""A tiny data-parallel job with the guard on, for reporting through the server: run under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 guarded_job.py --out DIR --steps 6

Each rank writes DIR/rank<N>.json once guarded: its pid and the environment it was given (the test looks
for the token there), and DIR/rank<N>.done when it finished its steps. With --forever it steps until it
is killed. With --forge, rank 0 also writes events a job must not: the supervisor's own kind, another
run's, and one that claims another process as its actor.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import trainguard
from trainguard.ledger import new_event
from trainguard.ledger._events import Actor


def forge(path: str, run_id: str) -> None:
    me = Actor.current()
    someone_else = Actor(user=me.user, uid=me.uid, host=me.host, pid=os.getppid())
    forged = [
        new_event("run.end", {"exit_code": 0, "forged": True}, run_id=run_id),
        new_event("monitor.alert", {"forged": "other run"}, run_id="another-run"),
        new_event("monitor.alert", {"forged": "actor"}, run_id=run_id, actor=someone_else),
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for event in forged:
            sock.sendto(event.canonical(), path)
        sock.sendto(b"\x80\x04K\x01.", path)  # a pickle, not an event


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--forever", action="store_true")
    parser.add_argument("--forge", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = trainguard.watch(model, optimizer, summary_every=2)
    ready = {"pid": os.getpid(), "environ": dict(os.environ)}
    (args.out / f"rank{rank}.json").write_text(json.dumps(ready))
    if args.forge and rank == 0:
        forge(os.environ["TRAINGUARD_EVENTS"], os.environ["TRAINGUARD_RUN_ID"])
    data = torch.Generator().manual_seed(100 + rank)
    step = 0
    while args.forever or step < args.steps:
        step += 1
        x = torch.randn(8, 8, generator=data)
        y = torch.randint(0, 4, (8,), generator=data)
        loss = nn.functional.cross_entropy(model(x), y)
        guard.observe_loss(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.forever:
            time.sleep(0.05)
    guard.close()
    (args.out / f"rank{rank}.done").write_text(str(step))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
