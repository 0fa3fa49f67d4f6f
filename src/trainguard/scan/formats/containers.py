"""Compressed streams (gzip, bz2, xz, lzma, zlib) and archives (tar, 7z), expanded within limits."""

from __future__ import annotations

import io
import mmap
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from trainguard.errors import LimitExceeded, MalformedArtifact, MissingExtraError, UnsupportedFormat
from trainguard.scan.artifact import Artifact, Data, Scan

if TYPE_CHECKING:
    import tempfile

Analyse = Callable[[Scan, Artifact], None]
_CHUNK = 1 << 20


class _Window(io.RawIOBase):
    """A read-only, seekable file over `art.data[start:end]` with no copy."""

    def __init__(self, art: Artifact) -> None:
        self._art = art
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._art.read(self._pos, len(buf))
        buf[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._art.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class _Sink:
    """Decompressed bytes: in memory while small, then in a temporary file; charged to the limits."""

    def __init__(self, scan: Scan, location: str) -> None:
        self.scan = scan
        self.location = location
        self.memory = bytearray()
        self.file: tempfile._TemporaryFileWrapper[bytes] | None = None
        self.size = 0

    def write(self, chunk: bytes, consumed: int) -> None:
        if not chunk:
            return
        self.scan.account_expansion(len(chunk), consumed, self.location, stream_total=self.size + len(chunk))
        self.size += len(chunk)
        if self.file is None and len(self.memory) + len(chunk) > self.scan.limits.spool_in_memory:
            self.scan.account_spill(len(self.memory), self.location)
            self.file = self.scan.spill_file()
            self.file.write(self.memory)
            self.memory = bytearray()
        if self.file is not None:
            self.scan.account_spill(len(chunk), self.location)
            self.file.write(chunk)
        else:
            self.memory += chunk

    def data(self) -> Data:
        if self.file is not None:
            return self.scan.map_file(self.file)
        return bytes(self.memory)


class _Streaming(Protocol):
    """What the bz2, lzma and lz4.frame decompressors share."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


def _chunks(art: Artifact, offset: int = 0) -> Iterator[bytes]:
    pos = offset
    while pos < art.size:
        chunk = art.read(pos, _CHUNK)
        pos += len(chunk)
        yield chunk


def _expand_zlib(
    scan: Scan, art: Artifact, wbits: int, name: str, *, multi: bool, offset: int = 0
) -> Artifact:
    location = f"{art.location}!/{name}"
    sink = _Sink(scan, location)
    dec = zlib.decompressobj(wbits)
    consumed = 0
    for chunk in _chunks(art, offset):
        consumed += len(chunk)
        data = chunk
        while data:
            out = dec.decompress(data, _CHUNK)
            data = dec.unconsumed_tail
            sink.write(out, consumed - len(data))
            if dec.eof:
                data = dec.unused_data
                if not multi or not data.strip(b"\x00"):
                    return Artifact(sink.data(), 0, sink.size, location, art.depth + 1)
                dec = zlib.decompressobj(wbits)
    sink.write(dec.flush(), consumed)
    if not dec.eof:
        raise MalformedArtifact(f"{location}: compressed stream is truncated")
    return Artifact(sink.data(), 0, sink.size, location, art.depth + 1)


def _expand_stream(scan: Scan, art: Artifact, make: Callable[[], _Streaming], name: str) -> Artifact:
    location = f"{art.location}!/{name}"
    sink = _Sink(scan, location)
    dec = make()
    consumed = 0
    for chunk in _chunks(art):
        consumed += len(chunk)
        data = chunk
        while True:
            try:
                out = dec.decompress(data, _CHUNK)
            except Exception as exc:  # bz2, lzma and lz4 each raise their own error types
                raise MalformedArtifact(f"{location}: {exc}") from None
            sink.write(out, consumed)
            data = b""
            if dec.eof:
                rest = dec.unused_data or b""
                if not rest.strip(b"\x00"):
                    return Artifact(sink.data(), 0, sink.size, location, art.depth + 1)
                dec = make()
                data = rest
                continue
            if dec.needs_input:
                break
    raise MalformedArtifact(f"{location}: compressed stream is truncated")


def scan_lz4(scan: Scan, art: Artifact, analyse: Analyse) -> None:
    """LZ4 frames, as joblib writes them with compress="lz4"."""
    scan.label("lz4")
    try:
        import lz4.frame
    except ImportError:
        raise MissingExtraError(
            "lz4", "archives", f"{art.location}: reading an LZ4-compressed file"
        ) from None
    try:
        child = _expand_stream(scan, art, lz4.frame.LZ4FrameDecompressor, "<lz4>")
    except RuntimeError as exc:
        raise MalformedArtifact(f"{art.location}: invalid LZ4 data ({exc})") from None
    analyse(scan, child)


def scan_gzip(scan: Scan, art: Artifact, analyse: Analyse) -> None:
    scan.label("gzip")
    try:
        child = _expand_zlib(scan, art, 31, "<gzip>", multi=True)
    except zlib.error as exc:
        raise MalformedArtifact(f"{art.location}: invalid gzip data ({exc})") from None
    analyse(scan, child)


def scan_zlib(scan: Scan, art: Artifact, analyse: Analyse, *, offset: int = 0) -> None:
    scan.label("zlib")
    try:
        child = _expand_zlib(scan, art, 15, "<zlib>", multi=False, offset=offset)
    except zlib.error as exc:
        raise MalformedArtifact(f"{art.location}: invalid zlib data ({exc})") from None
    analyse(scan, child)


def scan_joblib_zfile(scan: Scan, art: Artifact, analyse: Analyse) -> None:
    """joblib before 0.10: b'ZF', a hexadecimal length, then zlib data."""
    header = art.head(22)
    offset = 2 + 19 + (1 if header[21:22] == b" " else 0)
    scan.label("joblib-zfile")
    scan_zlib(scan, art, analyse, offset=offset)


def scan_bz2(scan: Scan, art: Artifact, analyse: Analyse) -> None:
    import bz2

    scan.label("bz2")
    analyse(scan, _expand_stream(scan, art, bz2.BZ2Decompressor, "<bz2>"))


def scan_xz(scan: Scan, art: Artifact, analyse: Analyse) -> None:
    import lzma

    scan.label("xz")
    analyse(scan, _expand_stream(scan, art, lambda: lzma.LZMADecompressor(lzma.FORMAT_AUTO), "<xz>"))


def inflate_member(scan: Scan, art: Artifact, offset: int, csize: int, method: int, name: str) -> Artifact:
    """A compressed ZIP member as its own artifact."""
    window = Artifact(art.data, art.start + offset, art.start + offset + csize, art.location, art.depth)
    if method == 8:
        try:
            child = _expand_zlib(scan, window, -15, name, multi=False)
        except zlib.error as exc:
            raise MalformedArtifact(f"{art.location}!/{name}: invalid deflate data ({exc})") from None
        return child
    if method == 12:
        import bz2

        return _expand_stream(scan, window, bz2.BZ2Decompressor, name)
    raise UnsupportedFormat(f"{art.location}!/{name}: ZIP compression method {method} is not supported")


def scan_tar(scan: Scan, art: Artifact, analyse: Analyse) -> None:
    import tarfile

    from trainguard.scan.formats.pickles import scan_torch_legacy_tar

    scan.label("tar")
    members: dict[str, Artifact] = {}
    try:
        with tarfile.open(fileobj=_Window(art), mode="r:") as tar:
            for count, info in enumerate(tar):
                if count >= scan.limits.max_members:
                    raise LimitExceeded(f"{art.location}: more than {scan.limits.max_members} tar members")
                if not info.isreg():
                    continue
                end = info.offset_data + info.size
                if end > art.size:
                    raise MalformedArtifact(f"{art.location}!/{info.name}: tar member runs past the end")
                members[info.name] = art.child(info.offset_data, end, info.name)
    except tarfile.TarError as exc:
        raise MalformedArtifact(f"{art.location}: invalid tar archive ({exc})") from None
    if {"pickle", "storages", "tensors"} <= members.keys():
        scan_torch_legacy_tar(scan, members)
        rest = {k: v for k, v in members.items() if k not in ("pickle", "storages", "tensors", "sys_info")}
    else:
        rest = members
    for child in rest.values():
        analyse(scan, child)


def scan_7z(scan: Scan, art: Artifact, analyse: Analyse) -> None:
    scan.label("7z")
    try:
        import py7zr
    except ImportError:
        raise MissingExtraError("py7zr", "archives", f"{art.location}: reading a 7z archive") from None
    import lzma
    import tempfile

    with tempfile.TemporaryDirectory(dir=scan.spill_dir, prefix="7z-") as out:
        try:
            with py7zr.SevenZipFile(io.BufferedReader(_Window(art)), mode="r") as archive:
                infos = archive.list()
                if len(infos) > scan.limits.max_members:
                    raise LimitExceeded(f"{art.location}: more than {scan.limits.max_members} 7z members")
                declared = sum(int(i.uncompressed or 0) for i in infos)
                scan.account_expansion(declared, art.size, art.location)
                archive.extractall(path=out)
        except (py7zr.exceptions.Bad7zFile, py7zr.exceptions.ArchiveError, lzma.LZMAError, EOFError) as exc:
            raise MalformedArtifact(f"{art.location}: invalid 7z archive ({exc})") from None
        except py7zr.exceptions.UnsupportedCompressionMethodError as exc:
            raise UnsupportedFormat(f"{art.location}: unsupported 7z method ({exc})") from None
        root = Path(out)
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(root).as_posix()
            with path.open("rb") as handle:
                size = path.stat().st_size
                data: Data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
                try:
                    analyse(scan, Artifact(data, 0, size, f"{art.location}!/{rel}", art.depth + 1))
                finally:
                    if isinstance(data, mmap.mmap):
                        data.close()
