"""`trainguard ckpt audit`: what the ledger says was signed, against what is on disk.

For every ``provenance.sign`` event whose path lies under one of the audited folders (the latest event per
path counts), the checkpoint is re-verified:

- ``missing``: the path no longer exists (deleted);
- ``altered``: its files differ from the signed manifest, its signature file was removed or replaced, or
  the signature file's root is not the root the ledger recorded (re-signed outside `trainguard sign`);
- ``ok``: the files match what the ledger recorded as signed;
- ``undecided``: it could not be read.

Then every checkpoint under the folders that the ledger never saw signed is ``unsigned``: a directory
holding a ``.trainguard.sig``, or checkpoint files (*.pt, *.pth, *.bin, *.safetensors, *.ckpt), reported by
directory when nothing in the directory was signed, else file by file.

With trusted keys, the signatures are verified too. Without them the ledger is the reference: the
signature file's manifest must have the root the ledger recorded, and the files must match it. The audit
trusts the ledger's entries; `trainguard ledger verify` checks those.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from trainguard.errors import ExitCode, TrainguardError, UsageError, VerificationFailed
from trainguard.gate._events import EVENT_SIGN
from trainguard.provenance import (
    SIGNATURE_NAME,
    DigestCache,
    PublicKey,
    TreeChanged,
    UnreadableTree,
    build_manifest,
    diff_manifests,
    read_signature_file,
    signature_path,
    verify_path,
)

__all__ = ["CHECKPOINT_SUFFIXES", "STATUSES", "AuditItem", "AuditReport", "audit"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
STATUSES = ("altered", "missing", "unsigned", "undecided", "ok")
_LABELS = {"missing": "missing (deleted)"}
_MAX_BUNDLE_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class AuditItem:
    """One checkpoint's verdict: `status` is one of STATUSES; `details` name files and reasons."""

    path: str
    status: str
    details: tuple[str, ...] = ()
    root: str | None = None
    signer: str | None = None
    index: int | None = None  # the ledger entry of the signing

    @property
    def label(self) -> str:
        return _LABELS.get(self.status, self.status)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "details": list(self.details),
            "root": self.root,
            "signer": self.signer,
            "ledger_index": self.index,
        }


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """Every checkpoint found, worst first."""

    items: tuple[AuditItem, ...]
    paths: tuple[str, ...]

    def count(self, status: str) -> int:
        return sum(1 for item in self.items if item.status == status)

    @property
    def ok(self) -> bool:
        return all(item.status == "ok" for item in self.items)

    @property
    def exit_code(self) -> ExitCode:
        if any(item.status in ("altered", "missing", "unsigned") for item in self.items):
            return ExitCode.FINDINGS
        if any(item.status == "undecided" for item in self.items):
            return ExitCode.UNDECIDED
        return ExitCode.CLEAN

    def summary(self) -> str:
        parts = [f"{self.count(status)} {_LABELS.get(status, status)}" for status in STATUSES]
        return f"{len(self.items)} checkpoints: " + ", ".join(parts)

    def to_text(self) -> str:
        lines = []
        for item in self.items:
            signer = f" (signed by {item.signer})" if item.signer else ""
            lines.append(f"{item.label.upper()}: {item.path}{signer}")
            lines.extend(f"  - {detail}" for detail in item.details)
        lines.append(self.summary())
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": "1",
            "ok": self.ok,
            "paths": list(self.paths),
            "counts": {status: self.count(status) for status in STATUSES},
            "checkpoints": [item.to_json() for item in self.items],
        }


@dataclasses.dataclass(frozen=True)
class _Signing:
    index: int
    path: str
    root: str
    signature: str | None
    fmt: str
    key_id: str | None


def _signings(events: Iterable[tuple[int, Any]], roots: Sequence[str]) -> dict[str, _Signing]:
    """The latest sign event per path under `roots`; malformed payloads are skipped."""
    latest: dict[str, _Signing] = {}
    for index, event in events:
        if event.type != EVENT_SIGN:
            continue
        payload = event.payload
        path, root = payload.get("path"), payload.get("root")
        if not isinstance(path, str) or not isinstance(root, str) or payload.get("ok") is False:
            continue
        if not any(_under(path, top) for top in roots):
            continue
        signature = payload.get("signature")
        key_id = payload.get("key_id")
        fmt = payload.get("format")
        latest[path] = _Signing(
            index,
            path,
            root,
            signature if isinstance(signature, str) else None,
            fmt if isinstance(fmt, str) else "trainguard",
            key_id if isinstance(key_id, str) else None,
        )
    return latest


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


@dataclasses.dataclass(frozen=True)
class _Found:
    """What re-verifying one signing found: the signature's root, its signer if known, and differences."""

    root: str
    signer: str | None
    differences: tuple[str, ...] = ()


