"""A bounded, pure-Python reader for the marshal format, for `.pyc` bodies we do not trust.

`marshal.loads` is documented as unsafe on hostile data, and a cached `.pyc` is exactly the file a
saboteur replaces. This reader never builds a code object and never runs anything: it walks the stream
with an explicit stack (no recursion), checks every length against the bytes that are really there
before using it (a length field of 2**31 allocates nothing), and counts objects and depth, so hostile
bytes end in `MarshalError` or `LimitExceeded`, never in another exception, a hang or a memory blow-up.

Two things can be built from a stream:

- `canonical_digest`: a Merkle digest of the stream's meaning. `marshal.dumps` is not deterministic
  across processes (FLAG_REF depends on reference counts, set order on the string hash seed), so two
  equal code objects can have different bytes. The digest resolves refs, ignores FLAG_REF, treats every
  string form (interned or not, ascii/short ascii/utf-8) alike, encodes ints by value, sorts set
  elements, and keeps everything else exactly (floats by their bits, every code object field). A ref
  reuses the digest already computed, so a stream of refs to refs costs what it weighs, not what it
  expands to.
- `decode`: plain Python values (code objects as `MarshalCode`), for tests and for reading a field.

Streams CPython would read as self-referencing containers (a ref to a tuple or list still being read)
are rejected: compiled code never contains cycles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import sys
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

from trainguard.errors import LimitExceeded, MalformedArtifact

__all__ = [
    "MarshalCode",
    "MarshalError",
    "MarshalLimits",
    "canonical_digest",
    "decode",
]

_T = TypeVar("_T")

FLAG_REF = 0x80
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_U16 = struct.Struct("<H")
_F64 = struct.Struct("<d")
_MAX_REFS = 0x7FFFFFFE  # CPython's "index list too large"


class MarshalError(MalformedArtifact):
    """The stream is truncated or structurally invalid (or uses a form this reader rejects on purpose)."""


@dataclasses.dataclass(frozen=True)
class MarshalLimits:
    """Bounds that keep a hostile stream from exhausting time or memory."""

    max_bytes: int = 64 << 20
    # CPython's own MAX_MARSHAL_STACK_DEPTH; the source parser stops real code far below it.
    max_depth: int = 2000
    # Each object costs ~100 bytes while it is referenced: this keeps the worst case near 400 MiB.
    max_objects: int = 4_000_000

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive")


class _CodeLayout(NamedTuple):
    lead_ints: int  # raw int32 fields before the first object field
    before_lineno: int  # object fields before firstlineno
    after_lineno: int  # object fields after it
    filename_index: int  # which object field is co_filename


# 3.8-3.10: argcount posonly kwonly nlocals stacksize flags | code consts names varnames freevars cellvars
# filename name | firstlineno | linetable. 3.11-3.14: argcount posonly kwonly stacksize flags | code consts
# names localsplusnames localspluskinds filename name qualname | firstlineno | linetable exceptiontable.
_LAYOUT_310 = _CodeLayout(6, 8, 1, 6)
_LAYOUT_311 = _CodeLayout(5, 8, 2, 5)


def _layout(version: tuple[int, int] | None) -> _CodeLayout:
    version = version or (sys.version_info[0], sys.version_info[1])
    if version < (3, 8):
        raise ValueError(f"marshal code objects of Python {version[0]}.{version[1]} are not supported")
    return _LAYOUT_311 if version >= (3, 11) else _LAYOUT_310


@dataclasses.dataclass(frozen=True)
class MarshalCode:
    """A code object as marshal stores it: the raw int fields in stream order (firstlineno last) and
    the object fields in stream order."""

    ints: tuple[int, ...]
    objects: tuple[object, ...]
    filename_index: int

    @property
    def filename(self) -> object:
        return self.objects[self.filename_index]


class _Builder(Generic[_T]):
    """What the reader makes of each object; leaves arrive with their Python value."""

    def leaf(self, kind: str, value: object) -> _T:
        raise NotImplementedError

    def container(self, kind: str, items: list[_T], ints: list[int]) -> _T:
        raise NotImplementedError


_SINGLETONS: dict[int, tuple[str, object]] = {
    ord("N"): ("none", None),
    ord("T"): ("true", True),
    ord("F"): ("false", False),
    ord("S"): ("stopiter", StopIteration),
    ord("."): ("ellipsis", Ellipsis),
}
_SINGLETON_TAGS = {"none": b"N", "true": b"T", "false": b"F", "stopiter": b"S", "ellipsis": b"."}
_CONTAINERS = {
    ord("("): "tuple",
    ord(")"): "tuple",
    ord("["): "list",
    ord("{"): "dict",
    ord("<"): "set",
    ord(">"): "frozenset",
    ord("c"): "code",
    ord(":"): "slice",  # 3.14
}
_CONTAINER_TAGS = {
    "tuple": b"(",
    "list": b"[",
    "dict": b"{",
    "set": b"<",
    "frozenset": b">",
    "code": b"c",
    "slice": b":",
}


class _Frame:
    __slots__ = ("count", "idx", "ints", "items", "kind")

    def __init__(self, kind: str, count: int, idx: int, ints: list[int]) -> None:
        self.kind = kind
        self.count = count  # -1 for a dict: it ends at a NULL
        self.idx = idx  # its slot in the ref table, or -1
        self.ints = ints
        self.items: list[object] = []


_NULL = object()


def _read(data: bytes, builder: _Builder[_T], limits: MarshalLimits, layout: _CodeLayout) -> tuple[_T, int]:
    end = len(data)
    if end > limits.max_bytes:
        raise LimitExceeded(f"marshal data of {end} bytes exceeds the limit of {limits.max_bytes}")
    pos = 0
    refs: list[object] = []  # a slot is _NULL while its container is still being read
    stack: list[_Frame] = []
    objects = 0

    def need(n: int, at: int) -> None:
        if n < 0:
            raise MarshalError("bad marshal data (negative size)", offset=at)
        if n > end - at:
            raise MarshalError("marshal data too short", offset=at)

    def i32(at: int) -> int:
        need(4, at)
        return int(_I32.unpack_from(data, at)[0])

    while True:
        if pos >= end:
            raise MarshalError("EOF read where object expected", offset=pos)
        start = pos
        code = data[pos]
        pos += 1
        flag = code & FLAG_REF
        t = code & ~FLAG_REF
        objects += 1
        if objects > limits.max_objects:
            raise LimitExceeded(f"more than {limits.max_objects} objects in marshal data", offset=start)
        node: object
        kind = _CONTAINERS.get(t)
        if kind is not None:
            if len(stack) >= limits.max_depth:
                raise LimitExceeded(f"marshal data nested deeper than {limits.max_depth}", offset=start)
            ints: list[int] = []
            if t == ord(")"):
                need(1, pos)
                count = data[pos]
                pos += 1
            elif kind == "dict":
                count = -1
            elif kind == "code":
                for _ in range(layout.lead_ints):
                    ints.append(i32(pos))
                    pos += 4
                count = layout.before_lineno + layout.after_lineno
            elif kind == "slice":
                count = 3
            else:
                count = i32(pos)
                pos += 4
                if count < 0:
                    raise MarshalError(f"bad marshal data ({kind} size out of range)", offset=start)
                # Every element takes at least one byte: no bigger count can be genuine.
                if count > end - pos:
                    raise MarshalError(f"{kind} of {count} items in {end - pos} bytes", offset=start)
            idx = -1
            if flag:
                if len(refs) >= _MAX_REFS:
                    raise MarshalError("bad marshal data (index list too large)", offset=start)
                idx = len(refs)
                refs.append(_NULL)
            if count != 0:
                stack.append(_Frame(kind, count, idx, ints))
                continue
            node = builder.container(kind, [], ints)
            if idx >= 0:
                refs[idx] = node
        elif t in _SINGLETONS:
            name, value = _SINGLETONS[t]
            node = builder.leaf(name, value)
        elif t == ord("0"):
            node = _NULL
        elif t == ord("r"):
            n = i32(pos)
            pos += 4
            if not 0 <= n < len(refs) or refs[n] is _NULL:
                raise MarshalError("bad marshal data (invalid reference)", offset=start)
            node = refs[n]
        else:
            kind, value, pos = _leaf(data, t, pos, start, need, i32)
            node = builder.leaf(kind, value)
            if flag:
                if len(refs) >= _MAX_REFS:
                    raise MarshalError("bad marshal data (index list too large)", offset=start)
                refs.append(node)
        # Hand the finished object up, closing every container it completes.
        while True:
            if not stack:
                if node is _NULL:
                    raise MarshalError("NULL object in marshal data for object", offset=start)
                return node, pos  # type: ignore[return-value]  # _NULL excluded above
            frame = stack[-1]
            if node is _NULL:
                if frame.kind != "dict":
                    raise MarshalError(f"NULL object in marshal data for {frame.kind}", offset=start)
                if len(frame.items) % 2:
                    frame.items.pop()  # CPython drops a key whose value is NULL
                frame.count = len(frame.items)
            else:
                frame.items.append(node)
                if frame.kind == "code" and len(frame.items) == layout.before_lineno:
                    frame.ints.append(i32(pos))
                    pos += 4
            if len(frame.items) != frame.count:
                break
            stack.pop()
            node = builder.container(frame.kind, frame.items, frame.ints)  # type: ignore[arg-type]
            if frame.idx >= 0:
                refs[frame.idx] = node


def _leaf(
    data: bytes,
    t: int,
    pos: int,
    start: int,
    need: Callable[[int, int], None],
    i32: Callable[[int], int],
) -> tuple[str, object, int]:
    """One scalar object after its type byte: (kind, value, position after it)."""
    c = chr(t)
    if c == "i":
        return "int", i32(pos), pos + 4
    if c == "I":
        need(8, pos)
        return "int", int(_I64.unpack_from(data, pos)[0]), pos + 8
    if c == "l":
        n = i32(pos)
        pos += 4
        size = abs(n)
        need(2 * size, pos)
        value = _long(data, pos, size, start)
        return "int", -value if n < 0 else value, pos + 2 * size
    if c == "g":
        need(8, pos)
        return "float", data[pos : pos + 8], pos + 8
    if c == "y":
        need(16, pos)
        return "complex", data[pos : pos + 16], pos + 16
    if c == "f":
        bits, pos = _float_str(data, pos, start, need)
        return "float", bits, pos
    if c == "x":
        real, pos = _float_str(data, pos, start, need)
        imag, pos = _float_str(data, pos, start, need)
        return "complex", real + imag, pos
    if c in "sautAzZ":
        if c in "zZ":
            need(1, pos)
            n = data[pos]
            pos += 1
        else:
            n = i32(pos)
            pos += 4
            if n < 0:
                raise MarshalError("bad marshal data (string size out of range)", offset=start)
        need(n, pos)
        raw = data[pos : pos + n]
        pos += n
        if c == "s":
            return "bytes", raw, pos
        if c in "ut":
            try:
                return "str", raw.decode("utf-8", "surrogatepass"), pos
            except UnicodeDecodeError as exc:
                raise MarshalError(f"bad marshal data (invalid utf-8: {exc.reason})", offset=start) from None
        return "str", raw.decode("latin-1"), pos  # CPython reads the ascii forms as latin-1
    raise MarshalError(f"bad marshal data (unknown type code {t:#04x})", offset=start)


def _long(data: bytes, pos: int, size: int, start: int) -> int:
    """A TYPE_LONG magnitude: `size` 15-bit digits, least significant first, top digit nonzero."""
    if size == 0:
        return 0
    digits = struct.unpack_from(f"<{size}H", data, pos)
    if max(digits) > 0x7FFF:
        raise MarshalError("bad marshal data (digit out of range in long)", offset=start)
    if digits[-1] == 0:
        raise MarshalError("bad marshal data (unnormalized long data)", offset=start)
    # Eight digits make 120 bits = 15 bytes: join chunks as bytes so that big ints cost linear time.
    chunks = []
    for i in range(0, size, 8):
        chunk = 0
        for j, d in enumerate(digits[i : i + 8]):
            chunk |= d << (15 * j)
        chunks.append(chunk.to_bytes(15, "little"))
    return int.from_bytes(b"".join(chunks), "little")


def _float_str(data: bytes, pos: int, start: int, need: Callable[[int, int], None]) -> tuple[bytes, int]:
    """A float written as text (marshal versions 0 and 1): its IEEE bits."""
    need(1, pos)
    n = data[pos]
    pos += 1
    need(n, pos)
    raw = data[pos : pos + n]
    # PyOS_string_to_double takes no whitespace or underscores, which float() would accept.
    text = raw.split(b"\0", 1)[0]
    if not text or any(ch in b" \t\n\r\f\v_" for ch in text):
        raise MarshalError("bad marshal data (invalid float text)", offset=start)
    try:
        value = float(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise MarshalError("bad marshal data (invalid float text)", offset=start) from None
    return _F64.pack(value), pos + n


class _DigestBuilder(_Builder[bytes]):
    """SHA-256 Merkle digests of canonical encodings (tag, then the value or the children's digests)."""

    def leaf(self, kind: str, value: object) -> bytes:
        if kind == "int":
            assert isinstance(value, int)
            body = b"i" + value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        elif kind == "str":
            assert isinstance(value, str)
            body = b"u" + value.encode("utf-8", "surrogatepass")
        elif kind in ("float", "complex", "bytes"):
            assert isinstance(value, bytes)
            body = {"float": b"g", "complex": b"y", "bytes": b"s"}[kind] + value
        else:
            body = _SINGLETON_TAGS[kind]
        return hashlib.sha256(body).digest()

    def container(self, kind: str, items: list[bytes], ints: list[int]) -> bytes:
        if kind in ("set", "frozenset"):
            items = sorted(items)  # set order follows the hash seed, not the meaning
        head = _CONTAINER_TAGS[kind] + len(items).to_bytes(8, "big") + len(ints).to_bytes(1, "big")
        head += b"".join(i.to_bytes(8, "big", signed=True) for i in ints)
        return hashlib.sha256(head + b"".join(items)).digest()


class _ValueBuilder(_Builder[object]):
    def __init__(self, layout: _CodeLayout) -> None:
        self.layout = layout

    def leaf(self, kind: str, value: object) -> object:
        if kind == "float":
            assert isinstance(value, bytes)
            return _F64.unpack(value)[0]
        if kind == "complex":
            assert isinstance(value, bytes)
            return complex(_F64.unpack(value[:8])[0], _F64.unpack(value[8:])[0])
        return value

    def container(self, kind: str, items: list[object], ints: list[int]) -> object:
        try:
            if kind == "tuple":
                return tuple(items)
            if kind == "list":
                return list(items)
            if kind == "dict":
                return dict(zip(items[::2], items[1::2], strict=True))
            if kind == "set":
                return set(items)
            if kind == "frozenset":
                return frozenset(items)
            if kind == "slice":
                return slice(*items)
        except TypeError as exc:  # an unhashable set element or dict key
            raise MarshalError(f"bad marshal data ({exc})") from None
        return MarshalCode(tuple(ints), tuple(items), self.layout.filename_index)


def canonical_digest(
    data: bytes, *, limits: MarshalLimits | None = None, version: tuple[int, int] | None = None
) -> tuple[bytes, int]:
    """The canonical digest of the first object in `data` and the offset where it ends (marshal
    ignores what follows). `version` picks the code object layout (default: the running Python's).
    Raises MarshalError or LimitExceeded."""
    return _read(bytes(data), _DigestBuilder(), limits or MarshalLimits(), _layout(version))


def decode(
    data: bytes, *, limits: MarshalLimits | None = None, version: tuple[int, int] | None = None
) -> tuple[object, int]:
    """The first object in `data` as plain values (code objects as `MarshalCode`) and where it ends.
    Raises MarshalError or LimitExceeded."""
    layout = _layout(version)
    return _read(bytes(data), _ValueBuilder(layout), limits or MarshalLimits(), layout)
