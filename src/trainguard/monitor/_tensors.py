"""Tensors as the guard finds them: the part of a tensor this rank holds (a DTensor, under FSDP2 or
tensor parallelism, is checked by its shard), and the tensors inside a batch or a model's output."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["local", "tensors_in"]


def local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def tensors_in(value: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors of a batch as a model receives it, or of its output: arguments, lists, tuples and
    dicts (a Hugging Face ModelOutput is one), a few deep, in a fixed order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item, depth + 1)
