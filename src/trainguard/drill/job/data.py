"""The drill job's text: sentences from a small seeded grammar, as byte tokens, cut into batches.

Each rank reads its own slice of every step's batch, as a DistributedSampler would hand it out. This
module is part of the job's own code, which `trainguard drill` copies into its workspace for each run:
an insider who can write a colleague's code can write here, and some of the drill's attacks do.
"""

from __future__ import annotations

import random

import torch

SUBJECTS = ("the model", "a rank", "the optimizer", "every replica", "the ledger", "a witness", "the guard")
VERBS = ("checks", "signs", "records", "compares", "verifies", "names", "keeps")
OBJECTS = ("the update", "each checkpoint", "the gradient", "its evidence", "the loss", "every step")
ENDINGS = (".", " again.", " at once.", " before the next step.", " on every rank.")
VOCAB = 128  # ASCII bytes


def corpus(seed: int = 0, sentences: int = 4000) -> bytes:
    """A deterministic text: the same on every rank and every run with the same seed."""
    rng = random.Random(seed)
    words = (
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        for _ in range(sentences)
    )
    return " ".join(words).encode("ascii")


class Batches:
    """Step `step`'s batch for `rank` of `world`: `per_rank` windows of `context + 1` tokens."""

    def __init__(self, text: bytes, *, context: int, per_rank: int, world: int, rank: int, seed: int) -> None:
        self.tokens = torch.tensor(list(text), dtype=torch.long)
        self.context, self.per_rank, self.world, self.rank, self.seed = context, per_rank, world, rank, seed

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(
            0, len(self.tokens) - self.context - 1, (self.per_rank * self.world,), generator=generator
        )
        mine = starts[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        windows = torch.stack([self.tokens[s : s + self.context + 1] for s in mine.tolist()])
        return windows[:, :-1], windows[:, 1:]
