"""A data-parallel job with the incident's attack moved one function away, as an insider who read the
guard's code would move it: gradients, optimizer state and settings, weights written between steps,
the guard's own code, data order. The attacks only disturb this job's own tensors.

The model has an embedding, a LayerNorm and a head, trained with AdamW (two parameter groups, a
LambdaLR warm-up) or SGD with momentum, on data read through a DistributedSampler.

    python adaptive_job.py --out DIR --attack exp_avg_negate [--attack-ranks 1] [--attack-step 10]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from jobkit import Flip, finish, start_ranks
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import trainguard

# Attacks armed at the attack step, between two steps.
BETWEEN = (
    "cross_entropy_flip",
    "exp_avg_negate",
    "exp_avg_sq_scale",
    "momentum_scale",
    "lr_halve",
    "weight_decay",
    "get_lr_patch",
    "load_state_dict",
    "data_mul",
    "numpy_write",
    "decide_patch",
    "addcdiv_patch",
    "library_kernel",
    "sampler_seed",
    "small_tensor",
    "guard_off",
    "guard_close",
    "checks_emptied",
    "comm_hook_after",
    "gradient_recording_off",
    "busy_forward",
    "sleep_backward",
    "busy_backward",
    "busy_once",
    "busy_every_third",
    "busy_optimizer",
)
# Attacks on the gradient between backward and the optimizer step, from the attack step on.
GRADIENT = ("grad_noise", "grad_flip")
# Attacks armed before watch().
BEFORE = ("manual_seed_patch", "comm_hook_negate")
# A backward pass that lies from inside, planted before watch() (the model's file edited, hooks left
# by code that ran first), or a hook put on the output at each step from the attack step on.
BACKWARD = ("model_function_flip", "param_hook_flip", "module_hook_scale", "output_hook_flip")


class Model(nn.Module):
    def __init__(self, max_norm: float | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32, max_norm=max_norm)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 8)
        self.sabotaged = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.embed(tokens).mean(dim=1))
        if self.sabotaged:
            # The model's own code, edited: the forward pass is unchanged, the gradient is flipped.
            hidden = Flip.apply(hidden)
        out: torch.Tensor = self.head(hidden)
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--attack", choices=("none", *BETWEEN, *GRADIENT, *BEFORE, *BACKWARD), default="none")
    parser.add_argument("--clip", choices=["none", "norm", "value"], default="none")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--attack-ranks", default="")
    parser.add_argument("--attack-step", type=int, default=10)
    parser.add_argument("--max-norm", type=float)
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--derivative-every", type=int)
    args = parser.parse_args()

    torch.set_num_threads(1)
    world, rank = start_ranks()
    attacked = args.attack != "none" and (
        not args.attack_ranks or rank in {int(r) for r in args.attack_ranks.split(",")}
    )
    torch.manual_seed(0)
    inner = Model(args.max_norm)
    model: nn.Module = nn.parallel.DistributedDataParallel(inner) if world > 1 else inner
    optimizer = make_optimizer(args.optimizer, inner)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    data = TensorDataset(torch.randint(0, 64, (4096, 6)), torch.randint(0, 8, (4096,)))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=3) if world > 1 else None
    loader = DataLoader(data, batch_size=16, sampler=sampler, shuffle=sampler is None)
    if attacked and args.attack in BEFORE:
        arm(args.attack, model, optimizer, scheduler, sampler, step=0)
    if attacked and args.attack in BACKWARD:
        plant_in_backward(args.attack, inner)
    settings = {} if args.derivative_every is None else {"derivative_every": args.derivative_every}
    guard = trainguard.watch(model, optimizer, skip=args.skip, **settings)
    _KEEP.append(guard)
    result: dict[str, Any] = {"rank": rank, "finished": False, "error": None}
    try:
        epoch, batches = 0, iter(loader)
        for step in range(1, args.steps + 1):
            if attacked and args.attack in BETWEEN:
                arm(args.attack, model, optimizer, scheduler, sampler, step=step, first=args.attack_step)
            batch = next(batches, None)
            if batch is None:  # a new epoch: every rank's sampler moves on together
                epoch += 1
                if sampler is not None:
                    sampler.set_epoch(epoch)
                batches = iter(loader)
                batch = next(batches)
            tokens, labels = batch
            optimizer.zero_grad()
            for part, (inputs, targets) in enumerate(
                zip(tokens.chunk(args.accumulate), labels.chunk(args.accumulate), strict=True)
            ):
                last = part == args.accumulate - 1
                with model.no_sync() if world > 1 and not last else contextlib.nullcontext():  # type: ignore[operator]
                    logits = model(inputs)
                    if attacked and args.attack == "output_hook_flip" and step >= args.attack_step:
                        logits.register_hook(lambda grad: -grad)
                    loss = F.cross_entropy(logits, targets) / args.accumulate
                    loss.backward()
            guard.observe_loss(loss)
            if args.clip == "norm":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            elif args.clip == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), 0.002)
            if attacked and args.attack in GRADIENT and step >= args.attack_step:
                tamper_gradients(args.attack, inner, step)
            optimizer.step()
            scheduler.step()
            result["steps"] = step
        result["finished"] = True
        guard.close()
        failure = None
    except trainguard.IntegrityError as exc:
        failure = exc
    result["notices"] = list(guard.notices)
    finish(args.out, rank, result, failure)


def tamper_gradients(attack: str, model: Model, step: int) -> None:
    """After backward, before the step: the same noise on every rank (replicas stay equal), or a flip."""
    noise = torch.Generator().manual_seed(step)
    for param in model.parameters():
        if param.grad is None:
            continue
        if attack == "grad_noise":
            param.grad.data.add_(torch.randn(param.shape, generator=noise) * param.grad.abs().mean())
        else:
            param.grad.data.neg_()


def plant_in_backward(attack: str, model: Model) -> None:
    """A gradient changed inside the backward pass, where the gradient path first sees it."""
    if attack == "model_function_flip":
        model.sabotaged = True
    elif attack == "param_hook_flip":
        model.norm.bias.register_hook(lambda grad: -grad)
    elif attack == "module_hook_scale":
        model.head.register_full_backward_hook(
            lambda module, grad_in, grad_out: tuple(None if g is None else g * 3.0 for g in grad_in)
        )


def make_optimizer(kind: str, model: Model) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-2
    )


def arm(
    attack: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sampler: Any,
    *,
    step: int,
    first: int = 0,
) -> None:
    """Act at step `first` (once), except the attacks that stay in place once planted."""
    if attack == "comm_hook_negate":
        model.register_comm_hook(None, _negating_hook())  # type: ignore[operator]
        return
    if attack == "comm_hook_after" and step == first:
        # DDP takes one hook only, and the guard's is in place: the attempt fails, and is swallowed.
        with contextlib.suppress(RuntimeError):
            negate = _negating_hook()
            model.register_comm_hook(None, negate)  # type: ignore[operator]
        return
    if attack == "busy_optimizer":
        if step == first:
            # After the guard's own pre-hook, inside the step: spinning never leaves the CPU.
            optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: _spin(0.15))
        return
    model = getattr(model, "module", model)
    if attack in ("busy_forward", "sleep_backward", "busy_backward", "busy_once", "busy_every_third"):
        if step == first:
            stall(attack, model)
        return
    if attack == "small_tensor":
        # Flip the update of one small tensor (a LayerNorm bias: 32 elements) every 37th step.
        if step == 1:
            flip_every(optimizer, model.norm.bias, 37)
        return
    if step != first:
        return
    state = optimizer.state
    with torch.no_grad():
        if attack == "cross_entropy_flip":
            F.cross_entropy = _flipped_gradient(F.cross_entropy)
        elif attack == "exp_avg_negate":
            for value in state.values():
                value["exp_avg"].neg_()
        elif attack == "exp_avg_sq_scale":
            for value in state.values():
                value["exp_avg_sq"].mul_(100.0)
        elif attack == "momentum_scale":
            for value in state.values():
                value["momentum_buffer"].mul_(3.0)
        elif attack == "lr_halve":
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] / 2
        elif attack == "weight_decay":
            optimizer.param_groups[0]["weight_decay"] = 50.0
        elif attack == "get_lr_patch":
            lambda_lr = torch.optim.lr_scheduler.LambdaLR
            original = lambda_lr.get_lr
            lambda_lr.get_lr = lambda self: [-lr for lr in original(self)]  # type: ignore[method-assign]
        elif attack == "load_state_dict":
            saved = optimizer.state_dict()
            for value in saved["state"].values():
                value["exp_avg"] = -value["exp_avg"]
            optimizer.load_state_dict(saved)
        elif attack == "data_mul":
            for param in model.parameters():
                param.data.mul_(0.5)
        elif attack == "numpy_write":
            view = model.head.weight.detach().numpy()
            view *= -1.0
            np.negative(view, out=view)
            view += 0.25
        elif attack == "decide_patch":
            import trainguard.monitor._guard as guard_module

            guard_module.decide = lambda *args, **kwargs: []  # type: ignore[assignment]
        elif attack == "addcdiv_patch":
            original_addcdiv = torch.Tensor.addcdiv_

            def addcdiv_(self: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: Any = 1) -> Any:
                return original_addcdiv(self, t1, t2, value=-value)

            torch.Tensor.addcdiv_ = addcdiv_  # type: ignore[method-assign]
        elif attack == "library_kernel":
            library = torch.library.Library("aten", "IMPL")
            library.impl("addcdiv_", lambda *a, **k: a[0], "CPU")
            _KEEP.append(library)  # kept alive: the registration ends with the object
        elif attack == "guard_off":
            _KEEP[0]._active = False  # type: ignore[attr-defined]
        elif attack == "guard_close":
            _KEEP[0].close()  # type: ignore[attr-defined]
        elif attack == "checks_emptied":
            guard = _KEEP[0]
            object.__setattr__(guard.config, "checks", frozenset())  # type: ignore[attr-defined]
        elif attack == "gradient_recording_off":
            _KEEP[0]._gradpath._recording = False  # type: ignore[attr-defined]
        elif attack == "sampler_seed":
            sampler.seed = 7
        elif attack == "manual_seed_patch":
            seed_patch()
            torch.manual_seed(0)
        else:
            raise ValueError(attack)


_KEEP: list[object] = []


def stall(attack: str, model: nn.Module) -> None:
    """150 ms on this rank at every step from now: spinning on the CPU in the forward pass (off-CPU
    timing misses it), or sleeping or spinning in the backward pass (where the all-reduce waits too)."""

    def spin() -> None:
        # 150 ms of this thread's own CPU time: under the test suite's load a wall-clock spin is
        # partly spent waiting for a CPU, which the guard rightly does not count as the rank's own.
        end = time.thread_time() + 0.15
        while time.thread_time() < end:
            pass

    if attack == "busy_forward":
        model.norm.register_forward_pre_hook(lambda module, args: spin())  # type: ignore[union-attr]
    elif attack == "busy_once":
        # Not an attack: a one-off, as a garbage collection would be.
        left = [1]

        def once(module: nn.Module, args: Any) -> None:
            if left[0]:
                left[0] -= 1
                spin()

        model.norm.register_forward_pre_hook(once)  # type: ignore[union-attr]
    elif attack == "busy_every_third":
        # Spaced out so that no two slow steps are neighbours.
        passes = [0]

        def every_third(module: nn.Module, args: Any) -> None:
            passes[0] += 1
            if passes[0] % 3 == 1:
                spin()

        model.norm.register_forward_pre_hook(every_third)  # type: ignore[union-attr]
    else:
        wait = spin if attack == "busy_backward" else lambda: time.sleep(0.15)
        model.norm.register_full_backward_hook(lambda module, grad_in, grad_out: wait())  # type: ignore[union-attr]


def _spin(seconds: float) -> None:
    """`seconds` of this thread's own CPU time (a wall-clock spin under load is partly spent waiting)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _negating_hook() -> Any:
    """This rank's gradient negated before the all-reduce: every replica takes the same wrong mean."""

    def negate(state: object, bucket: Any) -> Any:
        work = dist.all_reduce(bucket.buffer().neg_().div_(dist.get_world_size()), async_op=True)
        return work.get_future().then(lambda done: done.value()[0])  # type: ignore[union-attr]

    negate.__annotations__ = {}  # DDP checks annotations against real classes, not strings
    return negate


def _flipped_gradient(original: Any) -> Any:
    """The loss as it was, with its gradient's sign flipped: the loss curve looks right."""

    @functools.wraps(original)
    def cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        return Flip.apply(original(*args, **kwargs))  # type: ignore[no-any-return]

    return cross_entropy


def flip_every(optimizer: torch.optim.Optimizer, param: torch.Tensor, period: int) -> None:
    """Flip one tensor's update at every `period`-th step, from a step pre- and post-hook."""
    count = [0]
    before: list[torch.Tensor] = []

    def keep(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        count[0] += 1
        before[:] = [param.detach().clone()]

    def flip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if count[0] % period == 0:
            with torch.no_grad():
                param.copy_(2 * before[0] - param)

    optimizer.register_step_pre_hook(keep)
    handle = optimizer.register_step_post_hook(flip)
    # Run before the guard's own post-hook, which reads the result.
    optimizer._optimizer_step_post_hooks.move_to_end(handle.id, last=False)  # type: ignore[attr-defined]


def seed_patch() -> None:
    original = torch.manual_seed

    def manual_seed(seed: int) -> Any:
        return original(seed + 1)

    torch.manual_seed = manual_seed  # type: ignore[assignment]


if __name__ == "__main__":
    main()
