"""The code a training step runs through, beyond `CodeSnapshot`'s list of critical callables.

- every callable of the modules a step runs through, and of trainguard itself, compared in turns
  (`NamespaceSnapshot`): a patch one function away from the watched ones is still a patch;
- at watch(), critical callables whose code lies outside the environment: a patch made before the guard
  was there to see it;
- during the step, a TorchFunctionMode or TorchDispatchMode on the stack (they see and can change every
  tensor operation), and an operator kernel registered from Python over a real device's (torch.library:
  `addcdiv_` on the CPU replaced, say).
"""

from __future__ import annotations

import torch
import torch.library

from trainguard.envcheck._inprocess import foreign_code
from trainguard.envcheck._namespaces import NamespaceSnapshot
from trainguard.errors import TrainguardError

__all__ = ["CodeWatch"]

# Python kernels under these dispatch keys compute shapes for tracing, not values.
_HARMLESS_KEYS = ("Meta",)


class CodeWatch:
    def __init__(self, turns: int) -> None:
        self._namespaces = NamespaceSnapshot.take(turns=turns)
        self._kernels = frozenset(_python_kernels())

    def before_watch(self) -> str | None:
        """A critical callable patched before watch(), or None."""
        try:
            found = foreign_code()
        except (TrainguardError, OSError):  # no environment layout to judge by: nothing to add
            return None
        return f"{found[0].message} (patched before watch())" if found else None

    def check(self, step: int) -> str | None:
        """What is wrong now, or None: one slice of the namespaces, and the dispatch state."""
        modes = _active_modes()
        if modes:
            return f"a {modes[0]} is active during the optimizer step: it sees and can change every operation"
        if len(getattr(torch.library, "_impls", ())) != len(self._kernels):
            kernels = _python_kernels()
            added = sorted(k for k in kernels - self._kernels if not k.endswith(_HARMLESS_KEYS))
            if added:
                return f"an operator kernel was registered from Python after watch(): {added[0]}"
        found = self._namespaces.check(step)
        return found[0].message if found else None


def _python_kernels() -> set[str]:
    return set(getattr(torch.library, "_impls", ()))


def _active_modes() -> list[str]:
    modes: list[str] = []
    for length, get in (
        (torch._C._len_torch_function_stack, torch._C._get_function_stack_at),
        (torch._C._len_torch_dispatch_stack, torch._C._get_dispatch_stack_at),
    ):
        modes.extend(f"{type(get(i)).__name__} ({type(get(i)).__module__})" for i in range(length()))
    return modes
