"""Whole namespaces of the code a training step runs through, checked in turns.

`CodeSnapshot` watches a list of critical callables. A saboteur who reads that list patches the next
function along instead: `torch.nn.functional.cross_entropy` with a flipped gradient, `LambdaLR.get_lr`,
`torch.Tensor.addcdiv_`, or the monitor's own `decide`. `NamespaceSnapshot` records every callable bound
in the modules a step runs through (torch.nn, torch.optim with its schedulers, torch.autograd,
torch.utils.data, DDP, the Tensor class, torch's own namespace, and trainguard itself), every class
defined there with its methods, and what each Python function runs (code, defaults, closure contents).
`check(turn)` compares one of `turns` slices, so every binding is compared every `turns` steps for a
small cost per step; `check()` compares everything.

Bindings that are not callables (counters, caches, flags) change legitimately and are not compared.
A new submodule bound in its package is an import, not a patch. A replacement that is exactly torch's
own wrapper around the recorded function (see `_inprocess`) is accepted. Standard library only.
"""

from __future__ import annotations

import gc
import importlib
import operator
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

from trainguard.envcheck._findings import EnvFinding
from trainguard.envcheck._inprocess import CodeSnapshot, _context, _patched

__all__ = ["NamespaceSnapshot", "Ran", "watched_modules"]

# Modules (and every loaded submodule) whose callables a training step runs through.
_PREFIXES = (
    "torch.nn",
    "torch.optim",
    "torch.autograd",
    "torch.utils.data",
    "torch.amp",
    "torch.cuda.amp",
    "torch.distributed.algorithms.ddp_comm_hooks",
    "trainguard",
)
_EXACT = (
    "torch",
    "torch._tensor",
    "torch.functional",
    "torch.random",
    "torch._C._nn",
    "torch._VF",
    "torch.distributed",
    "torch.distributed.distributed_c10d",
    "numpy.random",
    "random",
)
_MISSING = object()

# (label, dict, key, value): the binding `dict[key] is value` must still hold.
_Binding = tuple[str, dict[str, object], str, object]
# (label, function, code, defaults, kwdefaults, closure contents): what the function runs.
_Function = tuple[str, types.FunctionType, object, object, object, tuple[object, ...]]
# [label, dict, keys, length, class or None]: no callable may be added under a new key (looked at when
# the length moves).
_Keys = list[object]


def watched_modules(prefixes: Sequence[str] = _PREFIXES, exact: Sequence[str] = _EXACT) -> list[str]:
    names = [
        name
        for name in list(sys.modules)
        if name in exact or any(name == p or name.startswith(p + ".") for p in prefixes)
    ]
    return sorted(names)


def _cells(function: types.FunctionType) -> tuple[object, ...]:
    return tuple(_cell(cell) for cell in function.__closure__ or ())


