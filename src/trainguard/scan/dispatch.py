"""Recognise an artifact by its bytes and hand it to its format's analysis."""

from __future__ import annotations

import logging
from collections.abc import Callable

from trainguard._pickle.reader import ARG_KIND
from trainguard.errors import LimitExceeded, MissingExtraError, UndecidableError
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.formats import (
    containers,
    gguf,
    hdf5,
    npy,
    onnx,
    pickles,
    protobuf,
    safetensors,
    savedmodel,
    zips,
)
from trainguard.scan.formats.zipread import find_eocd

log = logging.getLogger(__name__)


_HDF5 = hdf5.SIGNATURE


def sniff(head: bytes, size: int) -> str:
    """The format the bytes announce; never the file name."""
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(_HDF5):
        return "hdf5"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(npy.MAGIC):
        return "npy"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith((b"\xfd7zXZ\x00", b"\x5d\x00\x00")):
        return "xz"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if head.startswith(b"\x04\x22\x4d\x18"):
        return "lz4"
    if head.startswith(b"ZF") and len(head) > 21 and head[2:4] == b"0x":
        return "joblib-zfile"
    if len(head) >= 2 and head[0] == 0x78 and (head[0] << 8 | head[1]) % 31 == 0:
        return "zlib"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if safetensors.looks_like_safetensors(head, size):
        return "safetensors"
    return "pickle"


def _hdf5_superblock(art: Artifact) -> int | None:
    """Where HDF5's superblock is: at 0, or after a user block of 512 bytes or a power of two above."""
    offset = 0
    while offset + len(_HDF5) <= art.size and offset <= 1 << 30:
        if art.data[art.start + offset : art.start + offset + len(_HDF5)] == _HDF5:
            return offset
        offset = 512 if offset == 0 else offset * 2
    return None


def _scan_hdf5(scan: Scan, art: Artifact) -> None:
    base = _hdf5_superblock(art)
    assert base is not None
    hdf5.scan_hdf5(scan, art, base)


def analyse(scan: Scan, art: Artifact) -> None:
    """Analyse one artifact, recording any reason it could not be finished as a problem."""
    try:
        if art.depth > scan.limits.max_depth:
            raise LimitExceeded(
                f"{art.location}: nested more than {scan.limits.max_depth} levels deep",
                hint="raise --max-depth if this nesting is genuine",
            )
        _analyse(scan, art)
    except UndecidableError as exc:
        scan.problem(type(exc).__name__, exc.diagnostics(), art.location, exc.offset)
    except MissingExtraError as exc:
        scan.problem("MissingExtra", exc.diagnostics(), art.location)
    except Exception as exc:  # a bug or an unforeseen input must end as "undecided", never as a crash
        log.debug("analysis of %s failed", art.location, exc_info=True)
        scan.problem("Error", f"{art.location}: analysis failed ({type(exc).__name__}: {exc})", art.location)


def _analyse(scan: Scan, art: Artifact) -> None:
    if art.size == 0:
        scan.label("empty")
        return
    head = art.head(512)
    fmt = "hdf5" if _hdf5_superblock(art) is not None else sniff(head, art.size)
    if fmt == "pickle" and ARG_KIND[head[0]] is None:
        # Every unpickler stops at the first byte: not a pickle (but maybe data before a ZIP).
        _maybe_zip_with_prefix(scan, art)
        return
    if fmt == "pickle":
        if not pickles.scan_pickle_file(scan, art):
            _maybe_zip_with_prefix(scan, art)
        else:
            _protobuf_models(scan, art)
        return
    # pickle.load reads any file as a pickle; a polyglot may be both a container and a pickle.
    as_pickle = "read as a pickle: "
    reading = pickles.run_pickle(scan, art, art.start, strict=False, joblib=False, prefix=as_pickle)
    pickles.limit_reached(scan, art, reading, as_pickle, container=True)
    if fmt in _LEAVES:
        _LEAVES[fmt](scan, art)
    else:
        _CONTAINERS[fmt](scan, art, analyse)
    _protobuf_models(scan, art)


def _protobuf_models(scan: Scan, art: Artifact) -> bool:
    """Analyse the bytes as each protobuf model they parse as; False if neither.

    ONNX and SavedModel have no magic bytes and protobuf fields come in any order, so bytes that are
    another format (a pickle, say) and also parse whole as a model load as one too; and a field one
    schema does not know is kept and ignored by its parser, so bytes may be both models at once."""
    top = protobuf.top_level(memoryview(art.data)[art.start : art.end])
    if top is None:
        return False
    found = False
    if onnx.looks_like_onnx(top):
        onnx.scan_onnx(scan, art)
        found = True
    if savedmodel.looks_like_savedmodel(art, top):
        savedmodel.scan_savedmodel(scan, art)
        found = True
    return found


# Formats whose content is analysed in place, and formats that hold further artifacts.
_LEAVES: dict[str, Callable[[Scan, Artifact], None]] = {
    "gguf": gguf.scan_gguf,
    "hdf5": _scan_hdf5,
    "npy": npy.scan_npy,
    "safetensors": safetensors.scan_safetensors,
}
_CONTAINERS: dict[str, Callable[[Scan, Artifact, containers.Analyse], None]] = {
    "zip": zips.scan_zip,
    "gzip": containers.scan_gzip,
    "bz2": containers.scan_bz2,
    "xz": containers.scan_xz,
    "zlib": containers.scan_zlib,
    "joblib-zfile": containers.scan_joblib_zfile,
    "tar": containers.scan_tar,
    "7z": containers.scan_7z,
    "lz4": containers.scan_lz4,
}


def _maybe_zip_with_prefix(scan: Scan, art: Artifact) -> None:
    """Not a pickle at the start; but a ZIP archive may sit after other data."""
    if art.size >= 22 and find_eocd(art) is not None:
        zips.scan_zip(scan, art, analyse)
        return
    if _protobuf_models(scan, art):
        return
    if art.depth == 0:
        scan.label("other")
