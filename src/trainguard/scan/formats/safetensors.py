"""safetensors: an 8-byte length, a JSON header, then tensor bytes. Nothing in it can run code,
but a header that lies about offsets or sizes can make loaders misbehave, so it is validated."""

from __future__ import annotations

import json
import struct

from trainguard.errors import LimitExceeded, MalformedArtifact
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan

_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack_from("<Q", head, 0)
    return head[8:9] == b"{" and n >= 2 and (n <= size - 8 or n > (1 << 32))


def scan_safetensors(scan: Scan, art: Artifact) -> None:
    scan.label("safetensors")
    (n,) = struct.unpack("<Q", art.read(0, 8))
    if n > scan.limits.max_safetensors_header:
        raise LimitExceeded(
            f"{art.location}: safetensors header declares {n} bytes "
            f"(limit {scan.limits.max_safetensors_header})"
        )
    if n > art.size - 8:
        raise MalformedArtifact(f"{art.location}: safetensors header of {n} bytes runs past the end")
    try:
        header = json.loads(art.read(8, n))
    except (ValueError, RecursionError):
        raise MalformedArtifact(f"{art.location}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise MalformedArtifact(f"{art.location}: safetensors header is not a JSON object")
    problems = _validate(header, art.size - 8 - n)
    for message in problems[:20]:
        scan.add("safetensors-invalid-header", Severity.MEDIUM, message, art.location)


def _validate(header: dict[str, object], data_len: int) -> list[str]:
    problems: list[str] = []
    spans: list[tuple[int, int, str]] = []
    bits_of = _DTYPE_BITS
    # Exact types, not isinstance: JSON's true and false are bools, which the format does not allow.
    for name, entry in header.items():
        if name == "__metadata__":
            if type(entry) is not dict or any(type(v) is not str for v in entry.values()):
                problems.append("__metadata__ must map strings to strings")
            continue
        if type(entry) is not dict:
            problems.append(f"tensor {name!r}: entry is not an object")
            continue
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        bits_per = bits_of.get(dtype) if type(dtype) is str else None
        if bits_per is None:
            problems.append(f"tensor {name!r}: unknown dtype {dtype!r}")
            continue
        count = 1
        if type(shape) is list:
            for d in shape:
                if type(d) is not int or d < 0:
                    count = -1
                    break
                count *= d
        if type(shape) is not list or count < 0:
            problems.append(f"tensor {name!r}: shape must be a list of non-negative integers")
            continue
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            problems.append(f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end")
            continue
        begin, end = offsets
        bits = count * bits_per
        if bits % 8 or bits // 8 != end - begin:
            problems.append(
                f"tensor {name!r}: {dtype} x {shape} needs {bits / 8:g} bytes, offsets span {end - begin}"
            )
        if end > data_len:
            problems.append(f"tensor {name!r}: data_offsets end {end} past the data ({data_len} bytes)")
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin < cursor:
            problems.append(f"tensor {name!r}: overlaps the previous tensor")
        elif begin > cursor:
            problems.append(f"tensor {name!r}: {begin - cursor} unaccounted bytes before it")
        cursor = max(cursor, end)
    if not problems and cursor != data_len:
        problems.append(f"{data_len - cursor} bytes after the last tensor are not described by the header")
    return problems
