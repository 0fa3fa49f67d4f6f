"""The guard in a Lightning `Trainer` (`lightning.pytorch`): a callback that stops the Trainer through
`trainer.should_stop`, on every rank at the same global step, when a check fails.

    from trainguard.monitor.lightning import TrainguardCallback     # pytorch_lightning: see below

    guard = TrainguardCallback()                    # takes watch()'s settings: skip=["step_time"], ...
    Trainer(accelerator="gpu", devices=8, strategy="ddp", callbacks=[guard]).fit(module, data)
    if guard.failure is not None:                   # the trainer stopped early: say so to the scheduler
        raise guard.failure

One implementation, two namespaces: Lightning ships the same Trainer as `lightning.pytorch` and as
`pytorch_lightning`, whose `Callback` classes are distinct, and a Trainer accepts only its own. The
hooks live in `trainguard.monitor._callback.LightningGuard`, which imports neither; this module adds
`lightning.pytorch.Callback` as the base, `trainguard.monitor.pytorch_lightning` adds
`pytorch_lightning.Callback`. Each module imports only its own package, so either can be installed alone.

How it meets the Trainer, on every rank:
- on_train_start: the guard goes on the strategy's model (the DDP wrapper, whose inner module runs
  every training step) and on `trainer.optimizers[0]`; the run config compared between ranks is the
  module's `hparams`. The step's closure (forward and backward, which Lightning hands to
  `optimizer.step`) is run before the guard's step hook, so the guard reads this step's gradients.
- on_before_backward / on_before_optimizer_step: the step's loss (the micro-batches' sum) is given to
  the guard before its optimizer step.
- on_train_batch_end, after a batch that stepped the optimizer (`trainer.global_step` moved, the same
  on every rank; accumulation batches do not): the verdict on that step. A failure sets
  `trainer.should_stop`, is logged and kept in `callback.failure`. If Lightning goes on regardless
  (min_epochs or min_steps not reached), the next batch raises the failure on every rank.
- on_train_end or on_exception: the guard is closed.
"""

from __future__ import annotations

from trainguard.errors import MissingExtraError
from trainguard.monitor._callback import LightningGuard

try:
    from lightning.pytorch import Callback
except ImportError:
    raise MissingExtraError("lightning", "lightning", "The Lightning callback") from None

__all__ = ["TrainguardCallback"]


class TrainguardCallback(LightningGuard, Callback):
    """Guards a `lightning.pytorch` Trainer's fit; `failure` holds the IntegrityError that stopped it."""
