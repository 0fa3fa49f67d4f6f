"""A bounded reader of pickle opcodes.

It decodes one opcode and its argument at a time from a byte buffer (bytes, bytearray or
mmap), checking every declared length against the bytes that remain before touching them,
so a 70 GB length in a 1 KB file is an error, not an allocation. Large byte arguments come
back as a `Blob` (offset and length) instead of a copy.
"""

from __future__ import annotations

import codecs
import dataclasses
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from typing import Union

from trainguard._pickle.opcodes import HIGHEST_PROTOCOL, OPCODES, Arg

# Byte arguments longer than this are not copied out of the buffer.
INLINE_BYTES = 4096
# A text line (GLOBAL names, INT digits...) longer than this is refused.
MAX_LINE = 1 << 20

_UNPACK_U4 = struct.Struct("<I").unpack_from
_UNPACK_I4 = struct.Struct("<i").unpack_from
_UNPACK_U8 = struct.Struct("<Q").unpack_from
# Fixed-width arguments: byte count and decoder.
_FIXED = {
    Arg.UINT2: (2, struct.Struct("<H").unpack_from),
    Arg.UINT4: (4, _UNPACK_U4),
    Arg.INT4: (4, _UNPACK_I4),
    Arg.UINT8: (8, _UNPACK_U8),
    Arg.FLOAT8: (8, struct.Struct(">d").unpack_from),
}


# What the reader reads: a whole file mapped into memory, or bytes already in memory.
Buffer = Union[bytes, mmap.mmap]  # noqa: UP007


class PickleSyntaxError(Exception):
    """The stream is not a valid pickle at `offset`; a real unpickler stops there too."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at offset {offset}")
        self.reason = message
        self.offset = offset


class LimitError(PickleSyntaxError):
    """A resource limit of this reader stopped it: a real unpickler has no such limit and reads on, so
    what lies beyond was not checked (never "not a pickle", never clean)."""


class LengthError(PickleSyntaxError):
    """A declared length runs past the end of the data (truncation or a hostile length)."""


@dataclasses.dataclass(frozen=True)
class Blob:
    """A byte argument too large to copy: where it lies in the buffer."""

    offset: int
    length: int


ArgValue = int | float | str | bytes | bool | Blob | tuple[str, str] | None


@dataclasses.dataclass(frozen=True)
class Op:
    """One decoded opcode."""

    pos: int
    code: int
    arg: ArgValue

    @property
    def name(self) -> str:
        return OPCODES[self.code][0]


def _line(data: Buffer, pos: int, end: int) -> tuple[bytes, int]:
    limit = min(end, pos + MAX_LINE)
    nl = data.find(b"\n", pos, limit)
    if nl < 0:
        if limit < end:
            raise LimitError(f"line longer than {MAX_LINE} bytes", pos)
        raise LengthError("unterminated line", pos)
    return data[pos:nl], nl + 1


def _need(pos: int, n: int, end: int, what: str) -> None:
    if n < 0:
        raise PickleSyntaxError(f"negative length for {what}", pos)
    if n > end - pos:
        raise LengthError(f"{what} declares {n} bytes but only {end - pos} remain", pos)


def _decode_long(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def _parse_int(text: bytes, pos: int, base: int) -> int:
    """Python's int(): surrounding whitespace, a sign and underscores between digits are accepted."""
    try:
        return int(text, base)
    except ValueError:
        raise PickleSyntaxError(f"invalid integer literal {text[:40]!r}", pos) from None


