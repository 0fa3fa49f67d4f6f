"""An artifact under analysis: a window of bytes, where it came from, and what was found in it."""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path
from typing import TYPE_CHECKING, Union

from trainguard.errors import LimitExceeded
from trainguard.findings import Finding, Problem, Severity
from trainguard.scan.limits import ScanLimits
from trainguard.scan.policy import Policy

if TYPE_CHECKING:
    import tempfile

Data = Union[bytes, mmap.mmap]  # noqa: UP007


@dataclasses.dataclass(frozen=True)
class Artifact:
    """Bytes `data[start:end]`, found at `location` (`outer!/inner` for nested members)."""

    data: Data
    start: int
    end: int
    location: str
    depth: int = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    def head(self, n: int = 512) -> bytes:
        return bytes(self.data[self.start : min(self.end, self.start + n)])

    def read(self, offset: int, n: int) -> bytes:
        """`n` bytes at `offset` relative to the artifact, clipped to its end."""
        begin = self.start + offset
        return bytes(self.data[begin : min(self.end, begin + n)])

    def child(self, start: int, end: int, name: str) -> Artifact:
        """A member stored uncompressed inside this artifact: no copy."""
        return Artifact(
            self.data, self.start + start, self.start + end, f"{self.location}!/{name}", self.depth + 1
        )


# Free space is checked when a spill starts and after every this many bytes written to it.
_SPILL_CHECK_EVERY = 256 << 20


class Scan:
    """Collects findings, problems and format labels for one top-level file."""

    def __init__(self, path: str, policy: Policy, limits: ScanLimits) -> None:
        self.path = path
        self.policy = policy
        self.limits = limits
        self.findings: list[Finding] = []
        self.problems: list[Problem] = []
        self.formats: list[str] = []
        self.expanded = 0
        self.spilled = 0  # bytes written to temporary files
        self._spill_checked = 0
        self.ops_spent = 0  # pickle opcodes run so far, by every reading of every stream in the file
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._spills: list[tuple[object, mmap.mmap | None]] = []

    def add(
        self, rule: str, severity: Severity, message: str, location: str, offset: int | None = None
    ) -> None:
        self.findings.append(Finding(rule, severity, message, location, offset))

    def problem(self, kind: str, message: str, location: str, offset: int | None = None) -> None:
        self.problems.append(Problem(kind, message, location, offset))

    def label(self, fmt: str) -> None:
        if fmt not in self.formats:
            self.formats.append(fmt)

    def account_expansion(
        self, produced: int, consumed: int, location: str, *, stream_total: int = 0
    ) -> None:
        """Charge `produced` new bytes of a stream that has now expanded `stream_total` bytes from
        `consumed` compressed ones against the file's limits: decompression bombs end here."""
        limits = self.limits
        stream_total = max(stream_total, produced)
        if self.expanded + produced > limits.max_expanded_bytes:
            raise LimitExceeded(
                f"{location}: expands past {limits.max_expanded_bytes} bytes (possible decompression bomb)",
                hint="raise --max-expanded-bytes if this archive is genuine",
            )
        if stream_total > limits.ratio_floor and stream_total > limits.max_ratio * max(consumed, 1):
            raise LimitExceeded(
                f"{location}: compression ratio above {limits.max_ratio:.0f}:1 (possible decompression bomb)",
                hint="raise --max-ratio if this archive is genuine",
            )
        self.expanded += produced

    @property
    def spill_dir(self) -> Path:
        if self._workdir is None:
            import tempfile  # only scans that spill decompressed data need it

            self._workdir = tempfile.TemporaryDirectory(prefix="trainguard-")
        return Path(self._workdir.name)

    def account_spill(self, size: int, location: str) -> None:
        """Refuse to write `size` more bytes to the spill folder if that would leave its disk with
        less than `limits.spill_reserve` free: a scan never fills the disk, whatever a file expands to."""
        self.spilled += size
        if self.spilled < self._spill_checked + _SPILL_CHECK_EVERY and self._spill_checked:
            return
        self._spill_checked = self.spilled
        import shutil

        free = shutil.disk_usage(self.spill_dir).free
        if free - _SPILL_CHECK_EVERY < self.limits.spill_reserve:
            raise LimitExceeded(
                f"{location}: decompressed data would leave under {self.limits.spill_reserve} bytes free on"
                f" {self.spill_dir.parent} ({self.spilled} bytes written there so far)",
                hint="set TMPDIR to a folder with more room, or lower --max-expanded-bytes",
            )

    def spill_file(self) -> tempfile._TemporaryFileWrapper[bytes]:
        import tempfile

        handle = tempfile.NamedTemporaryFile(dir=self.spill_dir, prefix="member-", delete=True)  # noqa: SIM115 - closed in close()
        self._spills.append((handle, None))
        return handle

    def map_file(self, handle: tempfile._TemporaryFileWrapper[bytes]) -> Data:
        handle.flush()
        size = handle.seek(0, 2)
        if size == 0:
            return b""
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._spills.append((handle, mapped))
        return mapped

    def close(self) -> None:
        for handle, mapped in self._spills:
            if mapped is not None:
                mapped.close()
            close = getattr(handle, "close", None)
            if close is not None:
                close()
        self._spills.clear()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
