"""What `trainguard sign`, `trainguard verify`, `trainguard ckpt audit` and `trainguard keygen --pem` do.

Exit codes: 0 signed or verified, 1 verification failed (every difference is named, and the signer when
known), 2 usage error, 3 could not decide (files that cannot be read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard._cli_common import (
    default_signing_key,
    human_size,
    load_signing_key,
    progress_line,
    trusted_keys,
    write_atomic,
)
from trainguard.errors import (
    ExitCode,
    KeyFileError,
    TrainguardError,
    UsageError,
    VerificationFailed,
)
from trainguard.gate._cache import VerifyCache
from trainguard.gate._events import EVENT_SIGN, EVENT_VERIFY, provenance_payload, record
from trainguard.provenance import (
    DEFAULT_SHARD_SIZE,
    Manifest,
    PrivateKey,
    PublicKey,
    TreeChanged,
    UnreadableTree,
    VerifyResult,
    build_manifest,
    read_signature_bytes,
    sign_path,
    signature_path,
    verify_path,
)

if TYPE_CHECKING:
    from trainguard.gate._audit import AuditReport

__all__ = ["cmd_ckpt_audit", "cmd_keygen_pem", "cmd_sign", "cmd_verify", "default_signing_key"]


def _cache() -> VerifyCache | None:
    """The verification cache, or None (with a warning) if it cannot be opened: then all is hashed."""
    from trainguard.ledger._ledger import default_home

    try:
        return VerifyCache(default_home())
    except (TrainguardError, OSError) as exc:
        message = exc.diagnostics() if isinstance(exc, TrainguardError) else str(exc)
        print(f"trainguard: warning: verification cache not used: {message}", file=sys.stderr)
        return None


def _require_ledger(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "require_ledger", False))


# sign


def _sign_oms(
    path: Path,
    key: PrivateKey,
    out: Path,
    args: argparse.Namespace,
    progress: Callable[[int, int], None] | None,
    cache: VerifyCache | None,
) -> tuple[Manifest, str]:
    """Write an OMS bundle for `path`; returns the manifest hashed and the bundle's root."""
    from trainguard.provenance._oms import to_oms_bundle, verify_oms_bundle

    manifest = build_manifest(
        path,
        shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
        workers=args.jobs,
        progress=progress,
        digest_cache=cache.writer() if cache is not None else None,
        exclude=(out,),
    )
    bundle = to_oms_bundle(path, manifest, key, out=out)
    # Read back with the signer's key against the manifest just hashed: checks the bundle, gives its root.
    check = verify_oms_bundle(
        path, bundle, [key.public()], where=str(out), manifest_builder=lambda _: manifest
    )
    write_atomic(out, bundle)
    return manifest, check.root


