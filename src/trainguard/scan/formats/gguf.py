"""GGUF models (llama.cpp): the metadata read from the bytes; chat templates checked, never rendered.

GGUF holds no code, but loaders render its ``tokenizer.chat_template`` (and named variants) with
Jinja; outside a sandbox a template reaches Python (CVE-2024-34359). Every metadata string whose
key names a template, or that holds Jinja syntax, is checked (`templates`). The rest of the file
(tensor descriptions and data) is not executable and only bounds-checked through the metadata walk.

Layout (little-endian): ``GGUF``, version (u32: 1-3), tensor count and metadata count (u64; u32
in version 1), then each key (string), its value type (u32) and value. Strings are a length (u64;
u32 in version 1) and UTF-8 bytes.
"""

from __future__ import annotations

import struct

from trainguard.errors import LimitExceeded, MalformedArtifact, UndecidableError
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.formats.templates import template_problems

_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_ENTRIES = 1 << 20  # metadata entries; real files have a few dozen
_MAX_DEPTH = 8  # arrays of arrays
_MAX_STRING = 64 << 20  # one metadata string (a tokenizer's largest merges list is a few MB in all)


class _Reader:
    def __init__(self, art: Artifact, version: int) -> None:
        self.art = art
        self.pos = 8
        self.wide = version >= 2  # version 1 used 32-bit counts and lengths

    def take(self, n: int) -> bytes:
        data = self.art.read(self.pos, n)
        if len(data) != n:
            raise MalformedArtifact(f"{self.art.location}: GGUF metadata runs past the end of the file")
        self.pos += n
        return data

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def count(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0]) if self.wide else self.u32()

    def string(self) -> bytes:
        n = self.count()
        if n > _MAX_STRING:
            raise LimitExceeded(f"{self.art.location}: a GGUF metadata string of {n} bytes")
        return self.take(n)

    def skip_value(self, kind: int, depth: int = 0) -> list[bytes]:
        """Skip one value; return the strings in it (checked by the caller)."""
        if kind in _SCALARS:
            self.take(_SCALARS[kind])
            return []
        if kind == _STRING:
            return [self.string()]
        if kind == _ARRAY and depth < _MAX_DEPTH:
            item = self.u32()
            n = self.count()
            if item in _SCALARS:
                size = _SCALARS[item] * n
                if self.pos + size > self.art.size:
                    raise MalformedArtifact(f"{self.art.location}: a GGUF array runs past the file's end")
                self.pos += size
                return []
            if n > self.art.size - self.pos:  # every string or array takes at least one byte
                raise MalformedArtifact(f"{self.art.location}: a GGUF array longer than the file")
            found: list[bytes] = []
            for _ in range(n):
                found.extend(self.skip_value(item, depth + 1))
            return found
        raise UndecidableError(f"{self.art.location}: GGUF metadata value of unknown type {kind}")


def scan_gguf(scan: Scan, art: Artifact) -> None:
    scan.label("gguf")
    version = int(struct.unpack("<I", art.read(4, 4))[0]) if art.size >= 8 else 0
    if version not in (1, 2, 3):
        raise UndecidableError(f"{art.location}: GGUF version {version}, which this scanner does not read")
    reader = _Reader(art, version)
    reader.count()  # tensors
    entries = reader.count()
    if entries > _MAX_ENTRIES:
        raise LimitExceeded(f"{art.location}: {entries} GGUF metadata entries (limit {_MAX_ENTRIES})")
    for _ in range(entries):
        key_at = reader.pos
        key = reader.string().decode("utf-8", "replace")
        kind = reader.u32()
        is_template = "chat_template" in key
        for raw in reader.skip_value(kind):
            if is_template or b"{%" in raw or b"{{" in raw:
                _check_template(scan, art, key, raw, key_at)


def _check_template(scan: Scan, art: Artifact, key: str, raw: bytes, offset: int) -> None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UndecidableError(f"{art.location}: GGUF template {key!r} is not UTF-8") from None
    try:
        problems = template_problems(text)
    except UndecidableError as exc:
        raise UndecidableError(f"{art.location}: GGUF template {key!r}: {exc}") from None
    if problems:
        scan.add(
            "template-injection",
            Severity.CRITICAL,
            f"Jinja template {key!r} can reach Python internals when a loader renders it: "
            + "; ".join(problems[:5]),
            art.location,
            offset,
        )
