"""A small data-parallel Hugging Face Trainer job with trainguard's callback, as N real processes
(torchrun, gloo, CPU); each rank writes where training stopped and the failure that stopped it.

    python hf_job.py --out DIR --steps 30 [--attack flip|grad_noise --attack-ranks 1 --attack-step 10]
        [--skip code]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from jobkit import add_gradient_noise, finish, patch_update
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from trainguard.errors import IntegrityError
from trainguard.monitor.hf import TrainguardCallback


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Attack(TrainerCallback):
    """Arms the attack on this rank just before the optimizer step numbered `step` (1-based)."""

    def __init__(self, attack: str, step: int) -> None:
        self.attack = attack
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.attack == "flip" and state.global_step == self.step - 1:
            patch_update("flip")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.attack == "grad_noise" and state.global_step >= self.step - 1:
            add_gradient_noise(kwargs["model"], state.global_step)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--attack", choices=["none", "flip", "grad_noise"], default="none")
    parser.add_argument("--attack-ranks", default="")
    parser.add_argument("--attack-step", type=int, default=10)
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--odd-config-rank", type=int, default=None, help="this rank's arguments differ")
    args = parser.parse_args()

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    data = torch.Generator().manual_seed(100)
    size = 16 * 2 * args.steps * args.accumulate
    inputs, labels = torch.randn(size, 32, generator=data), torch.randint(0, 8, (size,), generator=data)
    dataset = [{"x": inputs[i], "labels": labels[i]} for i in range(size)]
    training = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=args.accumulate,
        learning_rate=1e-3,
        # torch's AdamW, whose per-tensor function the attack patches (the fused one is the default).
        optim="adamw_torch",
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        run_name="odd" if rank == args.odd_config_rank else None,
    )
    guard = TrainguardCallback(skip=args.skip, derivative_every=2)
    callbacks: list[TrainerCallback] = [guard]
    attacked = args.attack != "none" and (
        not args.attack_ranks or rank in {int(r) for r in args.attack_ranks.split(",")}
    )
    if attacked:
        callbacks.append(Attack(args.attack, args.attack_step))
    trainer = Trainer(model=TinyClassifier(), args=training, train_dataset=dataset, callbacks=callbacks)
    result: dict[str, Any] = {"rank": rank, "finished": False, "error": None}
    try:
        trainer.train()
        result["finished"] = True
    except IntegrityError as exc:  # a failure found before the first step
        result["raised"] = exc is guard.failure
    failure = guard.failure
    result["global_step"] = trainer.state.global_step
    result["guard_closed"] = guard.guard is None
    finish(args.out, result["rank"], result, failure)


if __name__ == "__main__":
    raise SystemExit(main())