def _cell(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _MISSING


def _is_code(value: object) -> bool:
    # What runs when called: functions, methods, descriptors around them, builtins and classes.
    return callable(value) or isinstance(value, (staticmethod, classmethod, property))


def _function_of(value: object) -> types.FunctionType | None:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    return value if isinstance(value, types.FunctionType) else None


class NamespaceSnapshot:
    """The callables bound in the watched modules and classes now; `check()` lists what differs."""

    def __init__(
        self,
        bindings: list[_Binding],
        functions: list[_Function],
        keys: list[_Keys],
        *,
        turns: int,
        accept: Callable[[object, object], bool],
    ) -> None:
        self._all = (bindings, functions, keys)
        self._accept = accept
        self.size = len(bindings) + len(functions)
        self.focused = 0
        self._hot: _Slice | None = None
        self._slices = _sliced(bindings, functions, keys, turns)
        self.turns = len(self._slices)

    @classmethod
    def take(cls, *, turns: int = 16, modules: Sequence[str] | None = None) -> NamespaceSnapshot:
        # Looking at deprecated module attributes warns (torch.distributed.reduce_op): nothing is used.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls._take(turns, modules)

    @classmethod
    def _take(cls, turns: int, modules: Sequence[str] | None) -> NamespaceSnapshot:
        bindings: list[_Binding] = []
        functions: list[_Function] = []
        keys: list[_Keys] = []
        seen_functions: set[int] = set()
        seen_classes: set[int] = set()
        for module_name in modules if modules is not None else watched_modules():
            module = sys.modules.get(module_name)
            if isinstance(module, types.ModuleType) and _initializing(module):
                # Half-imported by another thread: wait on its import lock for the whole module, or
                # what it binds next would look added. (A flag set by hand waits for nothing.)
                module = importlib.import_module(module_name)
            if not isinstance(module, types.ModuleType):
                continue
            for label, namespace, klass in _namespaces(module_name, module, seen_classes):
                # A copy taken in one C call: another thread (a lazy import, a backend's own thread)
                # may bind names while this runs, and a live iteration would then stop with an error.
                current = dict(namespace)
                recorded = frozenset(k for k, v in current.items() if _is_code(v))
                keys.append([label, namespace, recorded, len(current), klass])
                # Sorted: every rank takes the same slices (set order depends on the hash seed).
                for key in sorted(recorded):
                    value = current[key]
                    bindings.append((f"{label}.{key}", namespace, key, value))
                    function = _function_of(value)
                    if function is not None and id(function) not in seen_functions:
                        seen_functions.add(id(function))
                        functions.append(
                            (
                                f"{label}.{key}",
                                function,
                                function.__code__,
                                function.__defaults__,
                                function.__kwdefaults__,
                                _cells(function),
                            )
                        )
        return cls(bindings, functions, keys, turns=turns, accept=_torch_wrapper_test())

    def focus(self, ran: Ran, *, turns: int) -> None:
        """Compare what a step was seen to run (`ran`, from one profiled step) at every step, in a
        slice of its own, and the rest in `turns` slices: a patch to code the step runs is found at
        the next step, one to code it does not run within `turns` steps, for far less work a step."""
        bindings, functions, keys = self._all
        hot_bindings = [b for b in bindings if ran.has(b[3])]
        hot_functions = [f for f in functions if ran.has(f[1])]
        hot_spaces = {id(b[1]) for b in hot_bindings}
        hot_keys = [k for k in keys if id(k[1]) in hot_spaces]
        self._hot = _Slice(hot_bindings, hot_functions, hot_keys)
        chosen = {id(x) for x in (*hot_bindings, *hot_functions, *hot_keys)}
        self._slices = _sliced(
            [b for b in bindings if id(b) not in chosen],
            [f for f in functions if id(f) not in chosen],
            [k for k in keys if id(k) not in chosen],
            turns,
        )
        self.turns = len(self._slices)
        self.focused = len(hot_bindings) + len(hot_functions)

    def check(self, turn: int | None = None) -> list[EnvFinding]:
        """What differs: what a step runs, and slice `turn % turns` of the rest (everything when
        `turn` is None)."""
        chosen = self._slices if turn is None else [self._slices[turn % self.turns]]
        findings: list[EnvFinding] = []
        for part in (*([self._hot] if self._hot is not None else []), *chosen):
            if part.unchanged():
                continue
            part.fast = None  # what changed may be accepted (torch's wrappers): rebuilt next time
            findings.extend(self._check_bindings(part))
            findings.extend(self._check_functions(part))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                findings.extend(self._check_keys(part))
        return findings

    def _check_bindings(self, part: _Slice) -> Iterator[EnvFinding]:
        bindings = part.bindings
        for position, (label, namespace, key, value) in enumerate(bindings):
            now = namespace.get(key, _MISSING)
            if now is value:
                continue
            if now is not _MISSING and self._accept(now, value):
                bindings[position] = (label, namespace, key, now)  # torch's own wrapper: watch it now
                continue
            what = "removed" if now is _MISSING else f"replaced by {_where(now)}"
            yield _finding(label, f"{label} was {what}")

    def _check_functions(self, part: _Slice) -> Iterator[EnvFinding]:
        for label, function, code, defaults, kwdefaults, cells in part.functions:
            if function.__code__ is not code:
                yield _finding(
                    label, f"{label} was changed in place (__code__ swapped for {_where(function)})"
                )
            elif function.__defaults__ is not defaults or function.__kwdefaults__ is not kwdefaults:
                yield _finding(label, f"{label} was changed in place (default arguments replaced)")
            elif _cells(function) != cells and not _same(_cells(function), cells):
                yield _finding(label, f"{label} was changed in place (a closure variable replaced)")

    def _check_keys(self, part: _Slice) -> Iterator[EnvFinding]:
        for entry in part.keys:
            label, namespace, recorded, length, klass = entry
            assert isinstance(namespace, dict) and isinstance(recorded, frozenset)
            if len(namespace) == length:
                continue
            entry[3] = len(namespace)
            for key, value in list(namespace.items()):
                if key in recorded or not _is_code(value) or isinstance(value, types.ModuleType):
                    continue
                if isinstance(klass, type) and self._accept(value, _inherited(klass, key)):
                    # torch wraps a class's inherited `step` on its first instance (_patch_step_function).
                    entry[2] = recorded = recorded | {key}
                    continue
                if klass is None and _reexport(value):
                    # A package's lazy `__getattr__` caching what one of its own modules defines.
                    entry[2] = recorded = recorded | {key}
                    continue
                # A class is where attributes are shadowed: `torch.Tensor.addcdiv_ = f` hides TensorBase's.
                yield _finding(f"{label}.{key}", f"{label}.{key} was added: {_where(value)}")


def _initializing(module: types.ModuleType) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _reexport(value: object) -> bool:
    """True for a class or function bound under its own name in the torch or trainguard module that
    defines it (by file, not by the `__module__` it claims)."""
    name = getattr(value, "__name__", None)
    module = sys.modules.get(getattr(value, "__module__", None) or "")
    if not isinstance(name, str) or module is None or module.__dict__.get(name) is not value:
        return False
    function = _function_of(value)
    where = function.__code__.co_filename if function is not None else getattr(module, "__file__", None)
    return isinstance(where, str) and where.startswith(_package_dirs())


def _package_dirs() -> tuple[str, ...]:
    dirs = []
    for name in ("torch", "trainguard"):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            dirs.append(os.path.dirname(path) + os.sep)
    return tuple(dirs)


def _inherited(klass: type, key: str) -> object:
    for base in klass.__mro__[1:]:
        if key in vars(base):
            return vars(base)[key]
    return _MISSING


class Ran:
    """What one step was seen to run: Python code objects, and builtins not bound to an instance
    (torch's functions, a module's C functions). Held by id once the step is over, so that nothing
    the step made is kept alive."""

    def __init__(self, codes: Iterable[types.CodeType], builtins: Iterable[object]) -> None:
        self._codes = {id(code) for code in codes}
        self._builtins = {id(builtin) for builtin in builtins}

    def has(self, value: object) -> bool:
        function = _function_of(value)
        if function is not None:
            return id(function.__code__) in self._codes
        return id(value) in self._builtins


class _Slice:
    """Some bindings, function internals and namespaces, compared together."""

    def __init__(self, bindings: list[_Binding], functions: list[_Function], keys: list[_Keys]) -> None:
        self.bindings = bindings
        self.functions = functions
        self.keys = keys
        self.fast: _Fast | None = None

    def unchanged(self) -> bool:
        if self.fast is None:
            self.fast = _Fast(self.bindings, self.functions, self.keys)
        return self.fast.unchanged()


def _sliced(
    bindings: list[_Binding], functions: list[_Function], keys: list[_Keys], turns: int
) -> list[_Slice]:
    turns = max(1, turns)
    return [_Slice(bindings[i::turns], functions[i::turns], keys[i::turns]) for i in range(turns)]


class _Fast:
    """One slice's bindings and function internals as flat tuples, compared by identity in C loops."""

    def __init__(
        self, bindings: Sequence[_Binding], functions: Sequence[_Function], keys: Sequence[_Keys]
    ) -> None:
        self.namespaces = tuple(k[1] for k in keys)
        self.lengths = [k[3] for k in keys]
        self.dicts = tuple(b[1] for b in bindings)
        self.keys = tuple(b[2] for b in bindings)
        self.values = tuple(b[3] for b in bindings)
        self.functions = tuple(f[1] for f in functions)
        self.codes = tuple(f[2] for f in functions)
        self.defaults = tuple(f[3] for f in functions)
        self.kwdefaults = tuple(f[4] for f in functions)
        cells = [(c, v) for f in functions for c, v in zip(f[1].__closure__ or (), f[5], strict=True)]
        self.cells = tuple(c for c, v in cells if v is not _MISSING)
        self.contents = tuple(v for _, v in cells if v is not _MISSING)

    def unchanged(self) -> bool:
        try:
            return (
                all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.values))
                and all(map(operator.is_, map(_CODE, self.functions), self.codes))
                and all(map(operator.is_, map(_DEFAULTS, self.functions), self.defaults))
                and all(map(operator.is_, map(_KWDEFAULTS, self.functions), self.kwdefaults))
                and all(map(operator.is_, map(_CONTENTS, self.cells), self.contents))
                # No binding added (a class's attribute shadowing its base's): looked at when a
                # namespace's length moved.
                and list(map(len, self.namespaces)) == self.lengths  # type: ignore[arg-type]
            )
        except ValueError:  # a closure cell emptied
            return False


