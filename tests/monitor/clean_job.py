"""A clean data-parallel job in the shapes real training takes, for the guard to raise nothing on:
a tiny GPT with dropout (or a small network with BatchNorm), an optimizer variant, warm-up and
cosine decay, gradient clipping, accumulation under no_sync, bf16 autocast, eval passes and
checkpoint saves between steps. An attack at the last step shows that the checks were live all along.

    python clean_job.py --out DIR --model gpt --optimizer adamw-groups --autocast --eval-every 25
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jobkit import finish, start_ranks
from torch import nn

import trainguard

VOCAB, CONTEXT, WIDTH = 48, 16, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, 4, dropout=0.1, batch_first=True)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=causal, need_weights=False)[0]
        out: torch.Tensor = x + self.dropout(self.mlp(self.norm2(x)))
        return out


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(CONTEXT, WIDTH)
        self.dropout = nn.Dropout(0.1)
        self.blocks = nn.Sequential(Block(), Block())
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1])
        x = self.dropout(self.tokens(tokens) + self.positions(positions))
        out: torch.Tensor = self.head(self.norm(self.blocks(x)))
        return out


class ConvNet(nn.Module):
    """BatchNorm keeps running statistics as buffers: DDP broadcasts rank 0's at each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Conv1d(8, VOCAB, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = (tokens.float() / VOCAB).unsqueeze(1)
        out: torch.Tensor = self.head(self.features(x)).transpose(1, 2)
        return out


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if kind == "adamw-groups":
        decay = [p for p in params if p.dim() > 1]
        rest = [p for p in params if p.dim() <= 1]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
            lr=3e-3,
            betas=(0.9, 0.95),
        )
    if kind == "sgd-nesterov":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    if kind == "adam-amsgrad":
        return torch.optim.Adam(params, lr=3e-3, amsgrad=True)
    if kind == "adamw-fused":
        return torch.optim.AdamW(params, lr=3e-3, fused=True)
    if kind == "adamw-foreach":
        return torch.optim.AdamW(params, lr=3e-3, foreach=True, weight_decay=0.05)
    raise SystemExit(f"unknown optimizer {kind}")


def warmup_cosine(steps: int, warmup: int = 10) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return factor


def attack(kind: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """On every rank, so the replicas stay equal: the gradient flipped, or the optimizer's running
    state (Adam's first moment, SGD's momentum) scaled."""
    with torch.no_grad():
        if kind == "gradient":
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.neg_()
            return
        for state in optimizer.state.values():
            running = state.get("exp_avg", state.get("momentum_buffer"))
            if running is not None:
                running.mul_(3.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", choices=["gpt", "batchnorm"], default="gpt")
    parser.add_argument("--optimizer", default="adamw-groups")
    parser.add_argument("--clip", type=float, help="clip the gradient's norm to this")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast on the CPU")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--attack", choices=["none", "gradient", "state"], default="none")
    parser.add_argument("--attack-step", type=int, default=0)
    # Every other step's gradient is checked against its forward pass (the default is 1 in 32).
    parser.add_argument("--derivative-every", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    world, rank = start_ranks()
    torch.manual_seed(0)
    inner: nn.Module = TinyGPT() if args.model == "gpt" else ConvNet()
    model: nn.Module = nn.parallel.DistributedDataParallel(inner) if world > 1 else inner
    optimizer = make_optimizer(args.optimizer, inner)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps))
    data = torch.Generator().manual_seed(100 + rank)
    guard = trainguard.watch(model, optimizer, derivative_every=args.derivative_every)
    result: dict[str, Any] = {"rank": rank, "finished": False, "error": None, "evals": 0, "saves": 0}
    try:
        for step in range(1, args.steps + 1):
            tokens = torch.randint(0, VOCAB, (8, CONTEXT + 1), generator=data)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            optimizer.zero_grad(set_to_none=True)
            for part, (x, y) in enumerate(
                zip(inputs.chunk(args.accumulate), targets.chunk(args.accumulate), strict=True)
            ):
                last = part == args.accumulate - 1
                sync = model.no_sync() if world > 1 and not last else contextlib.nullcontext()  # type: ignore[operator]
                precision = (
                    torch.autocast("cpu", dtype=torch.bfloat16) if args.autocast else contextlib.nullcontext()
                )
                with sync, precision:
                    logits = model(x)
                    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1)) / args.accumulate
                loss.backward()
            guard.observe_loss(loss)
            if args.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            if args.attack != "none" and step == args.attack_step:
                attack(args.attack, inner, optimizer)
            optimizer.step()
            scheduler.step()
            if args.eval_every and step % args.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    model(torch.randint(0, VOCAB, (4, CONTEXT), generator=data))
                model.train()
                result["evals"] += 1
            if args.save_every and step % args.save_every == 0 and rank == 0:
                state = {"model": inner.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
                torch.save(state, args.out / f"checkpoint-{step}.pt")
                result["saves"] += 1
            result["steps"] = step
        result["finished"] = True
        guard.close()
        failure = None
    except trainguard.IntegrityError as exc:
        failure = exc
    result["notices"] = list(guard.notices)
    finish(args.out, rank, result, failure)


if __name__ == "__main__":
    main()