def _check(
    signing: _Signing,
    trusted: Sequence[PublicKey],
    full: bool,
    digest_cache: DigestCache | None,
    workers: int | None,
) -> AuditItem:
    path = Path(signing.path)
    if not os.path.lexists(path):
        return AuditItem(
            signing.path, "missing", ("deleted since it was signed",), signing.root, None, signing.index
        )
    sig_file = Path(signing.signature) if signing.signature else signature_path(path)
    try:
        if signing.fmt == "oms":
            found = _check_oms(path, sig_file, trusted, full, digest_cache, workers)
        elif trusted:
            result = verify_path(
                path, trusted, signature=sig_file, full=full, workers=workers, digest_cache=digest_cache
            )
            found = _Found(result.root, result.signer.label)
        else:
            found = _check_against_ledger(path, sig_file, full, digest_cache, workers)
    except TreeChanged as exc:
        found = _Found(exc.result.root, exc.result.signer.label, tuple(exc.diff.describe()))
    except TrainguardError as exc:
        status = (
            "undecided"
            if isinstance(exc, UnreadableTree) or not isinstance(exc, VerificationFailed)
            else "altered"
        )
        return AuditItem(signing.path, status, (exc.message,), signing.root, None, signing.index)
    details = list(found.differences)
    if found.root != signing.root:
        details.append(
            f"the signature file {sig_file} has root {found.root}, but the ledger recorded {signing.root} "
            "(re-signed without the ledger?)"
        )
    status = "altered" if details else "ok"
    return AuditItem(signing.path, status, tuple(details), signing.root, found.signer, signing.index)


def _check_against_ledger(
    path: Path, sig_file: Path, full: bool, digest_cache: DigestCache | None, workers: int | None
) -> _Found:
    """Without trusted keys: compare the files with the manifest in the signature file, whose root the
    caller compares with the one the ledger recorded."""
    document = read_signature_file(sig_file)
    signed = document.manifest
    actual = build_manifest(
        path,
        shard_size=signed.shard_size,
        workers=workers,
        digest_cache=digest_cache,
        exclude=(sig_file,),
        refresh_cache=full,
    )
    return _Found(signed.root, None, tuple(diff_manifests(signed, actual).describe()))


def _check_oms(
    path: Path,
    sig_file: Path,
    trusted: Sequence[PublicKey],
    full: bool,
    digest_cache: DigestCache | None,
    workers: int | None,
) -> _Found:
    from trainguard.provenance._oms import verify_oms_bundle

    if not trusted:
        raise UsageError("an OMS bundle can only be checked with trusted keys: pass --trust KEY")
    try:
        with sig_file.open("rb") as handle:
            bundle = handle.read(_MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        raise VerificationFailed(f"cannot read the OMS bundle {sig_file}: {exc.strerror}") from None
    result = verify_oms_bundle(
        path,
        bundle,
        trusted,
        where=str(sig_file),
        signature=sig_file,
        workers=workers,
        digest_cache=digest_cache,
        full=full,
    )
    return _Found(result.root, result.signer.label)


def _looks_like_checkpoint(name: str) -> bool:
    return name.endswith(CHECKPOINT_SUFFIXES)


def _unsigned(top: Path, signed: dict[str, _Signing], shown_roots: set[str]) -> list[AuditItem]:
    """Checkpoints under `top` that no sign event covers."""
    found: list[AuditItem] = []
    covered = set(signed)
    for current, dirs, files in os.walk(top):
        here = os.path.realpath(current)
        if here in covered or any(_under(here, path) for path in covered):
            dirs[:] = []
            continue
        if SIGNATURE_NAME in files:
            found.append(
                AuditItem(
                    here, "unsigned", ("has a signature file, but the ledger records no signing of it",)
                )
            )
            dirs[:] = []
            continue
        dirs.sort()
        candidates = []
        signed_here = False
        for name in sorted(files):
            location = os.path.join(here, name)  # noqa: PTH118 - compared as strings with the ledger's
            if location in covered:
                signed_here = True
            elif _looks_like_checkpoint(name) and _is_regular(location):
                candidates.append(location)
        if not candidates:
            continue
        if not signed_here and here not in shown_roots:
            names = ", ".join(Path(c).name for c in candidates[:5])
            more = f" and {len(candidates) - 5} more" if len(candidates) > 5 else ""
            found.append(AuditItem(here, "unsigned", (f"checkpoint files never signed: {names}{more}",)))
        else:
            found.extend(AuditItem(c, "unsigned", ("never signed",)) for c in candidates)
    return found


def _is_regular(location: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(location).st_mode)
    except OSError:
        return False


def audit(
    paths: Sequence[Path],
    ledger: Any,
    trusted: Sequence[PublicKey] = (),
    *,
    full: bool = False,
    digest_cache: DigestCache | None = None,
    workers: int | None = None,
) -> AuditReport:
    """Audit the checkpoints under `paths` against the sign events of `ledger` (a Ledger, or None for an
    empty one). UsageError if a path is not a directory."""
    roots: list[str] = []
    for path in paths:
        if not Path(path).is_dir():
            raise UsageError(f"{path} is not a directory", hint="give the folders that hold checkpoints")
        roots.append(os.path.realpath(path))
    events = ledger.entries() if ledger is not None else ()
    signed = _signings(events, roots)
    items = [_check(signed[p], trusted, full, digest_cache, workers) for p in sorted(signed)]
    seen = {item.path for item in items}
    for top in dict.fromkeys(roots):
        items.extend(item for item in _unsigned(Path(top), signed, set(roots)) if item.path not in seen)
        seen.update(item.path for item in items)
    order = {status: rank for rank, status in enumerate(STATUSES)}
    items.sort(key=lambda item: (order[item.status], item.path))
    return AuditReport(tuple(items), tuple(roots))
