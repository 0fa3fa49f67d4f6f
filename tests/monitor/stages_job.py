"""Two ranks guarding different models (as pipeline stages do), each its own replica group."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from jobkit import finish
from torch import nn

import trainguard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    # Rank 1's stage has twice the layers: its report is longer than rank 0's.
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(2 + 2 * rank)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    result: dict[str, object] = {"rank": rank, "finished": False, "error": None}
    try:
        guard = trainguard.watch(model, optimizer, replica_groups=[[0], [1]])
        for _ in range(12):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        guard.close()
        result["finished"] = True
        result["steps"] = guard.step
        failure = None
    except trainguard.IntegrityError as exc:
        failure = exc
    finish(args.out, rank, result, failure)


if __name__ == "__main__":
    main()
