"""Byte-level builders for hostile pickles and containers.

Nothing here ever unpickles anything: samples are assembled opcode by opcode and checked
only with ``pickletools.genops``, which parses without executing. Every payload is
harmless: it would only print or echo ``TRAINGUARD-MARKER``.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

MARKER = "TRAINGUARD-MARKER"
CMD = f"echo {MARKER}"
PY_PAYLOAD = f"print('{MARKER}')"

# --- single opcodes ----------------------------------------------------------------------

MARK = b"("
STOP = b"."
POP = b"0"
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
TUPLE3 = b"\x87"
EMPTY_TUPLE = b")"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
REDUCE = b"R"
BUILD = b"b"
SETITEM = b"s"
SETITEMS = b"u"
APPEND = b"a"
APPENDS = b"e"
DICT = b"d"
LIST = b"l"
NONE = b"N"
NEWTRUE = b"\x88"
NEWFALSE = b"\x89"
MEMOIZE = b"\x94"
STACK_GLOBAL = b"\x93"
NEWOBJ = b"\x81"
NEWOBJ_EX = b"\x92"


def proto(n: int) -> bytes:
    """PROTO opcode."""
    return b"\x80" + bytes([n])


def u(s: str) -> bytes:
    """A str pushed with SHORT_BINUNICODE / BINUNICODE (protocol 1+ binary unicode)."""
    raw = s.encode("utf-8")
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"X" + struct.pack("<I", len(raw)) + raw


def binunicode(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def binunicode8(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"\x8d" + struct.pack("<Q", len(raw)) + raw


def unicode0(s: str) -> bytes:
    """Protocol 0 UNICODE ('V', raw-unicode-escape, newline terminated)."""
    assert "\n" not in s and "\\" not in s
    return b"V" + s.encode("raw-unicode-escape") + b"\n"


def string0(s: str) -> bytes:
    """Protocol 0 STRING ('S', quoted repr)."""
    assert "'" not in s and "\\" not in s and "\n" not in s
    return b"S'" + s.encode("ascii") + b"'\n"


def binstring(s: str) -> bytes:
    raw = s.encode("ascii")
    return b"T" + struct.pack("<i", len(raw)) + raw


def short_binstring(s: str) -> bytes:
    raw = s.encode("ascii")
    return b"U" + bytes([len(raw)]) + raw


def binbytes(b: bytes) -> bytes:
    if len(b) < 256:
        return b"C" + bytes([len(b)]) + b
    return b"B" + struct.pack("<I", len(b)) + b


def binint(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    return b"J" + struct.pack("<i", n)


def glob(module: str, name: str) -> bytes:
    """GLOBAL opcode (protocol 0-3 style, also valid under PROTO 4/5)."""
    return b"c" + module.encode("utf-8") + b"\n" + name.encode("utf-8") + b"\n"


def sglob(module: str, name: str) -> bytes:
    """STACK_GLOBAL with constant SHORT_BINUNICODE operands (protocol 4 style)."""
    return u(module) + u(name) + STACK_GLOBAL


def put0(i: int) -> bytes:
    return b"p" + str(i).encode() + b"\n"


def get0(i: int) -> bytes:
    return b"g" + str(i).encode() + b"\n"


def binput(i: int) -> bytes:
    return b"q" + bytes([i])


def binget(i: int) -> bytes:
    return b"h" + bytes([i])


def long_binput(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def long_binget(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def ext1(code: int) -> bytes:
    return b"\x82" + bytes([code])


def ext2(code: int) -> bytes:
    return b"\x83" + struct.pack("<H", code)


def ext4(code: int) -> bytes:
    return b"\x84" + struct.pack("<i", code)


def frame(body: bytes) -> bytes:
    """FRAME opcode with an honest length, followed by the framed bytes."""
    return b"\x95" + struct.pack("<Q", len(body)) + body


def frame_header(declared: int) -> bytes:
    """A FRAME opcode that declares ``declared`` bytes, whatever follows."""
    return b"\x95" + struct.pack("<Q", declared)


# --- values ------------------------------------------------------------------------------


def value(v: Any, protocol: int = 4) -> bytes:
    """Encode a small constant: str, bytes, int, bool, None, list/tuple of those, dict str->those."""
    if v is None:
        return NONE
    if isinstance(v, bool):
        if protocol >= 2:
            return NEWTRUE if v else NEWFALSE
        return b"I01\n" if v else b"I00\n"
    if isinstance(v, int):
        return binint(v) if protocol >= 1 else b"I" + str(v).encode() + b"\n"
    if isinstance(v, str):
        if protocol >= 4:
            return u(v)
        return binunicode(v) if protocol >= 1 else unicode0(v)
    if isinstance(v, bytes):
        assert protocol >= 3, "bytes need protocol 3+"
        return binbytes(v)
    if isinstance(v, tuple):
        return MARK + b"".join(value(x, protocol) for x in v) + TUPLE
    if isinstance(v, list):
        if protocol >= 1:
            return EMPTY_LIST + MARK + b"".join(value(x, protocol) for x in v) + APPENDS
        return MARK + b"".join(value(x, protocol) for x in v) + LIST
    if isinstance(v, dict):
        inner = b"".join(value(k, protocol) + value(x, protocol) for k, x in v.items())
        if protocol >= 1:
            return EMPTY_DICT + MARK + inner + SETITEMS
        return MARK + inner + DICT
    raise TypeError(f"cannot encode {type(v).__name__}")


def call(fn: bytes, *args: Any, protocol: int = 4) -> bytes:
    """``fn`` (already-encoded callable) applied with REDUCE to constant args."""
    return fn + MARK + b"".join(value(a, protocol) for a in args) + TUPLE + REDUCE


def ref(module: str, name: str, protocol: int) -> bytes:
    """How a real pickler would reference ``module.name`` at this protocol."""
    return sglob(module, name) if protocol >= 4 else glob(module, name)


def wrap(body: bytes, protocol: int) -> bytes:
    """Header (PROTO, FRAME) and STOP around an opcode body, as ``pickle.dumps`` lays it out."""
    if protocol >= 4:
        return proto(protocol) + frame(body + STOP)
    if protocol >= 2:
        return proto(protocol) + body + STOP
    return body + STOP


def reduce_pickle(module: str, name: str, *args: Any, protocol: int = 4) -> bytes:
    """A complete pickle that calls ``module.name(*args)`` on load."""
    return wrap(call(ref(module, name, protocol), *args, protocol=protocol), protocol)


def os_system_pickle(protocol: int = 4, module: str = "os") -> bytes:
    return reduce_pickle(module, "system", CMD, protocol=protocol)


def benign_pickle(protocol: int = 4) -> bytes:
    """A plain data pickle (dict of lists), no globals at all."""
    body = value({"weights": [1, 2, 3], "name": "benign"}, protocol)
    return wrap(body, protocol)


# --- checks ------------------------------------------------------------------------------


def pickle_ops(data: bytes) -> list[str]:
    """Opcode names of every pickle in ``data`` (concatenated streams allowed); parse only."""
    names: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        for op, _arg, _pos in pickletools.genops(stream):
            names.append(op.name)
    return names


def assert_wellformed(data: bytes) -> None:
    """Every stream in ``data`` parses (without executing) and ends with STOP."""
    ops = pickle_ops(data)
    assert ops, "empty pickle"
    assert ops[-1] == "STOP", ops


# --- containers --------------------------------------------------------------------------


def zip_bytes(members: Iterable[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def torch_zip_members(data_pkl: bytes, root: str = "archive") -> list[tuple[str, bytes]]:
    """The member layout ``torch.save`` writes (new zipfile serialization)."""
    return [
        (f"{root}/data.pkl", data_pkl),
        (f"{root}/byteorder", b"little"),
        (f"{root}/.data/version", b"3\n"),
        (f"{root}/version", b"3\n"),
    ]


def npy_object_header(shape: Sequence[int] = (1,), descr: str = "'|O'", version: int = 1) -> bytes:
    """A ``.npy`` header whose dtype holds Python objects (so the body that follows is a pickle)."""
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    len_size = 2 if version == 1 else 4
    # magic(6) + version(2) + length field + header + padding + newline: a multiple of 64
    base = 8 + len_size + len(header) + 1
    pad = (64 - base % 64) % 64
    text = (header + " " * pad + "\n").encode("utf-8" if version == 3 else "latin1")
    length = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + length + text


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
