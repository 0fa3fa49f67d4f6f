"""A quick pre-check for `CodeSnapshot.changes()`: every recorded object compared by identity in C loops.

`changes()` resolves each critical callable and walks its layers (descriptors, `__wrapped__`, closures)
in Python, a few microseconds each, at every step. Here the same facts are laid out once, from what
the snapshot recorded (never from what is there now, so nothing changed meanwhile is taken as the
original): each resolver with the object it returned, and for each layer the getter that reads the
next fact with the value recorded. When all still hold, `changes()` has nothing to report; when any
does not, it runs its full comparison, which decides. Standard library only.
"""

from __future__ import annotations

import functools
import operator
import types
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["QuickCheck"]


class _Entry(Protocol):
    @property
    def resolve(self) -> Callable[[], object]: ...

    @property
    def value(self) -> object: ...


# (getter, object, expected): `getter(object) is expected` must hold.
_Probe = tuple[Callable[[Any], object], object, object]

# operator.call is new in Python 3.11.
_call: Callable[..., object] = getattr(operator, "call", lambda function, *args: function(*args))
_CODE = operator.attrgetter("__code__")
_DEFAULTS = operator.attrgetter("__defaults__")
_KWDEFAULTS = operator.attrgetter("__kwdefaults__")
_CONTENTS = operator.attrgetter("cell_contents")
_FUNC = operator.attrgetter("__func__")
_PARTIAL_FUNC = operator.attrgetter("func")
_ARGS = operator.attrgetter("args")
_KEYWORDS = operator.attrgetter("keywords")


class QuickCheck:
    """Built from a snapshot's recorded callables (with their layers) and hook registries (with their
    items); `unchanged()` is True only when everything the full comparison looks at is as recorded.
    `usable` is False where a recorded layer cannot be laid out (an empty closure cell)."""

    def __init__(
        self,
        callables: Sequence[Any],
        registries: Sequence[Any],
        *,
        missing: object,
        empty_cell: object,
        is_wrapped_hook: Callable[[object], bool],
    ) -> None:
        self._missing = missing
        self.usable = True
        self.size = len(callables)
        entries: list[_Entry] = [*callables, *registries]
        self._resolvers = tuple(entry.resolve for entry in entries)
        self._values = tuple(entry.value for entry in entries)
        probes: list[_Probe] = []
        sized: list[tuple[object, int]] = []
        for entry in callables:
            layers = entry.layers
            for index, layer in enumerate(layers):
                after = layers[index + 1][0] if index + 1 < len(layers) else missing
                found = self._layer_probes(layer, after, empty_cell, is_wrapped_hook, sized)
                if found is None:
                    self.usable = False
                    return
                probes.extend(found)
        for registry in registries:
            if isinstance(registry.value, dict):
                sized.append((registry.value, len(registry.items)))
                probes.extend((operator.itemgetter(k), registry.value, hook) for k, hook in registry.items)
        self._getters = tuple(p[0] for p in probes)
        self._objects = tuple(p[1] for p in probes)
        self._expected = tuple(p[2] for p in probes)
        self._sized = tuple(s[0] for s in sized)
        self._sizes = [s[1] for s in sized]

    def unchanged(self) -> bool:
        if not self.usable:
            return False
        try:
            return (
                all(map(operator.is_, map(_call, self._resolvers), self._values))
                and all(map(operator.is_, map(_call, self._getters, self._objects), self._expected))
                and list(map(len, self._sized)) == self._sizes  # type: ignore[arg-type]
            )
        except Exception:  # an attribute gone, a cell emptied: the full comparison says what changed
            return False

    def _layer_probes(
        self,
        layer: tuple[object, ...],
        after: object,
        empty_cell: object,
        is_wrapped_hook: Callable[[object], bool],
        sized: list[tuple[object, int]],
    ) -> list[_Probe] | None:
        """What `_layers` read from this layer's object, and the next layer it went on to."""
        current = layer[0]
        if isinstance(current, types.FunctionType):
            # (function, code, defaults, kwdefaults, *kwdefaults' items, *closure contents)
            cells = current.__closure__ or ()  # read-only: the cells are the recorded ones
            kwdefaults = layer[3]
            items = layer[4 : len(layer) - len(cells)]
            contents = layer[len(layer) - len(cells) :]
            if any(value is empty_cell for value in contents):
                return None
            probes: list[_Probe] = [
                (_CODE, current, layer[1]),
                (_DEFAULTS, current, layer[2]),
                (_KWDEFAULTS, current, kwdefaults),
                (functools.partial(_wrapped, missing=self._missing), current, after),
            ]
            if isinstance(kwdefaults, dict):
                sized.append((kwdefaults, len(items)))
                probes.extend(_item_probes(kwdefaults, items))
            probes.extend((_CONTENTS, cell, value) for cell, value in zip(cells, contents, strict=True))
            return probes
        if isinstance(current, (staticmethod, classmethod, types.MethodType)):
            return [(_FUNC, current, after)]
        if isinstance(current, functools.partial):
            # (partial, args, keywords, *keywords' items)
            keywords = layer[2]
            items = layer[3:]
            probes = [
                (_PARTIAL_FUNC, current, after),
                (_ARGS, current, layer[1]),
                (_KEYWORDS, current, keywords),
            ]
            if isinstance(keywords, dict):
                sized.append((keywords, len(items)))
                probes.extend(_item_probes(keywords, items))
            return probes
        if is_wrapped_hook(current):
            return [(functools.partial(_hook, missing=self._missing), current, after)]
        return []


def _item_probes(mapping: dict[Any, Any], items: tuple[object, ...]) -> list[_Probe]:
    """Each recorded (key, value) pair of a dict must still be there."""
    pairs: list[tuple[Any, Any]] = [item for item in items if isinstance(item, tuple)]
    return [(operator.itemgetter(key), mapping, value) for key, value in pairs]


def _wrapped(function: types.FunctionType, *, missing: object) -> object:
    return function.__dict__.get("__wrapped__", missing)


def _hook(wrapper: object, *, missing: object) -> object:
    return vars(wrapper).get("hook", missing)