def cmd_sign(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not os.path.lexists(path):
        raise UsageError(f"{path} does not exist")
    key = load_signing_key(args)
    progress = progress_line("hashing")
    cache = _cache()
    fmt = args.format or "trainguard"
    try:
        if fmt == "oms":
            out = Path(args.out) if args.out is not None else signature_path(path)
            manifest, root = _sign_oms(path, key, out, args, progress, cache)
        else:
            result = sign_path(
                path,
                key,
                out=args.out,
                shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
                workers=args.jobs,
                progress=progress,
                digest_cache=cache.writer() if cache is not None else None,
            )
            manifest, root, out = result.manifest, result.root, result.signature_path
    finally:
        if progress is not None:
            progress.clear()
        if cache is not None:
            cache.close()
    if not args.no_ledger:
        payload = provenance_payload(
            path,
            root=root,
            kind=manifest.kind,
            files=len(manifest.files),
            size=manifest.total_bytes,
            key_id=key.key_id,
            ok=True,
            signature=out,
            fmt=fmt,
        )
        record(EVENT_SIGN, payload, require=_require_ledger(args))
    print(
        f"signed {path}: {len(manifest.files)} files, {human_size(manifest.total_bytes)}, root {root}, "
        f"key {key.key_id} ({key.alg}) -> {out}"
    )
    return int(ExitCode.CLEAN)


# verify


def _read_signature_bytes(path: Path) -> bytes | None:
    # The provenance reader: bounded, and it refuses a FIFO or a device (a plain open would hang).
    try:
        return read_signature_bytes(path)
    except VerificationFailed:
        return None  # verify_path reports a missing or unreadable signature file in its own words


def _verify(
    args: argparse.Namespace, trusted: list[PublicKey], cache: VerifyCache | None
) -> tuple[VerifyResult, str]:
    path = Path(args.path)
    sig_file = Path(args.signature) if args.signature is not None else signature_path(path)
    progress = progress_line("verifying")
    try:
        data = _read_signature_bytes(sig_file)
        from trainguard.provenance._oms import is_oms_bundle, verify_oms_bundle

        if data is not None and is_oms_bundle(data):
            result = verify_oms_bundle(
                path,
                data,
                trusted,
                where=str(sig_file),
                signature=sig_file,
                progress=progress,
                digest_cache=cache,
                full=bool(args.full),
            )
            return result, "oms"
        result = verify_path(
            path, trusted, signature=sig_file, full=bool(args.full), progress=progress, digest_cache=cache
        )
        return result, "trainguard"
    finally:
        if progress is not None:
            progress.clear()


def _verify_text(ok: bool, path: Path, result: VerifyResult | None, problems: list[str], message: str) -> str:
    if ok and result is not None:
        manifest = result.manifest
        return (
            f"verified {path}: signed by {result.signer.label}; {len(manifest.files)} files, "
            f"{human_size(manifest.total_bytes)}, root {result.root}\n"
        )
    lines = [f"VERIFICATION FAILED: {path}"]
    if result is not None:
        lines.append(f"  signed by {result.signer.label}")
    if problems:
        lines.extend(f"  - {problem}" for problem in problems)
    else:
        lines.extend(f"  {line}" for line in message.splitlines())
    return "\n".join(lines) + "\n"


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    trusted = trusted_keys(args, required=True)
    cache = None if args.full else _cache()
    result: VerifyResult | None = None
    problems: list[str] = []
    message = ""
    fmt = "trainguard"
    hint: str | None = None
    undecided: UnreadableTree | None = None
    try:
        result, fmt = _verify(args, trusted, cache)
    except TreeChanged as exc:
        result, problems, message = exc.result, exc.diff.describe(), exc.message
    except UnreadableTree as exc:
        # Exit 3 once recorded: nothing is known about the files, and that is an outcome too.
        undecided, message = exc, f"undecided: {exc.message}"
    except VerificationFailed as exc:
        message, hint = exc.message, exc.hint
    finally:
        stats = cache.stats() if cache is not None else None
        if cache is not None:
            cache.close()
    ok = result is not None and not problems and not message
    if not args.no_ledger:
        manifest = result.manifest if result is not None else None
        payload = provenance_payload(
            path,
            root=result.root if result is not None else None,
            kind=manifest.kind if manifest is not None else None,
            files=len(manifest.files) if manifest is not None else 0,
            size=manifest.total_bytes if manifest is not None else 0,
            key_id=result.signer.key_id if result is not None else None,
            ok=ok,
            problems=problems or ([message] if message else []),
            signature=Path(args.signature) if args.signature is not None else signature_path(path),
            fmt=fmt,
        )
        record(EVENT_VERIFY, payload, require=_require_ledger(args))
    if undecided is not None:
        raise undecided
    if args.format == "json":
        document: dict[str, Any] = {
            "schema_version": "1",
            "ok": ok,
            "path": str(path),
            "format": fmt,
            "root": result.root if result is not None else None,
            "signer": (
                {"name": result.signer.name, "key_id": result.signer.key_id, "alg": result.signer.alg}
                if result is not None
                else None
            ),
            "files": len(result.manifest.files) if result is not None else None,
            "bytes": result.manifest.total_bytes if result is not None else None,
            "problems": problems or ([message] if message else []),
            "cache": stats,
        }
        print(json.dumps(document, indent=2))
    else:
        sys.stdout.write(_verify_text(ok, path, result, problems, message))
        if hint and not ok:
            print(f"  hint: {hint}", file=sys.stderr)
    return int(ExitCode.CLEAN if ok else ExitCode.FINDINGS)


# ckpt audit


def cmd_ckpt_audit(args: argparse.Namespace) -> int:
    from trainguard.gate._audit import audit
    from trainguard.ledger._ledger import Ledger, default_location

    trusted = trusted_keys(args, required=False)
    location = os.environ.get("TRAINGUARD_LEDGER") or None
    cache = _cache()
    try:
        if location is None and not default_location().exists():
            # No ledger yet: nothing was ever signed with it; do not create one just to read it.
            report: AuditReport = audit(args.paths, None, trusted, digest_cache=cache)
        else:
            with Ledger.open(location) as ledger:
                report = audit(args.paths, ledger, trusted, digest_cache=cache)
    finally:
        if cache is not None:
            cache.close()
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        sys.stdout.write(report.to_text())
    return int(report.exit_code)


# keygen --pem


def cmd_keygen_pem(args: argparse.Namespace) -> int:
    out = Path(args.out)
    public_path = out.with_name(out.name + ".pub")
    if out.exists() or public_path.exists():
        existing = out if out.exists() else public_path
        raise KeyFileError(f"{existing} already exists; keys are never overwritten")
    try:
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create {out.parent}: {exc.strerror}") from None
    key = PrivateKey.generate(args.alg)
    key.save(out)
    key.public().save(public_path)
    print(key.key_id)
    print(
        f"private key: {out} (mode 0600); public key: {public_path} ({key.alg}); "
        f"trust it with: trainguard verify --trust {public_path} PATH",
        file=sys.stderr,
    )
    return int(ExitCode.CLEAN)
