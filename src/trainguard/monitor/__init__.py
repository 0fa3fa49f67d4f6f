"""In-job integrity checks for PyTorch training: tampering and silent corruption caught at the step
they happen, with the rank at fault named.

    import trainguard
    guard = trainguard.watch(model, optimizer)   # plain loops; see also hf.py and lightning.py

Importing this package does not import torch; its modules do, when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports

if TYPE_CHECKING:
    from trainguard.monitor._checks import Action, Check
    from trainguard.monitor._config import GuardConfig
    from trainguard.monitor._guard import Guard
    from trainguard.monitor._rollback import rollback_to_verified
    from trainguard.monitor._watch import watch

__all__ = ["Action", "Check", "Guard", "GuardConfig", "rollback_to_verified", "watch"]

_WHERE = {
    "Action": "_checks",
    "Check": "_checks",
    "GuardConfig": "_config",
    "Guard": "_guard",
    "rollback_to_verified": "_rollback",
    "watch": "_watch",
}

__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
