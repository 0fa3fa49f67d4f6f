"""Symbolic values on the machine's stack: what an unpickler would have built, without building it."""

from __future__ import annotations

from typing import Union

from trainguard._pickle.reader import Blob

# Containers keep this many items; the rest is counted, since no opcode can read an item back.
CONTAINER_CAP = 256


class Global:
    """An object fetched by GLOBAL, STACK_GLOBAL, INST or an extension code."""

    __slots__ = ("module", "name", "pos")

    def __init__(self, module: str, name: str, pos: int) -> None:
        self.module = module
        self.name = name
        self.pos = pos

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"Global({self.qualname})"


class Call:
    """The result of calling `func` (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ)."""

    __slots__ = ("args", "func", "kwargs", "op", "pos", "states")

    def __init__(self, func: Value, args: Value, pos: int, op: str, kwargs: Value = None) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.pos = pos
        self.op = op
        self.states: list[Value] = []

    def __repr__(self) -> str:
        return f"Call({self.func!r}, {self.args!r})"


class PersRef:
    """The result of a persistent-id lookup (the loader's persistent_load)."""

    __slots__ = ("pid", "pos")

    def __init__(self, pid: Value, pos: int) -> None:
        self.pid = pid
        self.pos = pos


class Opaque:
    """A value we do not model (an out-of-band buffer, a bytearray)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


class Seq:
    """A tuple, list, set or frozenset; mutable kinds can grow through APPEND(S)/ADDITEMS."""

    __slots__ = ("dropped", "items", "kind")

    def __init__(self, kind: str, items: list[Value]) -> None:
        # Callers hand over a list they no longer use; it is kept as is unless over the cap.
        self.kind = kind
        if len(items) <= CONTAINER_CAP:
            self.items, self.dropped = items, 0
        else:
            self.items, self.dropped = items[:CONTAINER_CAP], len(items) - CONTAINER_CAP

    def extend(self, items: list[Value]) -> None:
        room = CONTAINER_CAP - len(self.items)
        self.items.extend(items[:room])
        self.dropped += max(0, len(items) - room)

    @property
    def complete(self) -> bool:
        return self.dropped == 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.items!r}"


class Dct:
    """A dict; keys and values stay symbolic, so it is a list of pairs."""

    __slots__ = ("dropped", "pairs")

    def __init__(self, pairs: list[tuple[Value, Value]]) -> None:
        if len(pairs) <= CONTAINER_CAP:
            self.pairs, self.dropped = pairs, 0
        else:
            self.pairs, self.dropped = pairs[:CONTAINER_CAP], len(pairs) - CONTAINER_CAP

    def extend(self, pairs: list[tuple[Value, Value]]) -> None:
        room = CONTAINER_CAP - len(self.pairs)
        self.pairs.extend(pairs[:room])
        self.dropped += max(0, len(pairs) - room)

    def get(self, key: str) -> Value:
        """The last value stored under a constant string key, as a real dict would keep it."""
        found: Value = None
        for k, v in self.pairs:
            if k == key:
                found = v
        return found

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.pairs)

    def __repr__(self) -> str:
        return f"Dct({self.pairs!r})"


Value = Union[None, bool, int, float, str, bytes, Blob, Global, Call, PersRef, Opaque, Seq, Dct]  # noqa: UP007


def const_tuple(value: Value) -> tuple[Value, ...] | None:
    """The items of a complete tuple, or None."""
    if isinstance(value, Seq) and value.kind == "tuple" and value.complete:
        return tuple(value.items)
    return None


def describe(value: Value) -> str:
    """A short human description of a value, for finding messages."""
    if isinstance(value, Global):
        return value.qualname
    if isinstance(value, Call):
        return f"the result of calling {describe(value.func)}"
    if isinstance(value, PersRef):
        return "a persistent-id object"
    if isinstance(value, Opaque):
        return value.what
    if isinstance(value, Seq):
        return f"a {value.kind}"
    if isinstance(value, Dct):
        return "a dict"
    if isinstance(value, Blob):
        return f"{value.length} bytes"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