_STRTOL = re.compile(rb"^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _c_string(text: bytes) -> bytes:
    """What C's string functions see of a line: the bytes before its first NUL.

    The C unpickler parses INT, LONG, FLOAT, GET and PUT lines with strtol, PyLong_FromString and
    PyOS_string_to_double, which all stop at a NUL and accept it as the end of the number.
    """
    nul = text.find(b"\0")
    return text if nul < 0 else text[:nul]


def _parse_int_opcode(text: bytes, pos: int) -> int | bool:
    """INT as CPython's C unpickler reads it: strtol(s, 0) (so "010" is 8), else PyLong_FromString(s, 0)."""
    c = _c_string(text)
    match = _STRTOL.match(c)
    # strtol's end pointer: after the digits, or the start when it converted nothing. The C unpickler
    # takes its value only when the line ends (newline or NUL) right there.
    if (match.end() if match is not None else 0) == len(c):
        value = 0
        if match is not None:
            digits = match.group(2)
            if digits[:2] in (b"0x", b"0X"):
                value = int(digits[2:], 16)
            elif digits.startswith(b"0") and len(digits) > 1:
                value = int(digits[1:], 8)
            else:
                value = int(digits, 10)
            value = -value if match.group(1) == b"-" else value
        if -(1 << 63) <= value < (1 << 63):
            if len(text) == 2 and value in (0, 1):
                return value == 1  # "00" and "01" (newline included, three bytes) are False and True
            return value
    return _parse_int(c, pos, 0)


def _bytes_arg(data: Buffer, pos: int, n: int, end: int, what: str) -> tuple[bytes | Blob, int]:
    _need(pos, n, end, what)
    if n > INLINE_BYTES:
        return Blob(pos, n), pos + n
    return data[pos : pos + n], pos + n


def _text_arg(data: Buffer, pos: int, n: int, end: int, what: str, encoding: str) -> tuple[str, int]:
    _need(pos, n, end, what)
    raw = data[pos : pos + n]
    try:
        return raw.decode(encoding, "surrogatepass"), pos + n
    except UnicodeDecodeError:
        raise PickleSyntaxError(f"{what} is not valid {encoding}", pos) from None


def read_op(data: Buffer, pos: int, end: int) -> tuple[int, ArgValue, int]:
    """Decode the opcode at `pos`; return (code, argument, position after it)."""
    if pos >= end:
        raise LengthError("pickle ends without STOP", pos)
    code = data[pos]
    kind = ARG_KIND[code]
    if kind is None:
        raise PickleSyntaxError(f"invalid opcode 0x{code:02x}", pos)
    p = pos + 1
    if kind is Arg.NONE:
        return code, None, p
    if code == 0x58 and p + 4 <= end:  # BINUNICODE, the commonest string form
        n = _UNPACK_U4(data[p : p + 4])[0]
        if n <= end - p - 4:
            try:
                return code, data[p + 4 : p + 4 + n].decode("utf-8", "surrogatepass"), p + 4 + n
            except UnicodeDecodeError:
                pass  # the general path below reports it
    if code == 0x8C and p < end:  # SHORT_BINUNICODE, protocol 4's string form
        n = data[p]
        if n <= end - p - 1:
            try:
                return code, data[p + 1 : p + 1 + n].decode("utf-8", "surrogatepass"), p + 1 + n
            except UnicodeDecodeError:
                pass
    if kind is Arg.UINT1:
        if p >= end:
            raise LengthError(f"{OPCODES[code][0]} declares 1 bytes but only 0 remain", p)
        value = data[p]
        if code == 0x80 and value > HIGHEST_PROTOCOL:
            raise PickleSyntaxError(f"unsupported pickle protocol {value}", pos)
        return code, value, p + 1
    fixed = FIXED_BY_CODE[code]
    if fixed is not None:
        width, unpack = fixed
        if width > end - p:
            _need(p, width, end, OPCODES[code][0])
        return code, unpack(data, p)[0], p + width
    return _read_variable(data, code, kind, p, end)


# Per opcode byte: how its argument is encoded (None: not an opcode), and for fixed-width
# arguments the width and decoder. Lists indexed by byte keep the hot path free of hashing.
ARG_KIND: list[Arg | None] = [None] * 256
FIXED_BY_CODE: list[tuple[int, Callable[[Buffer, int], tuple[int | float]]] | None] = [None] * 256
for _code, (_name, _kind) in OPCODES.items():
    ARG_KIND[_code] = _kind
    FIXED_BY_CODE[_code] = _FIXED.get(_kind)


def _read_variable(data: Buffer, code: int, kind: Arg, p: int, end: int) -> tuple[int, ArgValue, int]:
    name = OPCODES[code][0]
    if kind is Arg.DECIMALNL_SHORT:
        text, p2 = _line(data, p, end)
        if code == ord("I"):
            return code, _parse_int_opcode(text, p), p2
        return code, _parse_int(_c_string(text), p, 10), p2
    if kind is Arg.DECIMALNL_LONG:
        text, p2 = _line(data, p, end)
        if text.endswith(b"L"):
            text = text[:-1]
        return code, _parse_int(_c_string(text), p, 0), p2
    if kind is Arg.FLOATNL:
        text, p2 = _line(data, p, end)
        try:
            return code, float(_c_string(text)), p2
        except ValueError:
            raise PickleSyntaxError(f"invalid float literal {text[:40]!r}", p) from None
    if kind is Arg.STRINGNL:
        text, p2 = _line(data, p, end)
        if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b"'", b'"'):
            raise PickleSyntaxError("the STRING opcode argument must be quoted", p)
        try:
            raw = codecs.escape_decode(text[1:-1])[0]
        except ValueError:
            raise PickleSyntaxError("invalid escape in STRING", p) from None
        return code, raw.decode("latin-1"), p2
    if kind is Arg.STRINGNL_NOESCAPE:
        text, p2 = _line(data, p, end)
        return code, text.decode("latin-1"), p2
    if kind is Arg.STRINGNL_NOESCAPE_PAIR:
        module, p2 = _line(data, p, end)
        qualname, p3 = _line(data, p2, end)
        try:
            return code, (module.decode("utf-8"), qualname.decode("utf-8")), p3
        except UnicodeDecodeError:
            raise PickleSyntaxError(f"{name} names are not valid UTF-8", p) from None
    if kind is Arg.UNICODESTRINGNL:
        text, p2 = _line(data, p, end)
        try:
            return code, text.decode("raw-unicode-escape"), p2
        except UnicodeDecodeError:
            raise PickleSyntaxError("invalid UNICODE argument", p) from None
    return _read_counted(data, code, kind, p, end)


