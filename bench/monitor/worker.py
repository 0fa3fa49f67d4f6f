"""One rank of the monitor benchmark: blocks of steps with and without the guard, interleaved.

Run by bench/monitor/run.py under torchrun; rank 0 writes the per-step times as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import trainguard


def build_deep(blocks: int, width: int = 128) -> nn.Module:
    """Many small tensors, as a transformer has (a weight, a bias and a norm's two per block): what
    the guard spends per tensor, beside what it spends per byte."""
    parts: list[nn.Module] = [nn.Linear(1024, width)]
    for _ in range(blocks):
        parts += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    parts.append(nn.Linear(width, 10))
    return nn.Sequential(*parts)


def build(hidden: int, layers: int) -> nn.Module:
    blocks: list[nn.Module] = [nn.Linear(1024, hidden), nn.ReLU()]
    for _ in range(layers):
        blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
    blocks.append(nn.Linear(hidden, 10))
    return nn.Sequential(*blocks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=256, help="per step, over all ranks")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--deep", type=int, default=0, help="instead, this many small blocks of 4 tensors")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lean", action="store_true", help="parameters in 2 turns, optimizer state in 8")
    parser.add_argument("--defer", action="store_true", help="read the evidence one step late, as on a GPU")
    parser.add_argument("--skip", default="", help="checks to turn off, comma-separated: what each costs")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" else None
    )
    if device is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = (build_deep(args.deep) if args.deep else build(args.hidden, args.layers)).to(device or "cpu")
    params = sum(p.numel() for p in model.parameters())
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    per_rank = args.samples // world
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(per_rank, 1024, generator=generator).to(device or "cpu")
    y = torch.randint(0, 10, (per_rank,), generator=generator).to(device or "cpu")

    def step() -> float:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device is not None:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.rounds):
        for mode in ("without", "with"):
            settings: dict[str, object] = {"params_every": 2, "state_every": 8} if args.lean else {}
            # Timing verdicts alert rather than stop: on the reference VM a clean step's compute has
            # jumped by 60% twice within 16 steps (every version alike), which would end the run.
            settings["actions"] = {"step_time": "alert"}
            if args.defer:
                settings["defer"] = True
            if args.skip:
                settings["skip"] = args.skip.split(",")
            guard = trainguard.watch(ddp, optimizer, **settings) if mode == "with" else None
            # The first guarded steps of a block include the guard's set-up (its ledger is opened and
            # the start recorded in the background): they are not steady steps.
            if guard is not None:
                for _ in range(3):
                    step()
            dist.barrier()
            times[mode] += [step() for _ in range(args.block)]
            if guard is not None:
                guard.close()
    if rank == 0:
        tensors = sum(1 for _ in model.parameters())
        report = {
            "parameters": params,
            "tensors": tensors,
            "world_size": world,
            "samples": args.samples,
            "times": times,
        }
        args.out.write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
