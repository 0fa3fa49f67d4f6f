"""The code a training step runs through, beyond `CodeSnapshot`'s list of critical callables.

- every callable of the modules a step runs through, and of trainguard itself (`NamespaceSnapshot`):
  a patch one function away from the watched ones is still a patch. Until the third step ends they
  are compared in two turns; that step is profiled, and from then on what it ran is compared at every
  step and the rest in `turns` turns;
- at watch(), critical callables whose code lies outside the environment: a patch made before the guard
  was there to see it;
- during the step, a TorchFunctionMode or TorchDispatchMode on the stack (they see and can change every
  tensor operation), and an operator kernel registered from Python over a real device's (torch.library:
  `addcdiv_` on the CPU replaced, say).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.library

from trainguard.envcheck._inprocess import foreign_code
from trainguard.envcheck._namespaces import NamespaceSnapshot, Ran
from trainguard.errors import TrainguardError

__all__ = ["CodeWatch"]

# Python kernels under these dispatch keys compute shapes for tracing, not values.
_HARMLESS_KEYS = ("Meta",)
# Before a step has been profiled, everything is compared in this many turns.
_FIRST_TURNS = 2
# The step profiled: from the end of this one to the end of the next (set-up is behind by then).
_PROFILED_AFTER = 2


class CodeWatch:
    def __init__(self, turns: int) -> None:
        self._namespaces = NamespaceSnapshot.take(turns=_FIRST_TURNS)
        self._turns = turns
        self._profile: _Profile | None = None
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
        if self._profile is not None:
            self._focus()
        found = self._namespaces.check(step)
        if step == _PROFILED_AFTER and not found:
            self._start_profile()
        return found[0].message if found else None

    def close(self) -> None:
        """Stop profiling, if a step is being profiled."""
        profile, self._profile = self._profile, None
        if profile is not None and sys.getprofile() is profile:
            sys.setprofile(None)

    def _start_profile(self) -> None:
        # Only where nobody profiles already (a profiler of the user's, or one that would hide what
        # runs): the namespaces then stay compared in two turns.
        if sys.getprofile() is None:
            self._profile = _Profile()
            sys.setprofile(self._profile)

    def _focus(self) -> None:
        profile, self._profile = self._profile, None
        assert profile is not None
        if sys.getprofile() is not profile:
            return  # replaced or removed while the step ran: what was seen may be partial
        sys.setprofile(None)
        self._namespaces.focus(Ran(profile.codes, profile.builtins.values()), turns=self._turns)


class _Profile:
    """Records what a step runs on this thread: each Python function's code, and each builtin that
    is not a method of an instance (which would keep what the step made alive)."""

    def __init__(self) -> None:
        self.codes: set[types.CodeType] = set()
        self.builtins: dict[int, object] = {}

    def __call__(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "call":
            self.codes.add(frame.f_code)
        elif event == "c_call":
            owner = getattr(arg, "__self__", None)
            if owner is None or isinstance(owner, (types.ModuleType, type)):
                self.builtins[id(arg)] = arg


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
