"""HDF5 files: the root group's attributes, read from the bytes (no h5py), for legacy Keras models.

``keras.models.load_model("model.h5")`` rebuilds the model from the JSON in the root attribute
``model_config`` (and the loss and metrics in ``training_config``); a ``Lambda`` layer there carries
marshalled bytecode. Both are read here and judged like a ``.keras`` archive's config (`keras`).
Keras reads everything else in the file as datasets of weights.

A file is analysed only as far as this reader follows it: superblock versions 0-3, object headers
versions 1 and 2 with their continuation blocks, compact attributes holding fixed or variable-length
strings (the global heap). Anything else (dense attribute storage, shared messages, an HDF5 file
that is not a Keras model, whose datasets other loaders may unpickle) is undecided.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

from trainguard.errors import LimitExceeded, UndecidableError
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.formats.keras import judge_keras_config

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MAX_MESSAGES = 100_000
_MAX_BLOCKS = 10_000
_MAX_STRING = 64 << 20
_MAX_BLOCK = 16 << 20  # one object header block; real ones are a few KB
_ATTRIBUTE, _CONTINUATION, _ATTRIBUTE_INFO = 0x000C, 0x0010, 0x0015


class _Unreadable(Exception):
    pass


@dataclasses.dataclass
class _File:
    art: Artifact
    base: int  # where the superblock is: addresses count from here
    offsets: int = 8
    lengths: int = 8

    def read(self, address: int, n: int) -> bytes:
        if address < 0 or n < 0 or self.base + address + n > self.art.size:
            raise _Unreadable(f"a structure at {address} runs past the end of the file")
        return self.art.read(self.base + address, n)

    def unsigned(self, raw: bytes) -> int:
        return int.from_bytes(raw, "little")


def _superblock(art: Artifact, base: int) -> tuple[_File, int]:
    """The file layout and the root group's object header address."""
    h5 = _File(art, base)
    version = h5.read(8, 1)[0]
    if version in (0, 1):
        h5.offsets, h5.lengths = h5.read(13, 1)[0], h5.read(14, 1)[0]
        _check_sizes(h5)
        at = 24 + (4 if version == 1 else 0)
        base_address = h5.unsigned(h5.read(at, h5.offsets))
        entry = at + 4 * h5.offsets  # after base, free space, end of file and driver info addresses
        root = h5.unsigned(h5.read(entry + h5.offsets, h5.offsets))
    elif version in (2, 3):
        h5.offsets, h5.lengths = h5.read(9, 1)[0], h5.read(10, 1)[0]
        _check_sizes(h5)
        base_address = h5.unsigned(h5.read(12, h5.offsets))
        root = h5.unsigned(h5.read(12 + 3 * h5.offsets, h5.offsets))
    else:
        raise _Unreadable(f"superblock version {version}")
    if base_address not in (0, base):
        raise _Unreadable(f"base address {base_address} with the superblock at {base}")
    return h5, root


def _check_sizes(h5: _File) -> None:
    if h5.offsets not in (2, 4, 8) or h5.lengths not in (2, 4, 8):
        raise _Unreadable(f"sizes of offsets {h5.offsets} and lengths {h5.lengths}")


