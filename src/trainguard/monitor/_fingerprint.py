"""Exact fingerprints of tensors, with secret per-run weights, for comparing replicas bit for bit.

A tensor's bytes are read as 64-bit integers (two float32, four bf16...) and laid out in rows of `width`
words; the column sums are taken with wrapping integer addition, which is exact and does not depend on
the order of the reduction, so every replica computes the same value on any hardware or thread count.
Each column sum is then multiplied by a secret weight. A change to any bit of any word changes the
result; moving words changes it unless they move by a multiple of `width` within one tensor, and
`width` is a secret prime no shorter than a row of any common layer, so swapped rows, permuted channels
and swapped tensors all show. Integer sums vectorise: 11M float32 cost about 2 ms on one CPU core,
where a float64 or an int32-to-int64 sum costs 35 ms or more.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import torch

from trainguard.monitor._tensors import local

__all__ = ["Fingerprinter"]

# Small tensors are fingerprinted together up to a batch of _BATCH_LIMIT 64-bit words; a batch's
# layout (each word's weight and tensor, 16 bytes a word) is kept for the next step, for up to
# _LAYOUTS_KEPT distinct lists of sizes.
_BATCH_LIMIT = 1 << 20
_LAYOUTS_KEPT = 16
# Primes for the row width, in 64-bit words; one is drawn per run.
_WIDTHS = (4093, 4099, 4111, 4127, 4129, 4133, 4139, 4153, 4157, 4159, 4177, 4201, 4211, 4217, 4219)


class Fingerprinter:
    """Fingerprints tensors with weights drawn once per run; every replica must share `seed`."""

    def __init__(self, seed: int, device: torch.device | None = None) -> None:
        generator = torch.Generator().manual_seed(seed)
        pick = int(torch.randint(len(_WIDTHS), (1,), generator=generator))
        self.width = _WIDTHS[pick]
        limit = 2**62
        weights = torch.randint(-limit, limit, (self.width,), dtype=torch.int64, generator=generator)
        # Odd weights: an odd multiplier is invertible mod 2**64, so no bit of a column sum is lost.
        self._weights = weights | 1
        self._on: dict[torch.device, torch.Tensor] = {}
        self._layouts: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if device is not None:
            self._weights_on(device)

    @staticmethod
    def new_seed() -> int:
        """A secret seed; rank 0 draws it and shares it with the others over the monitor's group."""
        return secrets.randbits(62)

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        weights = self._on.get(device)
        if weights is None:
            weights = self._weights.to(device)
            self._on[device] = weights
        return weights

    def of(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """One int64 fingerprint per tensor, on the tensors' device (no host sync). Where they lie
        on several (Adam's `step` stays on the CPU beside moments on a GPU), on the accelerator:
        the CPU's values are copied there without waiting.

        Tensors of one row at most (biases, norms: most of a model's tensors, few of its bytes) are
        fingerprinted together, in a handful of operations rather than a dozen each; the result is
        the same as `one()` gives, word for word. (Longer ones are not: summing their columns
        first costs less than weighting every word, measured on a CPU.)"""
        if not tensors:
            return torch.zeros(0, dtype=torch.int64)
        words = [_words(local(tensor.detach())) for tensor in tensors]
        device = next((w.device for w in words if w.device.type != "cpu"), words[0].device)
        small: list[int] = []
        total = 0
        for position, each in enumerate(words):
            size = each.numel()
            if size <= self.width and total + size <= _BATCH_LIMIT and each.device == device:
                small.append(position)
                total += size
        found: dict[int, torch.Tensor] = {}
        if len(small) > 1:
            together = self._small([words[p] for p in small], [tensors[p].numel() for p in small])
            found = dict(zip(small, together.unbind(), strict=True))
        results: list[torch.Tensor | None] = [found.get(p) for p in range(len(tensors))]
        elsewhere: dict[torch.device, list[int]] = {}
        for p, tensor in enumerate(tensors):
            if results[p] is None:
                if words[p].device == device:
                    results[p] = self._of_words(words[p], tensor.numel())
                else:
                    elsewhere.setdefault(words[p].device, []).append(p)
        for positions in elsewhere.values():
            # One copy per device, started without waiting.
            values = torch.stack([self._of_words(words[p], tensors[p].numel()) for p in positions])
            for p, value in zip(positions, values.to(device, non_blocking=True).unbind(), strict=True):
                results[p] = value
        return torch.stack([result for result in results if result is not None])

    def _small(self, words: Sequence[torch.Tensor], lengths: Sequence[int]) -> torch.Tensor:
        """The fingerprints of tensors of one row at most: every word times its column's weight,
        summed by tensor (wrapping, as `one()` sums), plus each tensor's length."""
        device = words[0].device
        key = (tuple(each.numel() for each in words), tuple(lengths), device)
        layout = self._layouts.get(key)
        if layout is None:
            # Made once per layout: a copy from the host to a GPU here would wait for it.
            sizes = key[0]
            counts = torch.tensor(sizes).to(device)
            columns = torch.cat([torch.arange(size, device=device) for size in sizes])
            weights = self._weights_on(device).index_select(0, columns)
            owners = torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)
            layout = self._layouts[key] = (
                weights,
                owners,
                torch.tensor(lengths, dtype=torch.int64).to(device),
            )
            if len(self._layouts) > _LAYOUTS_KEPT:  # a job whose tensors keep changing shape
                del self._layouts[next(iter(self._layouts))]
        weights, owners, length = layout
        terms = torch.cat(list(words)) * weights
        totals = torch.zeros(len(lengths), dtype=torch.int64, device=device).index_add_(0, owners, terms)
        return totals + length

    def one(self, tensor: torch.Tensor) -> torch.Tensor:
        """The fingerprint of one tensor, as a 0-d int64 tensor on its device."""
        return self._of_words(_words(local(tensor.detach())), tensor.numel())

    def _of_words(self, words: torch.Tensor, length: int) -> torch.Tensor:
        weights = self._weights_on(words.device)
        rows, tail = divmod(words.numel(), self.width)
        total = torch.zeros((), dtype=torch.int64, device=words.device)
        if rows:
            columns = words[: rows * self.width].view(rows, self.width).sum(dim=0)
            total = total + (columns * weights).sum()
        if tail:
            total = total + (words[rows * self.width :] * weights[:tail]).sum()
        # The length goes in too, so that a tensor of zeros is not the same as an empty one.
        return total + length


def _words(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as int64 words; a ragged or misaligned tensor is copied, zero-padded."""
    raw = tensor.reshape(-1).contiguous()
    if raw.dtype == torch.bool:
        raw = raw.view(torch.uint8)
    raw = raw.view(torch.uint8)
    if raw.numel() % 8 == 0 and raw.storage_offset() % 8 == 0:
        return raw.view(torch.int64)
    padded = torch.zeros(-(-raw.numel() // 8) * 8, dtype=torch.uint8, device=raw.device)
    padded[: raw.numel()] = raw
    return padded.view(torch.int64)
