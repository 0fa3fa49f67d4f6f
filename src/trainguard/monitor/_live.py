"""Objects of a kind alive in the process (learning-rate schedulers, data samplers), found once."""

from __future__ import annotations

import gc
import warnings
from typing import Any

__all__ = ["live_instances"]


def live_instances(kind: type) -> list[Any]:
    # isinstance() on some deprecated module-level objects warns (torch.distributed.reduce_op).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, kind)]
