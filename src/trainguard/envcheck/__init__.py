"""Prove that the Python environment that trains is the one that was installed.

    from trainguard.envcheck import snapshot_environment, verify_environment, verify_loaded, CodeSnapshot

`snapshot_environment` / `verify_environment` read an environment from the outside (never importing or
running it): every file against a signed baseline or its distributions' RECORDs, cached bytecode against
its source, and the injection points that run code at start-up. `verify_loaded` checks the modules this
process has loaded; `CodeSnapshot` notices monkeypatched optimizers, seeds, data loaders and hooks.
Nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports

if TYPE_CHECKING:
    from trainguard.envcheck._api import snapshot_environment, verify_environment
    from trainguard.envcheck._baseline import Baseline, read_baseline, write_baseline
    from trainguard.envcheck._findings import EnvFinding
    from trainguard.envcheck._inprocess import CodeSnapshot, foreign_code, verify_loaded
    from trainguard.envcheck._verify import EnvReport

__all__ = [
    "Baseline",
    "CodeSnapshot",
    "EnvFinding",
    "EnvReport",
    "foreign_code",
    "read_baseline",
    "snapshot_environment",
    "verify_environment",
    "verify_loaded",
    "write_baseline",
]

_WHERE = {
    "snapshot_environment": "_api",
    "verify_environment": "_api",
    "Baseline": "_baseline",
    "read_baseline": "_baseline",
    "write_baseline": "_baseline",
    "EnvFinding": "_findings",
    "CodeSnapshot": "_inprocess",
    "foreign_code": "_inprocess",
    "verify_loaded": "_inprocess",
    "EnvReport": "_verify",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
