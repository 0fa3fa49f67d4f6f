"""The attacks the framework jobs plant: the same update flip as job.py's, on torch's own per-tensor
Adam function, so the job's optimizer (AdamW on CPU) runs it from the next step on."""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch


def flip_adam_updates() -> None:
    """Every later Adam/AdamW update in this process moves each parameter the wrong way."""
    # torch.optim removes its submodules' names from its namespace: reach the module itself.
    module = importlib.import_module("torch.optim.adam")
    original = module._single_tensor_adam

    @functools.wraps(original)
    def patched(params: list[torch.Tensor], *args: Any, **kwargs: Any) -> None:
        before = [p.detach().clone() for p in params]
        original(params, *args, **kwargs)
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):
                p.copy_(2 * old - p)

    module._single_tensor_adam = patched
