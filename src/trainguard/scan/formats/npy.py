"""NumPy .npy files: a bounded header, then raw data or, for object arrays, a pickle."""

from __future__ import annotations

import ast
import struct

from trainguard.errors import LimitExceeded, MalformedArtifact
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.formats.dtypes import numpy_typestr

MAGIC = b"\x93NUMPY"


def _descr_info(descr: object) -> tuple[int, bool] | None:
    """(itemsize, hasobject) of a header 'descr', simple or structured."""
    if isinstance(descr, str):
        return numpy_typestr(descr, npy_header=True)
    if not isinstance(descr, list):
        return None
    total, hasobject = 0, False
    for field in descr:
        if not isinstance(field, tuple) or len(field) not in (2, 3):
            return None
        info = _descr_info(field[1])
        if info is None:
            return None
        count = 1
        if len(field) == 3:
            shape = field[2] if isinstance(field[2], tuple) else (field[2],)
            for n in shape:
                if not isinstance(n, int) or n < 0:
                    return None
                count *= n
        total += info[0] * count
        hasobject = hasobject or info[1]
    return total, hasobject


def scan_npy(scan: Scan, art: Artifact) -> None:
    from trainguard.scan.formats.pickles import run_pickle

    scan.label("npy")
    head = art.read(0, 12)
    if len(head) < 10:
        raise MalformedArtifact(f"{art.location}: truncated .npy header")
    major = head[6]
    if major in (2, 3) and len(head) < 12:
        raise MalformedArtifact(f"{art.location}: truncated .npy header")
    if major == 1:
        (hlen,) = struct.unpack_from("<H", head, 8)
        start = 10
    elif major in (2, 3):
        (hlen,) = struct.unpack_from("<I", head, 8)
        start = 12
    else:
        raise MalformedArtifact(f"{art.location}: unknown .npy version {major}")
    if hlen > scan.limits.max_npy_header:
        raise LimitExceeded(
            f"{art.location}: .npy header of {hlen} bytes (limit {scan.limits.max_npy_header})"
        )
    raw = art.read(start, hlen)
    if len(raw) != hlen:
        raise MalformedArtifact(f"{art.location}: truncated .npy header")
    try:
        # literal_eval builds only literals; the header is bounded above.
        header = ast.literal_eval(raw.decode("utf-8" if major == 3 else "latin-1"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        raise MalformedArtifact(f"{art.location}: .npy header is not a Python literal") from None
    if not isinstance(header, dict) or {"descr", "fortran_order", "shape"} - header.keys():
        raise MalformedArtifact(f"{art.location}: .npy header lacks descr, fortran_order or shape")
    info = _descr_info(header["descr"])
    shape = header["shape"]
    if info is None or not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise MalformedArtifact(f"{art.location}: .npy dtype or shape cannot be understood")
    data_start = start + hlen
    if info[1]:
        scan.label("pickle")
        result = run_pickle(scan, art, art.start + data_start)
        if result.error is not None:
            scan.problem(
                "malformed-pickle",
                f"object array pickle stops: {result.error.reason}",
                art.location,
                result.error.offset - art.start,
            )
        return
    count = 1
    for n in shape:
        count *= n
    expected = count * info[0]
    actual = art.size - data_start
    if actual < expected:
        raise MalformedArtifact(f"{art.location}: .npy data is {actual} bytes, header promises {expected}")
    if actual > expected:
        scan.add(
            "trailing-data",
            Severity.LOW,
            f"{actual - expected} bytes after the array data",
            art.location,
            data_start + expected,
        )
