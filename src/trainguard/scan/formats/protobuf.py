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


_MAX_GROUP_DEPTH = 64

Field = tuple[int, int, int, int]  # number, wire type, value or payload start, payload end


def top_level(data: bytes | memoryview) -> list[Field] | None:
    """Every top-level field of `data` read as one message, or None if it is not a whole protobuf."""
    try:
        return list(fields(data, 0, len(data)))
    except Malformed:
        return None


def fields(data: bytes | memoryview, start: int, end: int) -> Iterator[Field]:
    """(field number, wire type, value or payload start, payload end) for each field in data[start:end].

    Groups (wire types 3 and 4) are skipped whole, as parsers keep them as unknown fields: no schema
    these readers walk has one, but a file may carry one and still load.
    """
    pos = start
    while pos < end:
        number, wire, pos = _key(data, pos, end)
        if wire == 3:
            pos = _skip_group(data, pos, end, number, 1)
            continue
        if wire == 4:
            raise Malformed("a group ends that never began")
        a, b, pos = _value(data, pos, end, wire)
        yield number, wire, a, b


def _key(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int, int]:
    key, pos = varint(data, pos, end)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise Malformed("field number 0")
    if wire > 5:
        raise Malformed(f"wire type {wire}")
    return number, wire, pos


def _value(data: bytes | memoryview, pos: int, end: int, wire: int) -> tuple[int, int, int]:
    """(value or payload start, payload end, position after the field) of a field that is not a group."""
    if wire == 0:
        value, pos = varint(data, pos, end)
        return value, pos, pos
    if wire in (1, 5):
        size = 8 if wire == 1 else 4
        if pos + size > end:
            raise Malformed("a fixed-size field runs past its message")
        return pos, pos + size, pos + size
    length, pos = varint(data, pos, end)
    if pos + length > end:
        raise Malformed("a field runs past its message")
    return pos, pos + length, pos + length


def _skip_group(data: bytes | memoryview, pos: int, end: int, number: int, depth: int) -> int:
    if depth > _MAX_GROUP_DEPTH:
        raise Malformed("groups nested too deep")
    while pos < end:
        inner, wire, pos = _key(data, pos, end)
        if wire == 4:
            if inner != number:
                raise Malformed("a group ends with another group's number")
            return pos
        pos = _skip_group(data, pos, end, inner, depth + 1) if wire == 3 else _value(data, pos, end, wire)[2]
    raise Malformed("a group runs past its message")
