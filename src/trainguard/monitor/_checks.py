"""The monitor's checks: their names, what each one means, and the action taken by default."""

from __future__ import annotations

import enum

__all__ = ["DEFAULT_ACTIONS", "Action", "Check"]


class Check(enum.Enum):
    """One bit each in the per-rank report; the value is the name used in messages and the ledger."""

    FINGERPRINT = "fingerprint"  # parameters or optimizer state differ between replicas
    GRADIENT = "gradient"  # the reduced gradient differs between replicas
    UPDATE = "update"  # the optimizer's update is not its rule's (sampled re-computation)
    CODE = "code"  # critical functions or hook registries changed
    OUTSIDE = "outside"  # parameters changed outside a checked optimizer step
    NONFINITE = "nonfinite"  # NaN or Inf in the loss or the gradient
    STEP_TIME = "step_time"  # off-CPU time in the forward pass or optimizer step jumped
    DATA_WAIT = "data_wait"  # off-CPU time between steps (data loading, I/O) jumped
    SPIKE = "spike"  # loss or gradient norm far above its recent median
    IDENTITY = "identity"  # run config or environment differ between ranks
    SEED = "seed"  # torch's initial seed differs between ranks
    LOST = "lost"  # a rank left the monitor's all-gather (died, was killed, or stopped on its own)
    HYPERPARAMETERS = "hyperparameters"  # optimizer settings changed outside a scheduler, or differ
    SAMPLER = "sampler"  # a data sampler's seed or settings changed, or differ between ranks
    GRADIENT_PATH = "gradient_path"  # the gradient changed between backward / all-reduce and the step
    DERIVATIVE = "derivative"  # the gradient disagrees with finite differences of the forward pass

    @property
    def bit(self) -> int:
        return 1 << list(Check).index(self)


class Action(enum.Enum):
    STOP = "stop"
    ALERT = "alert"
    ROLLBACK = "rollback"


DEFAULT_ACTIONS: dict[Check, Action] = {
    **dict.fromkeys(Check, Action.STOP),
    # Legitimate causes exist (checkpoint writes, slow storage, a hard batch): say so, keep training.
    Check.DATA_WAIT: Action.ALERT,
    Check.SPIKE: Action.ALERT,
    # Unseeded scripts differ here without harm (DDP copies rank 0's weights); seeded ones should not.
    Check.SEED: Action.ALERT,
}
