"""A strict ZIP directory reader over a byte window.

It reads the central directory the way miniz (PyTorch's reader) does, and reports what other
readers disagree about instead of hiding it: data before the archive, duplicate names, local
headers that contradict the directory, overlapping entries, encryption.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import NamedTuple

from trainguard.errors import LimitExceeded, MalformedArtifact
from trainguard.scan.artifact import Artifact

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"


class ZipEntry(NamedTuple):
    """One central-directory entry (a tuple: archives can hold thousands)."""

    name: str
    method: int
    flags: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int  # relative to the artifact, prefix included
    data_offset: int  # where the member's bytes start, relative to the artifact
    local_name: str

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & 1)


@dataclasses.dataclass(frozen=True)
class ZipDirectory:
    entries: tuple[ZipEntry, ...]
    prefix: int  # bytes before the first local header (a polyglot or self-extractor)


def find_eocd(art: Artifact) -> int | None:
    """Offset (relative) of the end-of-central-directory record, or None."""
    tail_len = min(art.size, 65535 + 22)
    tail = art.read(art.size - tail_len, tail_len)
    pos = tail.rfind(_EOCD)
    while pos >= 0:
        if pos + 22 <= len(tail):
            (comment_len,) = struct.unpack_from("<H", tail, pos + 20)
            if pos + 22 + comment_len <= len(tail):
                return art.size - tail_len + pos
        pos = tail.rfind(_EOCD, 0, pos)
    return None


def read_directory(art: Artifact, max_members: int) -> ZipDirectory:
    eocd = find_eocd(art)
    if eocd is None:
        raise MalformedArtifact(f"{art.location}: no ZIP end-of-central-directory record")
    rec = art.read(eocd, 22)
    (_, disk, cd_disk, _, count, cd_size, cd_offset, _) = struct.unpack("<4sHHHHIIH", rec)
    if disk != 0 or cd_disk != 0:
        raise MalformedArtifact(f"{art.location}: multi-disk ZIP archives are not supported")
    cd_end = eocd
    # Writers such as PyTorch's add ZIP64 records even when the plain ones suffice; like CPython,
    # a locator right before the end record means the ZIP64 record is the one to trust.
    if art.read(eocd - 20, 4) == _EOCD64_LOCATOR or 0xFFFF in (count,) or 0xFFFFFFFF in (cd_size, cd_offset):
        count, cd_size, cd_offset, cd_end = _zip64(art, eocd)
    if count > max_members:
        raise LimitExceeded(f"{art.location}: {count} archive entries (limit {max_members})")
    cd_start = cd_end - cd_size
    prefix = cd_start - cd_offset
    if cd_start < 0 or prefix < 0:
        raise MalformedArtifact(f"{art.location}: ZIP central directory lies outside the file")
    entries = _central_entries(art, cd_start, cd_size, count, prefix)
    return ZipDirectory(tuple(entries), prefix)


def _zip64(art: Artifact, eocd: int) -> tuple[int, int, int, int]:
    loc = art.read(eocd - 20, 20)
    if len(loc) != 20 or loc[:4] != _EOCD64_LOCATOR:
        raise MalformedArtifact(f"{art.location}: ZIP64 locator missing")
    # Like CPython, find the record just before the locator; the stored offset ignores any prefix.
    rec_pos = eocd - 20 - 56
    rec = art.read(rec_pos, 56)
    if len(rec) != 56 or rec[:4] != _EOCD64:
        raise MalformedArtifact(f"{art.location}: ZIP64 end record missing")
    count, cd_size, cd_offset = struct.unpack_from("<QQQ", rec, 32)
    return count, cd_size, cd_offset, rec_pos


def _central_entries(art: Artifact, cd_start: int, cd_size: int, count: int, prefix: int) -> list[ZipEntry]:
    cd = art.read(cd_start, cd_size)
    if len(cd) != cd_size:
        raise MalformedArtifact(f"{art.location}: ZIP central directory is truncated")
    entries: list[ZipEntry] = []
    pos = 0
    for _ in range(count):
        if cd[pos : pos + 4] != _CENTRAL or pos + 46 > len(cd):
            raise MalformedArtifact(f"{art.location}: bad ZIP central directory entry", offset=cd_start + pos)
        (flags, method, _, _, crc, csize, usize, nlen, xlen, clen) = struct.unpack_from(
            "<HHHHIIIHHH", cd, pos + 8
        )
        (local_offset,) = struct.unpack_from("<I", cd, pos + 42)
        raw_name = cd[pos + 46 : pos + 46 + nlen]
        extra = cd[pos + 46 + nlen : pos + 46 + nlen + xlen]
        usize, csize, local_offset = _zip64_extra(extra, usize, csize, local_offset)
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        header = local_offset + prefix
        data_offset, local_name = _local_header(art, header)
        entries.append(ZipEntry(name, method, flags, crc, csize, usize, header, data_offset, local_name))
        pos += 46 + nlen + xlen + clen
    return entries


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            body = extra[pos + 4 : pos + 4 + size]
            values = [struct.unpack_from("<Q", body, i)[0] for i in range(0, len(body) - 7, 8)]
            if usize == 0xFFFFFFFF and values:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
        pos += 4 + size
    return usize, csize, offset


def _local_header(art: Artifact, header: int) -> tuple[int, str]:
    at = art.start + header
    if header < 0 or header + 30 > art.size or art.data[at : at + 4] != _LOCAL:
        raise MalformedArtifact(f"{art.location}: ZIP local header missing", offset=header)
    nlen, xlen = _LOCAL_LENGTHS(art.data, at + 26)
    name = art.read(header + 30, nlen).decode("utf-8", "replace")
    return header + 30 + nlen + xlen, name


_LOCAL_LENGTHS = struct.Struct("<HH").unpack_from
