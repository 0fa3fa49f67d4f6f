"""NumPy .npy files: a bounded header, then raw data or, for object arrays, a pickle."""

from __future__ import annotations

import ast
import re
import struct
import warnings

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
        header = _parse_header(raw.decode("utf-8" if major == 3 else "latin-1"))
    except (ValueError, TypeError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        # TypeError: a literal that cannot be built, such as a set holding a dict.
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


# The header numpy.save writes for a plain dtype, padded with spaces and a newline, e.g.
#   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
# For exactly this form the values are read directly; anything else (structured dtypes, other
# spellings) goes to ast.literal_eval, which numpy itself uses.
_DIM = r"(?:0|[1-9][0-9]*)"
_PLAIN_HEADER = re.compile(
    r"\{'descr': '([^'\\\n]*)', 'fortran_order': (True|False), "
    rf"'shape': \(((?:{_DIM}, )*{_DIM},?|)\), \}} *\n?"
)


def _parse_header(text: str) -> object:
    """The header as ast.literal_eval reads it (ValueError or SyntaxError when it is no literal)."""
    match = _PLAIN_HEADER.fullmatch(text)
    if match is None:
        return _literal(text)
    descr, order, dims = match.groups()
    parts = [p for p in dims.split(", ") if p]
    if parts and parts[-1].endswith(","):
        parts[-1] = parts[-1][:-1]
    # "(3)" is the int 3, not a tuple: leave such spellings to literal_eval.
    if len(parts) == 1 and not dims.endswith(","):
        return _literal(text)
    return {"descr": descr, "fortran_order": order == "True", "shape": tuple(int(p) for p in parts)}


def _literal(text: str) -> object:
    # literal_eval builds only literals, and the header is bounded above. Compiling a hostile header
    # must not print SyntaxWarnings into the scan's output.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.literal_eval(text)
