"""Resource limits for one scan; reaching one makes the verdict "undecided", never "clean"."""

from __future__ import annotations

import dataclasses

from trainguard._pickle.machine import PickleLimits

GiB = 1 << 30
MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ScanLimits:
    """Bounds on nesting, expansion and work for one top-level file."""

    max_depth: int = 16  # containers inside containers
    max_expanded_bytes: int = 8 * GiB  # bytes decompressed from all containers of one file
    # Decompressed/compressed, checked once past ratio_floor bytes. Deflate tops out near 1030:1,
    # so a bomb limit must sit well below that; real checkpoints compress 1-10x.
    max_ratio: float = 200.0
    ratio_floor: int = 64 * MiB
    max_members: int = 100_000  # entries in one archive
    max_safetensors_header: int = 100 * MiB  # the same bound the safetensors library applies
    max_npy_header: int = 1 * MiB
    spool_in_memory: int = 32 * MiB  # decompressed data above this goes to a temporary file
    # ... and never takes the temporary folder's disk below this much free space.
    spill_reserve: int = 1 * GiB
    pickle: PickleLimits = dataclasses.field(default_factory=PickleLimits)

    def __post_init__(self) -> None:
        for name in (
            "max_depth",
            "max_expanded_bytes",
            "max_members",
            "max_safetensors_header",
            "max_npy_header",
            "spool_in_memory",
            "spill_reserve",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_ratio <= 1:
            raise ValueError("max_ratio must be above 1")
