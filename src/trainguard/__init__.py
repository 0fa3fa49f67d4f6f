"""trainguard: protects shared PyTorch training clusters from sabotage and silent corruption.

Importing this package never imports torch, numpy or any framework; each room imports
what it needs only when it is used. The load gate is reachable from here:

    import trainguard

    state = trainguard.load("ckpt/model.pt", trust_policy="trust.toml")  # verified, scanned, then loaded
    trainguard.save(model.state_dict(), "ckpt/model.pt", key=key)          # hashed while written, signed
    with trainguard.load_gate(trust_policy="trust.toml"):                  # torch.load & co. go through it
        ...
    guard = trainguard.watch(model, optimizer)  # every step checked on every rank; IntegrityError on failure
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["IntegrityError", "__version__", "install_load_gate", "load", "load_gate", "save", "watch"]

_GATE = {"install_load_gate", "load", "load_gate", "save"}


def __getattr__(name: str) -> Any:
    # The gate is imported on first use, so `import trainguard` stays instant and framework-free.
    if name in _GATE:
        from trainguard import gate

        return getattr(gate, name)
    if name == "watch":
        from trainguard.monitor import watch

        return watch
    if name == "IntegrityError":
        from trainguard.errors import IntegrityError

        return IntegrityError
    raise AttributeError(f"module 'trainguard' has no attribute {name!r}")