_CODE = operator.attrgetter("__code__")
_DEFAULTS = operator.attrgetter("__defaults__")
_KWDEFAULTS = operator.attrgetter("__kwdefaults__")
_CONTENTS = operator.attrgetter("cell_contents")


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _namespaces(
    module_name: str, module: types.ModuleType, seen_classes: set[int]
) -> Iterator[tuple[str, dict[str, object], type | None]]:
    """The module's own dict and the dict of each class it defines (the same class once)."""
    yield module_name, module.__dict__, None
    for name, value in list(module.__dict__.items()):
        if (
            isinstance(value, type)
            and value.__module__ == module_name
            and id(value) not in seen_classes
            and isinstance(vars(value), types.MappingProxyType)
            and not _legacy_tensor_type(value)
        ):
            seen_classes.add(id(value))
            # A heap type's __dict__ is a proxy onto the real dict, which `setattr` changes.
            yield f"{module_name}.{name}", _class_dict(value), value


def _legacy_tensor_type(klass: type) -> bool:
    """torch.FloatTensor and its nine siblings: each holds a copy of every Tensor method (almost 7,000
    bindings together, a third of all watched), yet no tensor is ever one of them (their constructor
    returns a torch.Tensor), so no step runs their methods, and they are immutable (setattr raises).
    Their binding in the torch module is still watched."""
    meta = type(klass)
    immutable = bool(klass.__flags__ & _IMMUTABLE_TYPE)
    return immutable and meta.__name__ == "tensortype" and meta.__module__ == "torch"


# Py_TPFLAGS_IMMUTABLETYPE: a class whose attributes cannot be set.
_IMMUTABLE_TYPE = 1 << 8


def _class_dict(klass: type) -> dict[str, object]:
    # The proxy's `.copy()` would freeze it; the live dict is reached through the gc referents.
    for referent in gc.get_referents(vars(klass)):
        if isinstance(referent, dict):
            return referent
    return dict(vars(klass))


def _where(value: object) -> str:
    function = _function_of(value)
    if function is None:
        return f"a {type(value).__name__} object"
    code = function.__code__
    return f"{code.co_qualname} from {code.co_filename}:{code.co_firstlineno}"


def _finding(name: str, message: str) -> EnvFinding:
    return _patched(name, message + ".")


def _torch_wrapper_test() -> Callable[[object, object], bool]:
    """True when `now` is torch's own wrapper around `was` (as `CodeSnapshot` accepts it)."""
    snapshot = CodeSnapshot([], [], _context())
    return snapshot._is_torch_wrapper
