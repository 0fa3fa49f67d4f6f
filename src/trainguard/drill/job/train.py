"""The drill's training job: a small GPT-style language model trained data-parallel under the guard.

`trainguard drill` copies this folder into its workspace and runs it under `trainguard run`, one process
per rank (torchrun; gloo on CPUs, NCCL on GPUs). It is an ordinary training script that a team could have
written: it resumes from a signed checkpoint through `trainguard.load`, saves signed checkpoints with
`trainguard.save`, and calls `trainguard.watch` once DDP is set up. Each rank writes its per-step loss,
step time and CPU time to `OUT/rankN.steps.jsonl` and how it ended to `OUT/rankN.json`.

    python train.py --out DIR --steps 30 [--ckpt DIR --save-every 10] [--resume FILE] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import data  # type: ignore[import-not-found]  # the job's own sibling module
import torch
import torch.distributed as dist
from torch import nn

import trainguard


class Block(nn.Module):
    mask: torch.Tensor

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        mask = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h = self.norm1(x)
        attended, _ = self.attention(h, h, h, attn_mask=self.mask[:length, :length], need_weights=False)
        x = x + attended
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class TinyGPT(nn.Module):
    """Token and position embeddings, causal self-attention blocks, a head tied to the embedding."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, context) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        # GPT-2's initialisation: with the head tied to the embedding, unit-variance embeddings would
        # start the loss far above log(vocab).
        for embedding in (self.tokens, self.positions):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tokens(idx) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.norm(x) @ self.tokens.weight.T
        return logits


def start(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        where = torch.device("cuda", local)
    else:
        where = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return world, rank, where


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ckpt", type=Path, help="save signed checkpoints here (rank 0)")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--resume", type=Path, help="a signed checkpoint to start from")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("TRAINGUARD_SEED", "0") or 0))
    args = parser.parse_args()

    torch.set_num_threads(1)
    world, rank, device = start(args.device)
    torch.manual_seed(args.seed)
    context = 32
    model: nn.Module = TinyGPT(data.VOCAB, width=64, layers=2, heads=4, context=context).to(device)
    if args.resume is not None:
        # Verified against the trust policy, scanned, then loaded with weights_only=True.
        model.load_state_dict(trainguard.load(args.resume, map_location=device))
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batches = data.Batches(
        data.corpus(args.seed), context=context, per_rank=8, world=world, rank=rank, seed=args.seed
    )
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        guard = trainguard.watch(model, optimizer, run_config={"steps": args.steps, "seed": args.seed})
    except trainguard.IntegrityError as exc:  # the ranks disagree before the first step
        error = {"check": exc.check, "ranks": list(exc.ranks), "step": exc.step, "message": str(exc)}
        (args.out / f"rank{rank}.json").write_text(
            json.dumps({"rank": rank, "finished": False, "error": error})
        )
        os._exit(1)
    (args.out / f"rank{rank}.pid").write_text(str(os.getpid()))
    log = (args.out / f"rank{rank}.steps.jsonl").open("w")
    result: dict[str, Any] = {"rank": rank, "world": world, "finished": False, "steps": 0, "error": None}
    try:
        for step in range(1, args.steps + 1):
            began = time.perf_counter()
            # The training thread's own CPU time (torch runs on it alone): wall less this is time spent
            # off the CPU, waiting for peers, I/O, a sleep or the scheduler.
            cpu_began = time.thread_time()
            inputs, targets = (t.to(device) for t in batches.get(step))
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits.reshape(-1, data.VOCAB), targets.reshape(-1))
            guard.observe_loss(loss)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            value = float(loss.detach())
            seconds, cpu_seconds = time.perf_counter() - began, time.thread_time() - cpu_began
            log.write(
                json.dumps({"step": step, "loss": value, "seconds": seconds, "cpu_seconds": cpu_seconds})
                + "\n"
            )
            log.flush()
            result["steps"] = step
            if args.ckpt is not None and rank == 0 and step % args.save_every == 0:
                state = (
                    model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
                ).state_dict()
                trainguard.save(state, args.ckpt / f"step-{step:04d}.pt")
            if not math.isfinite(value):
                raise RuntimeError(f"the loss is {value} at step {step}")
        guard.close()
        result["finished"] = True
    except trainguard.IntegrityError as exc:
        result["error"] = {
            "check": exc.check,
            "ranks": list(exc.ranks),
            "step": exc.step,
            "message": str(exc),
        }
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    # A rank that stopped on an alarm leaves at once: tearing down gloo waits for peers that may be gone.
    os._exit(0 if result["finished"] else 1)


if __name__ == "__main__":
    raise SystemExit(main())