def _read_counted(data: Buffer, code: int, kind: Arg, p: int, end: int) -> tuple[int, ArgValue, int]:
    name = OPCODES[code][0]
    if kind in (Arg.LONG1, Arg.STRING1, Arg.BYTES1, Arg.UNICODESTRING1):
        _need(p, 1, end, name)
        n, p = data[p : p + 1][0], p + 1
    elif kind in (Arg.LONG4, Arg.STRING4):
        _need(p, 4, end, name)
        n, p = _UNPACK_I4(data[p : p + 4])[0], p + 4
    elif kind in (Arg.BYTES4, Arg.UNICODESTRING4):
        _need(p, 4, end, name)
        n, p = _UNPACK_U4(data[p : p + 4])[0], p + 4
    else:  # BYTES8, BYTEARRAY8, UNICODESTRING8
        _need(p, 8, end, name)
        n, p = _UNPACK_U8(data[p : p + 8])[0], p + 8
    if kind in (Arg.LONG1, Arg.LONG4):
        _need(p, n, end, name)
        return code, _decode_long(data[p : p + n]), p + n
    if kind in (Arg.STRING1, Arg.STRING4):
        return (code, *_text_arg(data, p, n, end, name, "latin-1"))
    if kind in (Arg.UNICODESTRING1, Arg.UNICODESTRING4, Arg.UNICODESTRING8):
        return (code, *_text_arg(data, p, n, end, name, "utf-8"))
    return (code, *_bytes_arg(data, p, n, end, name))


def iter_ops(data: Buffer, start: int = 0, end: int | None = None) -> Iterator[Op]:
    """Yield the opcodes of one pickle from `start` up to and including its STOP."""
    stop = len(data) if end is None else end
    pos = start
    while True:
        code, arg, nxt = read_op(data, pos, stop)
        yield Op(pos, code, arg)
        if code == 0x2E:  # STOP
            return
        pos = nxt
