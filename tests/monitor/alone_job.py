"""A job that calls `trainguard.watch()` without a process group (or after one, with `--init`), run
under torchrun or as a plain process. Each process writes out/rankN.json: the world the guard saw, or
the error `watch()` raised, which then leaves the process as it would leave a user's script.

    python alone_job.py --out DIR [--init] [--single-process]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import trainguard
from trainguard.errors import TrainguardError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", action="store_true", help="init_process_group('gloo') first")
    parser.add_argument("--single-process", action="store_true", help="watch(..., single_process=True)")
    args = parser.parse_args()
    if args.init:
        torch.distributed.init_process_group("gloo")
    # RANK as the launcher set it: the guard's own rank is what is under test.
    rank = int(os.environ.get("RANK", "0"))
    result: dict[str, Any] = {"rank": rank, "error": None}
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        guard = trainguard.watch(model, optimizer, ledger=False, single_process=args.single_process)
    except TrainguardError as error:
        result["error"] = {"type": type(error).__name__, "message": str(error)}
        (args.out / f"rank{rank}.json").write_text(json.dumps(result))
        raise
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    guard.close()
    result.update(world=guard.world_size, steps=guard.step)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
