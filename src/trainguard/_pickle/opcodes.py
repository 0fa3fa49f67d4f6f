"""The pickle opcode table (protocols 0-5), written out so the reader depends on nothing it parses."""

from __future__ import annotations

import enum


class Arg(enum.Enum):
    """How an opcode's argument is encoded in the stream."""

    NONE = enum.auto()
    UINT1 = enum.auto()
    UINT2 = enum.auto()
    UINT4 = enum.auto()
    UINT8 = enum.auto()
    INT4 = enum.auto()
    DECIMALNL_SHORT = enum.auto()  # INT, GET, PUT: one line of digits
    DECIMALNL_LONG = enum.auto()  # LONG: digits with an optional trailing L
    FLOATNL = enum.auto()
    FLOAT8 = enum.auto()
    STRINGNL = enum.auto()  # STRING: a quoted, escaped line
    STRINGNL_NOESCAPE = enum.auto()  # PERSID: one raw line
    STRINGNL_NOESCAPE_PAIR = enum.auto()  # GLOBAL, INST: module line and name line
    UNICODESTRINGNL = enum.auto()  # UNICODE: raw-unicode-escape line
    LONG1 = enum.auto()
    LONG4 = enum.auto()
    STRING1 = enum.auto()
    STRING4 = enum.auto()
    BYTES1 = enum.auto()
    BYTES4 = enum.auto()
    BYTES8 = enum.auto()
    BYTEARRAY8 = enum.auto()
    UNICODESTRING1 = enum.auto()
    UNICODESTRING4 = enum.auto()
    UNICODESTRING8 = enum.auto()


OPCODES: dict[int, tuple[str, Arg]] = {
    ord("("): ("MARK", Arg.NONE),
    ord("."): ("STOP", Arg.NONE),
    ord("0"): ("POP", Arg.NONE),
    ord("1"): ("POP_MARK", Arg.NONE),
    ord("2"): ("DUP", Arg.NONE),
    ord("F"): ("FLOAT", Arg.FLOATNL),
    ord("I"): ("INT", Arg.DECIMALNL_SHORT),
    ord("J"): ("BININT", Arg.INT4),
    ord("K"): ("BININT1", Arg.UINT1),
    ord("L"): ("LONG", Arg.DECIMALNL_LONG),
    ord("M"): ("BININT2", Arg.UINT2),
    ord("N"): ("NONE", Arg.NONE),
    ord("P"): ("PERSID", Arg.STRINGNL_NOESCAPE),
    ord("Q"): ("BINPERSID", Arg.NONE),
    ord("R"): ("REDUCE", Arg.NONE),
    ord("S"): ("STRING", Arg.STRINGNL),
    ord("T"): ("BINSTRING", Arg.STRING4),
    ord("U"): ("SHORT_BINSTRING", Arg.STRING1),
    ord("V"): ("UNICODE", Arg.UNICODESTRINGNL),
    ord("X"): ("BINUNICODE", Arg.UNICODESTRING4),
    ord("a"): ("APPEND", Arg.NONE),
    ord("b"): ("BUILD", Arg.NONE),
    ord("c"): ("GLOBAL", Arg.STRINGNL_NOESCAPE_PAIR),
    ord("d"): ("DICT", Arg.NONE),
    ord("}"): ("EMPTY_DICT", Arg.NONE),
    ord("e"): ("APPENDS", Arg.NONE),
    ord("g"): ("GET", Arg.DECIMALNL_SHORT),
    ord("h"): ("BINGET", Arg.UINT1),
    ord("i"): ("INST", Arg.STRINGNL_NOESCAPE_PAIR),
    ord("j"): ("LONG_BINGET", Arg.UINT4),
    ord("l"): ("LIST", Arg.NONE),
    ord("]"): ("EMPTY_LIST", Arg.NONE),
    ord("o"): ("OBJ", Arg.NONE),
    ord("p"): ("PUT", Arg.DECIMALNL_SHORT),
    ord("q"): ("BINPUT", Arg.UINT1),
    ord("r"): ("LONG_BINPUT", Arg.UINT4),
    ord("s"): ("SETITEM", Arg.NONE),
    ord("t"): ("TUPLE", Arg.NONE),
    ord(")"): ("EMPTY_TUPLE", Arg.NONE),
    ord("u"): ("SETITEMS", Arg.NONE),
    ord("G"): ("BINFLOAT", Arg.FLOAT8),
    0x80: ("PROTO", Arg.UINT1),
    0x81: ("NEWOBJ", Arg.NONE),
    0x82: ("EXT1", Arg.UINT1),
    0x83: ("EXT2", Arg.UINT2),
    0x84: ("EXT4", Arg.INT4),
    0x85: ("TUPLE1", Arg.NONE),
    0x86: ("TUPLE2", Arg.NONE),
    0x87: ("TUPLE3", Arg.NONE),
    0x88: ("NEWTRUE", Arg.NONE),
    0x89: ("NEWFALSE", Arg.NONE),
    0x8A: ("LONG1", Arg.LONG1),
    0x8B: ("LONG4", Arg.LONG4),
    ord("B"): ("BINBYTES", Arg.BYTES4),
    ord("C"): ("SHORT_BINBYTES", Arg.BYTES1),
    0x8C: ("SHORT_BINUNICODE", Arg.UNICODESTRING1),
    0x8D: ("BINUNICODE8", Arg.UNICODESTRING8),
    0x8E: ("BINBYTES8", Arg.BYTES8),
    0x8F: ("EMPTY_SET", Arg.NONE),
    0x90: ("ADDITEMS", Arg.NONE),
    0x91: ("FROZENSET", Arg.NONE),
    0x92: ("NEWOBJ_EX", Arg.NONE),
    0x93: ("STACK_GLOBAL", Arg.NONE),
    0x94: ("MEMOIZE", Arg.NONE),
    0x95: ("FRAME", Arg.UINT8),
    0x96: ("BYTEARRAY8", Arg.BYTEARRAY8),
    0x97: ("NEXT_BUFFER", Arg.NONE),
    0x98: ("READONLY_BUFFER", Arg.NONE),
}

HIGHEST_PROTOCOL = 5