def _messages(h5: _File, address: int) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, data) of every message of the object header at `address`, continuations followed."""
    first = h5.read(address, 4)
    blocks: list[tuple[int, int, int]] = []  # (address, length, header version)
    if first == b"OHDR":
        version, flags = h5.read(address + 4, 2)
        if version != 2:
            raise _Unreadable(f"object header version {version}")
        at = address + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 3)
        size = h5.unsigned(h5.read(at, width))
        blocks.append((at + width, size, 2))
        order = bool(flags & 0x04)
    elif first[0] == 1:
        count, _, size = struct.unpack("<HII", h5.read(address + 2, 10))
        if count > _MAX_MESSAGES:
            raise _Unreadable(f"{count} header messages")
        blocks.append((address + 16, size, 1))
        order = False
    else:
        raise _Unreadable(f"object header version {first[0]}")
    visited: set[int] = set()
    while blocks:
        start, length, version = blocks.pop(0)
        if start in visited or len(visited) >= _MAX_BLOCKS:
            raise _Unreadable("object header continuation blocks loop or never end")
        if length > _MAX_BLOCK:
            raise _Unreadable(f"an object header block of {length} bytes")
        visited.add(start)
        seen = len(visited)
        block = h5.read(start, length)
        pos = 0
        end = len(block) - (4 if version == 2 else 0)  # a version 2 block ends in a checksum
        if version == 2 and seen > 1:
            if block[:4] != b"OCHK":
                raise _Unreadable("a continuation block without its signature")
            pos = 4
        while pos < end:
            if version == 1:
                if pos + 8 > end:
                    break
                kind, size, flags = struct.unpack("<HHB", block[pos : pos + 5])
                pos += 8
            else:
                head = 4 + (2 if order else 0)
                if pos + head > end:
                    break  # a gap at the end of the block
                kind, size, flags = struct.unpack("<BHB", block[pos : pos + 4])
                pos += head
            data = block[pos : pos + size]
            if len(data) != size:
                raise _Unreadable("a header message runs past its block")
            pos += size
            if kind == _CONTINUATION:
                offset = h5.unsigned(data[: h5.offsets])
                span = h5.unsigned(data[h5.offsets : h5.offsets + h5.lengths])
                blocks.append((offset, span, version))
            yield kind, flags, data


def _root_attributes(h5: _File, root: int) -> dict[str, list[str | None]]:
    """Root attribute names, each with its values when they are strings (None otherwise): every one,
    should a name come twice (which copy a reader takes is its own business)."""
    found: dict[str, list[str | None]] = {}
    for kind, flags, data in _messages(h5, root):
        if kind == _ATTRIBUTE_INFO:
            heap = data[2 + (2 if data[1] & 1 else 0) :][: h5.offsets]
            if heap != b"\xff" * h5.offsets:
                raise _Unreadable("attributes kept in dense storage")
        elif kind == _ATTRIBUTE:
            if flags & 0x02:
                raise _Unreadable("a shared attribute message")
            name, value = _attribute(h5, data)
            found.setdefault(name, []).append(value)
    return found


def _attribute(h5: _File, data: bytes) -> tuple[str, str | None]:
    version = data[0]
    name_size, type_size, space_size = struct.unpack("<HHH", data[2:8])
    pos = 8 + (1 if version == 3 else 0)

    def take(size: int, pad: bool) -> bytes:
        nonlocal pos
        part = data[pos : pos + size]
        if len(part) != size:
            raise _Unreadable("an attribute message runs past its end")
        pos += (size + 7) // 8 * 8 if pad else size
        return part

    if version not in (1, 2, 3):
        raise _Unreadable(f"attribute message version {version}")
    name = take(name_size, version == 1).rstrip(b"\0").decode("utf-8", "replace")
    datatype = take(type_size, version == 1)
    space = take(space_size, version == 1)
    if _elements(h5, space) != 1:
        return name, None
    return name, _string(h5, datatype, data[pos:])


def _elements(h5: _File, space: bytes) -> int:
    if len(space) < 4:
        raise _Unreadable("a dataspace message too short")
    version, rank = space[0], space[1]
    if version == 2 and space[3] == 0:
        return 1  # scalar
    if version == 2 and space[3] == 2:
        return 0  # null
    dims_at = 8 if version == 1 else 4
    count = 1
    for i in range(rank):
        raw = space[dims_at + i * h5.lengths : dims_at + (i + 1) * h5.lengths]
        count *= h5.unsigned(raw)
    return count


def _string(h5: _File, datatype: bytes, value: bytes) -> str | None:
    if len(datatype) < 8:
        raise _Unreadable("a datatype message too short")
    kind = datatype[0] & 0x0F
    size = int.from_bytes(datatype[4:8], "little")
    if kind == 3:  # a fixed-length string
        return value[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
    if kind == 9 and datatype[1] & 0x0F == 1:  # a variable-length string, kept in the global heap
        length = int.from_bytes(value[:4], "little")
        collection = h5.unsigned(value[4 : 4 + h5.offsets])
        index = int.from_bytes(value[4 + h5.offsets : 8 + h5.offsets], "little")
        return _heap_object(h5, collection, index, length).decode("utf-8", "replace")
    return None


def _heap_object(h5: _File, collection: int, index: int, length: int) -> bytes:
    if h5.read(collection, 4) != b"GCOL":
        raise _Unreadable("a global heap reference to something else")
    size = h5.unsigned(h5.read(collection + 8, h5.lengths))
    if size > _MAX_STRING:
        raise _Unreadable(f"a global heap collection of {size} bytes")
    pos = collection + 8 + h5.lengths
    end = collection + size
    while pos + 8 + h5.lengths <= end:
        number = int.from_bytes(h5.read(pos, 2), "little")
        object_size = h5.unsigned(h5.read(pos + 8, h5.lengths))
        if number == 0:
            break
        if number == index:
            if object_size > _MAX_STRING or length > object_size:
                raise _Unreadable("a global heap object of an unlikely size")
            return h5.read(pos + 8 + h5.lengths, length)
        pos += 8 + h5.lengths + (object_size + 7) // 8 * 8
    raise _Unreadable(f"global heap object {index} not found")


def scan_hdf5(scan: Scan, art: Artifact, base: int) -> None:
    """Analyse an HDF5 file whose superblock is at `base` (after a user block, if any)."""
    scan.label("hdf5")
    try:
        h5, root = _superblock(art, base)
        attributes = _root_attributes(h5, root)
    except (_Unreadable, struct.error, IndexError) as exc:
        raise UndecidableError(f"{art.location}: HDF5 structure not followed ({exc})") from None
    if len(attributes) > _MAX_MESSAGES:
        raise LimitExceeded(f"{art.location}: {len(attributes)} root attributes")
    if "model_config" not in attributes and "keras_version" not in attributes:
        raise UndecidableError(
            f"{art.location}: an HDF5 file that is not a Keras model; its datasets are not analysed"
            " (PyTables and pandas keep pickled objects in some)"
        )
    scan.label("keras")
    for name in ("model_config", "training_config"):
        for text in attributes.get(name, []):
            if text is None:
                raise UndecidableError(
                    f"{art.location}: Keras attribute {name} is not a string this reader decodes"
                )
            judge_keras_config(scan, text.encode("utf-8"), f"{art.location}!/@{name}")
