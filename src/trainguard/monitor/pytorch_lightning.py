"""The guard in a `pytorch_lightning` Trainer: the same callback as `trainguard.monitor.lightning`
(see there), on `pytorch_lightning.Callback`, for code that imports Lightning by that name.

    from trainguard.monitor.pytorch_lightning import TrainguardCallback
"""

from __future__ import annotations

from trainguard.errors import MissingExtraError
from trainguard.monitor._callback import LightningGuard

try:
    from pytorch_lightning import Callback
except ImportError:
    raise MissingExtraError("pytorch_lightning", "lightning", "The pytorch_lightning callback") from None

__all__ = ["TrainguardCallback"]


class TrainguardCallback(LightningGuard, Callback):
    """Guards a `pytorch_lightning` Trainer's fit; `failure` holds the IntegrityError that stopped it."""
