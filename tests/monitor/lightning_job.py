"""A small data-parallel Lightning job with trainguard's callback, as N real processes (torchrun,
gloo, CPU; Lightning takes the ranks from torchrun's environment); each rank writes where training
stopped and the failure that stopped it.

    python lightning_job.py --out DIR --steps 30 [--namespace pytorch_lightning] [--accumulate 2]
        [--attack flip|grad_noise --attack-ranks 1 --attack-step 10] [--skip code]
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any

import torch
from jobkit import add_gradient_noise, finish, patch_update
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--namespace", choices=["lightning.pytorch", "pytorch_lightning"], default="lightning.pytorch"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--min-steps", type=int, default=None)
    parser.add_argument("--validate-every", type=int, default=None, help="validation every N batches")
    parser.add_argument("--attack", choices=["none", "flip", "grad_noise"], default="none")
    parser.add_argument("--attack-ranks", default="")
    parser.add_argument("--attack-step", type=int, default=10)
    parser.add_argument("--skip", action="append", default=[])
    args = parser.parse_args()

    pl = importlib.import_module(args.namespace)
    pl.seed_everything(0, verbose=False)
    callback_module = "lightning" if args.namespace == "lightning.pytorch" else "pytorch_lightning"
    TrainguardCallback = importlib.import_module(f"trainguard.monitor.{callback_module}").TrainguardCallback
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))

    class TinyClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"hidden": 64, "lr": 1e-3})
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(x), y), sync_dist=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Attack(pl.Callback):
        """Arms the attack on this rank just before the optimizer step numbered `step` (1-based)."""

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if args.attack != "flip" or trainer.global_step != args.attack_step - 1:
                return
            if not getattr(self, "armed", False):
                self.armed = True
                patch_update("flip")

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            # Inside the step's closure, after backward.
            if args.attack == "grad_noise" and trainer.global_step >= args.attack_step - 1:
                add_gradient_noise(module, trainer.global_step)

    data = torch.Generator().manual_seed(100)
    size = 16 * 2 * args.steps * args.accumulate
    dataset = TensorDataset(
        torch.randn(size, 32, generator=data), torch.randint(0, 8, (size,), generator=data)
    )
    guard = TrainguardCallback(skip=args.skip, derivative_every=2)
    callbacks = [guard]
    attacked = args.attack != "none" and (
        not args.attack_ranks or rank in {int(r) for r in args.attack_ranks.split(",")}
    )
    if attacked:
        callbacks.append(Attack())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("WORLD_SIZE", "1")),
        strategy="ddp",
        max_steps=args.steps,
        min_steps=args.min_steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=args.validate_every,
        limit_val_batches=4 if args.validate_every else 0,
    )
    result: dict[str, Any] = {"rank": rank, "finished": False, "error": None}
    try:
        loader = DataLoader(dataset, batch_size=16)
        trainer.fit(TinyClassifier(), loader, loader if args.validate_every else None)
        result["finished"] = True
    except Exception as exc:  # the failure itself, when Lightning would not stop (min_steps)
        result["raised"] = type(exc).__name__
    failure = guard.failure
    result["global_step"] = trainer.global_step
    result["guard_closed"] = guard.guard is None
    finish(args.out, rank, result, failure)


if __name__ == "__main__":
    raise SystemExit(main())
