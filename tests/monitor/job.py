"""A small data-parallel training job with the guard on, and the incident's attacks as options.

Run by the tests as N real processes (gloo on loopback), like torchrun would; each rank writes what
happened to it (finished, or the IntegrityError it raised) as JSON. The attacks are the real thing,
made harmless: they only disturb this job's own tensors and timing.

    python job.py --out DIR --steps 40 [--attack flip --attack-ranks 1 --attack-step 10] [--skip code]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from jobkit import finish, patch_update, start_ranks
from torch import nn

import trainguard

ATTACKS = (
    "none",
    "flip",
    "noise",
    "hook",
    "monkeypatch_step",
    "sleep",
    "nan",
    "gated_flip",
    "hook_before_watch",
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
    parser.add_argument("--attack", choices=ATTACKS, default="none")
    parser.add_argument("--attack-ranks", default="")
    parser.add_argument("--attack-step", type=int, default=10)
    parser.add_argument("--gate", type=int, default=2, help="gated attacks fire at this world size or more")
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--params-every", type=int, default=1)
    parser.add_argument("--defer", action="store_true", help="read the evidence one step late, as on a GPU")
    parser.add_argument("--ready", type=Path, help="write rankN.ready.json (pid) here once guarded")
    args = parser.parse_args()

    torch.set_num_threads(1)
    world, rank = start_ranks()
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if args.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    elif args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    attacked_here = args.attack != "none" and (
        not args.attack_ranks or start_rank_of(model) in {int(r) for r in args.attack_ranks.split(",")}
    )
    if attacked_here and args.attack == "hook_before_watch":
        # Planted before the guard starts: the hook inventory it sees first already holds it.
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        inner[0].register_forward_hook(lambda module, args, output: output * 1.5)
    try:
        guard = trainguard.watch(
            model, optimizer, skip=args.skip, params_every=args.params_every, defer=args.defer
        )
    except trainguard.IntegrityError as exc:  # the ranks disagree before the first step
        finish(args.out, rank, {"rank": rank, "finished": False, "error": None}, exc)
    if args.ready is not None:
        (args.ready / f"rank{rank}.ready.json").write_text(json.dumps({"pid": os.getpid()}))
    attacked = args.attack != "none" and (
        not args.attack_ranks or rank in {int(r) for r in args.attack_ranks.split(",")}
    )
    data = torch.Generator().manual_seed(100 + rank)
    result: dict[str, object] = {"rank": rank, "finished": False, "error": None}
    try:
        for step in range(1, args.steps + 1):
            if attacked and step == args.attack_step:
                arm(args.attack, model, optimizer, gate=args.gate)
            x = torch.randn(16, 32, generator=data)
            y = torch.randint(0, 8, (16,), generator=data)
            if attacked and args.attack == "nan" and step == args.attack_step:
                x[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(model(x), y)
            guard.observe_loss(loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            result["steps"] = step
        result["finished"] = True
        guard.close()
        failure = None
    except trainguard.IntegrityError as exc:
        failure = exc
    result["notices"] = list(guard.notices)
    finish(args.out, rank, result, failure)


def start_rank_of(model: nn.Module) -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def arm(attack: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, gate: int) -> None:
    """Plant one attack in this process, from this step on."""
    if attack in ("flip", "noise", "sleep", "gated_flip"):
        # The gated attack acts only in jobs of `gate` processes or more, as the incident's did.
        active = attack != "gated_flip" or dist.get_world_size() >= gate
        sgd = isinstance(optimizer, torch.optim.SGD)
        patch_update("flip" if attack == "gated_flip" else attack, sgd=sgd, active=active)
    elif attack == "hook":
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

        def scale_output(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
            return output * 1.5

        inner[0].register_forward_hook(scale_output)
    elif attack == "monkeypatch_step":
        # A step with no hooks at all: the guard's pre/post hooks never run again.
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=group["lr"])

        type(optimizer).step = step
    elif attack not in ("nan", "hook_before_watch"):
        raise ValueError(attack)


if __name__ == "__main__":
    raise SystemExit(main())
