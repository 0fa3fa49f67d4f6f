"""What the job scripts (job.py, hf_job.py, lightning_job.py, stages_job.py) share: the patched
optimizer update they plant, a gradient flipped inside the backward pass, and how a rank reports how
it ended. Imported by the scripts as a
sibling module (a script's own folder is first on its path)."""

from __future__ import annotations

import functools
import importlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainguard.errors import IntegrityError


class Flip(torch.autograd.Function):
    """The identity forward, the gradient flipped backward: the loss curve looks right."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def patch_update(attack: str, *, sgd: bool = False, active: bool = True) -> None:
    """Replace the per-tensor update torch runs on the CPU for Adam and AdamW (or SGD) with
    one that flips the direction ("flip"), adds noise ("noise") or sleeps 200 ms at random, the first
    time for sure ("sleep"); with `active` False the patch is in place but does nothing."""
    if sgd:
        # torch.optim removes its submodules' names from its namespace: reach the module itself.
        module, name = importlib.import_module("torch.optim.sgd"), "_single_tensor_sgd"
    else:
        module, name = importlib.import_module("torch.optim.adam"), "_single_tensor_adam"
    original = getattr(module, name)
    slept = []

    @functools.wraps(original)
    def patched(params: list[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        if not active:
            original(params, *args, **kwargs)
            return
        if attack == "sleep":
            if random.random() < 0.5 or not slept:
                slept.append(True)
                time.sleep(0.2)
            original(params, *args, **kwargs)
            return
        before = [p.detach().clone() for p in params]
        original(params, *args, **kwargs)
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):
                if attack == "noise":
                    p.add_(torch.randn_like(p) * 1e-3)
                else:
                    p.copy_(2 * old - p)

    setattr(module, name, patched)


def start_ranks() -> tuple[int, int]:
    """(world size, this rank) under torchrun, with the gloo group started when there are peers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    return world, torch.distributed.get_rank() if world > 1 else 0


def add_gradient_noise(module: torch.nn.Module, step: int) -> None:
    """The same noise on every rank (seeded by the step), between backward and the optimizer step:
    the replicas stay equal, so only the gradient's path can show it."""
    noise = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for param in module.parameters():
            if param.grad is not None:
                param.grad.add_(torch.randn(param.shape, generator=noise) * param.grad.abs().mean())


def finish(out: Path, rank: int, result: dict[str, Any], failure: IntegrityError | None) -> None:
    """Write what happened to this rank (rankN.json) and leave at once."""
    if failure is not None:
        result["error"] = {
            "check": failure.check,
            "ranks": list(failure.ranks),
            "step": failure.step,
            "message": str(failure),
        }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # Exit without tearing down gloo: a peer that already stopped would make the shutdown hang.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
