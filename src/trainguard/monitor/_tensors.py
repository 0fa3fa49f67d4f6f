"""The part of a tensor this rank holds: a DTensor (FSDP2, tensor parallel) is checked by its shard."""

from __future__ import annotations

import torch

__all__ = ["local"]


def local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
