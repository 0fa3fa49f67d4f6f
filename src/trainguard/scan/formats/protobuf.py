"""Protobuf wire format, read field by field: enough to walk ONNX and TensorFlow models without their
packages. Nothing is decoded beyond what a caller asks for; lengths are checked against the message."""

from __future__ import annotations

from collections.abc import Iterator


class Malformed(Exception):
    """The bytes are not a well-formed protobuf message."""


def varint(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Malformed("a varint runs past its message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(data: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) for each field in data[start:end]."""
    pos = start
    while pos < end:
        key, pos = varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise Malformed("field number 0")
        if wire == 0:
            value, pos = varint(data, pos, end)
            yield number, wire, value, pos
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise Malformed("a fixed-size field runs past its message")
            yield number, wire, pos, pos + size
            pos += size
        elif wire == 2:
            length, pos = varint(data, pos, end)
            if pos + length > end:
                raise Malformed("a field runs past its message")
            yield number, wire, pos, pos + length
            pos += length
        else:
            raise Malformed(f"wire type {wire} (groups are not used by ONNX)")
