"""Signature files: sign a checkpoint's manifest, and verify one against the files on disk.

A signature file is JSON::

    {"format": "trainguard-signature", "version": 1, "manifest": {...},
     "signatures": [{"alg": "ed25519", "key_id": "sha256:...", "sig": "<base64>"}]}

Each signature is over ``SIGNED_PREFIX + manifest.canonical()``; the prefix keeps a manifest signature
from being valid as any other kind of message signed with the same key. Verification uses only
signatures whose key id is in the caller's trust list, then re-walks and re-hashes the tree and reports
every difference by name. `verify_path` is `read_signature_file`, `choose_signer` and `verify_tree` in
turn; `sign_path` is `build_manifest` and `sign_manifest`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import rfc8785

from trainguard._durable import sync_folder
from trainguard._strictjson import loads_strict
from trainguard.errors import PolicyError, UsageError, VerificationFailed
from trainguard.provenance._keys import ALGORITHMS, PrivateKey, PublicKey
from trainguard.provenance._manifest import (
    DEFAULT_SHARD_SIZE,
    DigestCache,
    FileEntry,
    Manifest,
    TreeDiff,
    build_manifest,
    diff_manifests,
    manifest_of_tree,
)
from trainguard.provenance._tree import signature_path, walk

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "FORMAT",
    "MAX_SIGNATURE_BYTES",
    "SIGNED_PREFIX",
    "SignResult",
    "Signature",
    "SignatureFile",
    "TreeChanged",
    "VerifyResult",
    "choose_signer",
    "load_trust_policy",
    "read_signature_bytes",
    "read_signature_file",
    "sign_manifest",
    "sign_path",
    "signed_message",
    "verify_path",
    "verify_tree",
]

FORMAT = "trainguard-signature"
SIGNATURE_VERSION = 1
SIGNED_PREFIX = b"trainguard/manifest/v1\n"
MAX_SIGNATURE_BYTES = 64 << 20
MAX_SIGNATURES = 64
_MAX_SIG_BYTES = 512  # Ed25519: 64, DER ECDSA P-256: at most 72
_MAX_POLICY_BYTES = 1 << 20

Progress = Callable[[int, int], None]


def signed_message(manifest: Manifest) -> bytes:
    """The bytes a signature covers."""
    return SIGNED_PREFIX + manifest.canonical()


def _b64decode_strict(text: str) -> bytes:
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("not valid base64") from None
    if base64.b64encode(data).decode("ascii") != text:
        raise ValueError("not canonical base64")
    return data


@dataclasses.dataclass(frozen=True)
class Signature:
    """One signature: the signer's algorithm and key id, and the signature bytes."""

    alg: str
    key_id: str
    sig: bytes

    def to_json(self) -> dict[str, Any]:
        return {"alg": self.alg, "key_id": self.key_id, "sig": base64.b64encode(self.sig).decode("ascii")}


@dataclasses.dataclass(frozen=True)
class SignatureFile:
    """A manifest and the signatures over it."""

    manifest: Manifest
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": SIGNATURE_VERSION,
            "manifest": self.manifest.to_json(),
            "signatures": [sig.to_json() for sig in self.signatures],
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON and a newline: the same signatures give the same bytes."""
        return rfc8785.dumps(self.to_json()) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> SignatureFile:
        """Parse a signature file strictly; VerificationFailed naming `where` for any defect."""

        def bad(what: str) -> VerificationFailed:
            return VerificationFailed(f"{where}: not a valid signature file: {what}")

        if len(data) > MAX_SIGNATURE_BYTES:
            raise bad(f"larger than {MAX_SIGNATURE_BYTES} bytes")
        try:
            doc = loads_strict(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise bad(f"not JSON ({exc})") from None
        if type(doc) is not dict or set(doc) != {"format", "version", "manifest", "signatures"}:
            raise bad("expected exactly the keys format, version, manifest, signatures")
        if doc["format"] != FORMAT:
            raise bad(f"format is {doc['format']!r}, expected {FORMAT!r}")
        if type(doc["version"]) is not int or doc["version"] != SIGNATURE_VERSION:
            raise bad(f"unsupported version {doc['version']!r}")
        try:
            manifest = Manifest.from_json(doc["manifest"])
        except VerificationFailed as exc:
            raise bad(exc.message) from None
        raw = doc["signatures"]
        if type(raw) is not list or not raw:
            raise bad("signatures must be a non-empty array")
        if len(raw) > MAX_SIGNATURES:
            raise bad(f"more than {MAX_SIGNATURES} signatures")
        signatures = []
        for i, item in enumerate(raw):
            if type(item) is not dict or set(item) != {"alg", "key_id", "sig"}:
                raise bad(f"signatures[{i}] must have exactly alg, key_id, sig")
            alg, key_id, sig = item["alg"], item["key_id"], item["sig"]
            if alg not in ALGORITHMS:
                raise bad(f"signatures[{i}].alg {alg!r} is not one of {list(ALGORITHMS)}")
            if type(key_id) is not str or not key_id.startswith("sha256:") or len(key_id) != 39:
                raise bad(f"signatures[{i}].key_id is not a key id")
            if type(sig) is not str or len(sig) > _MAX_SIG_BYTES:
                raise bad(f"signatures[{i}].sig is not a base64 string")
            try:
                raw_sig = _b64decode_strict(sig)
            except ValueError as exc:
                raise bad(f"signatures[{i}].sig is {exc}") from None
            signatures.append(Signature(alg, key_id, raw_sig))
        return cls(manifest, tuple(signatures))


def read_signature_file(path: Path) -> SignatureFile:
    """Read and parse a signature file, bounded; VerificationFailed if missing or malformed."""
    return SignatureFile.from_bytes(read_signature_bytes(path), str(path))


def read_signature_bytes(path: Path) -> bytes:
    """The bytes of a signature file, unparsed: at most MAX_SIGNATURE_BYTES + 1 of them (more is then
    refused by `SignatureFile.from_bytes`); VerificationFailed if it is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VerificationFailed(
            f"not signed: {path} does not exist", hint="sign it with: trainguard sign PATH"
        ) from None
    except OSError as exc:
        raise VerificationFailed(f"cannot open signature file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise VerificationFailed(f"signature file {path} is not a regular file")
        return handle.read(MAX_SIGNATURE_BYTES + 1)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and os.replace (mode 0644)."""
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UsageError(f"cannot write signature file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(fd)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(directory)  # the rename itself survives a crash


@dataclasses.dataclass(frozen=True)
class SignResult:
    """What `sign_path` or `sign_manifest` signed and where the signature went."""

    path: Path
    manifest: Manifest
    root: str
    key_id: str
    signature_path: Path

    @property
    def sig_path(self) -> Path:
        return self.signature_path


def sign_path(
    path: Path,
    key: PrivateKey,
    *,
    out: Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    progress: Progress | None = None,
    digest_cache: DigestCache | None = None,
) -> SignResult:
    """Hash `path`, sign its manifest and write the signature file atomically.

    Signatures by other keys over the very same manifest, already in the file, are kept: several keys
    can sign one checkpoint. Any other old signature file is replaced.
    """
    path = Path(path)
    sig_file = Path(out) if out is not None else signature_path(path)
    manifest = build_manifest(
        path,
        shard_size=shard_size,
        workers=workers,
        progress=progress,
        digest_cache=digest_cache,
        exclude=(sig_file,),
    )
    return sign_manifest(path, manifest, key, out=sig_file)


def sign_manifest(path: Path, manifest: Manifest, key: PrivateKey, *, out: Path | None = None) -> SignResult:
    """Sign `manifest`, the manifest of `path` hashed by the caller, and write the signature file (`out`,
    else the signature path of `path`) atomically.

    Signatures by other keys over the very same manifest, already in the file, are kept: several keys
    can sign one checkpoint. Any other old signature file is replaced.
    """
    path = Path(path)
    sig_file = Path(out) if out is not None else signature_path(path)
    signature = Signature(key.alg, key.key_id, key.sign(signed_message(manifest)))
    kept: list[Signature] = []
    try:
        old = read_signature_file(sig_file)
    except VerificationFailed:
        old = None
    if old is not None and old.manifest == manifest:
        kept = [sig for sig in old.signatures if sig.key_id != key.key_id][: MAX_SIGNATURES - 1]
    document = SignatureFile(manifest, (*kept, signature))
    _write_atomic(sig_file, document.to_bytes())
    return SignResult(path, manifest, manifest.root, key.key_id, sig_file)


class TreeChanged(VerificationFailed):
    """The files on disk differ from the signed manifest; `result` holds the diff and the signer."""

    def __init__(self, message: str, result: VerifyResult, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result
        self.diff = result.diff


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """A verification: the signed manifest, the trusted key that signed it, and how the tree differs."""

    path: Path
    manifest: Manifest
    signer: PublicKey
    diff: TreeDiff
    root: str

    @property
    def ok(self) -> bool:
        return self.diff.ok


def choose_signer(document: SignatureFile, trusted: Sequence[PublicKey], where: str) -> PublicKey:
    """The first trusted key with a valid signature in `document`; VerificationFailed naming the signers
    if no trusted key signed it or no trusted signature is valid. `where` names the file in messages."""
    by_id: dict[str, PublicKey] = {}
    for key in trusted:
        by_id.setdefault(key.key_id, key)
    message = signed_message(document.manifest)
    candidates = [(sig, by_id[sig.key_id]) for sig in document.signatures if sig.key_id in by_id]
    if not candidates:
        found = ", ".join(sig.key_id for sig in document.signatures)
        allowed = ", ".join(key.label for key in trusted)
        raise VerificationFailed(
            f"{where} is signed, but by no trusted key: signed by {found}; trusted: {allowed}",
            hint="trust the signer's public key with --trust KEY if you know it is right",
        )
    for sig, key in candidates:
        if sig.alg == key.alg and key.verify(message, sig.sig):
            return key
    names = ", ".join(key.label for _, key in candidates)
    raise VerificationFailed(
        f"{where}: invalid signature by {names}: the signature file or the manifest in it was altered"
    )


def verify_path(
    path: Path,
    trusted: Sequence[PublicKey],
    *,
    signature: Path | None = None,
    full: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
    digest_cache: DigestCache | None = None,
) -> VerifyResult:
    """Verify `path` against its signature file with the `trusted` keys.

    Raises VerificationFailed if no trusted key signed it or the signature is invalid, TreeChanged (a
    VerificationFailed) listing every difference by name if the files differ, UnsafeTree for an unsafe
    tree. With `full` false, files the `digest_cache` recognises are not re-hashed; with `full` true
    every file is hashed and the cache is refreshed.
    """
    if not trusted:
        raise UsageError("no trusted keys: pass --trust KEY or a policy file")
    path = Path(path)
    sig_file = Path(signature) if signature is not None else signature_path(path)
    document = read_signature_file(sig_file)
    signer = choose_signer(document, trusted, str(sig_file))
    return verify_tree(
        path,
        document.manifest,
        signer,
        signature=sig_file,
        full=full,
        workers=workers,
        progress=progress,
        digest_cache=digest_cache,
    )


def verify_tree(
    path: Path,
    signed: Manifest,
    signer: PublicKey,
    *,
    signature: Path,
    full: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
    digest_cache: DigestCache | None = None,
    defer: Collection[str] = (),
) -> VerifyResult:
    """Compare the files of `path` with `signed`, a manifest whose signature by `signer` was already
    checked; `signature` is the signature file, left out of the walk. Raises as `verify_path` does.

    The files named in `defer` (manifest paths) are walked and their size, mode and place compared, but
    their content is not read: the caller checks the bytes it reads itself, and the result holds for
    those files only once it has.
    """
    path = Path(path)
    is_dir = path.is_dir()
    if is_dir != (signed.kind == "directory"):
        raise VerificationFailed(
            f"{path} is a {'directory' if is_dir else 'file'}, but the signature is for a {signed.kind}"
        )
    if defer:
        actual = _manifest_deferring(path, signed, signature, defer, workers, progress, digest_cache, full)
    else:
        actual = build_manifest(
            path,
            shard_size=signed.shard_size,
            workers=workers,
            progress=progress,
            digest_cache=digest_cache,
            exclude=(signature,),
            refresh_cache=full,
        )
    diff = diff_manifests(signed, actual)
    result = VerifyResult(path, signed, signer, diff, signed.root)
    if not diff.ok:
        lines = diff.describe()
        count = f"{len(lines)} difference{'s' if len(lines) != 1 else ''}"
        raise TreeChanged(
            f"{path} does not match its signature by {signer.label} ({count}):\n  " + "\n  ".join(lines),
            result,
            hint=_renamed_hint(path, diff),
        )
    return result


def _renamed_hint(path: Path, diff: TreeDiff) -> str | None:
    if diff.name_changed is None:
        return None
    if path.is_symlink():
        return f"{path} is a symlink: verify the directory it points to under its own name"
    return f"if {path} was renamed on purpose, re-sign it under its new name: trainguard sign {path}"


def _manifest_deferring(
    path: Path,
    signed: Manifest,
    signature: Path,
    defer: Collection[str],
    workers: int | None,
    progress: Progress | None,
    digest_cache: DigestCache | None,
    full: bool,
) -> Manifest:
    """The manifest of `path` with the signed digests standing in for the files in `defer`, which are not
    read; their size and mode are those on disk, so a change to either still shows in the diff."""
    expected = {entry.path: entry for entry in signed.files if entry.path in defer}
    tree = walk(path, exclude=(signature,))
    stand_ins: dict[str, FileEntry] = {}
    for item in tree.files:
        entry = expected.get(item.path)
        if entry is not None:
            mode = item.st.st_mode & 0o7777
            stand_ins[item.path] = FileEntry(item.path, item.st.st_size, mode, entry.digest, entry.shards)
    rest = dataclasses.replace(tree, files=tuple(item for item in tree.files if item.path not in stand_ins))
    hashed = manifest_of_tree(
        rest,
        shard_size=signed.shard_size,
        workers=workers,
        progress=progress,
        digest_cache=digest_cache,
        refresh_cache=full,
    )
    found = {entry.path: entry for entry in hashed.files} | stand_ins
    files = tuple(found[item.path] for item in tree.files)
    return dataclasses.replace(hashed, files=files)


def load_trust_policy(path: Path) -> list[PublicKey]:
    """Trusted keys from a TOML policy: ``[[trust.key]]`` with ``name`` and ``path`` (relative to the
    policy file) or ``pem``. PolicyError for anything else; a policy with no keys is an error too."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"cannot read trust policy {path}: {exc.strerror}") from None
    if len(data) > _MAX_POLICY_BYTES:
        raise PolicyError(f"trust policy {path} is larger than {_MAX_POLICY_BYTES} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"trust policy {path} is not valid TOML: {exc}") from None
    trust = doc.get("trust")
    entries = trust.get("key") if isinstance(trust, dict) else None
    if not isinstance(entries, list) or not entries:
        raise PolicyError(
            f"trust policy {path} lists no keys", hint='add [[trust.key]] name = "..." path = "..."'
        )
    keys: list[PublicKey] = []
    for i, entry in enumerate(entries):
        where = f"{path}: trust.key[{i}]"
        if not isinstance(entry, dict) or not set(entry) <= {"name", "path", "pem"}:
            raise PolicyError(f"{where} must be a table with name and path or pem")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise PolicyError(f"{where} needs a non-empty name")
        if ("path" in entry) == ("pem" in entry):
            raise PolicyError(f"{where} ({name}) needs exactly one of path and pem")
        try:
            if "path" in entry:
                if not isinstance(entry["path"], str):
                    raise PolicyError(f"{where} ({name}): path must be a string")
                keys.append(PublicKey.load(path.parent / entry["path"], name=name))
            else:
                if not isinstance(entry["pem"], str):
                    raise PolicyError(f"{where} ({name}): pem must be a string")
                keys.append(PublicKey.from_pem(entry["pem"].encode("ascii", "replace"), name=name))
        except PolicyError:
            raise
        except UsageError as exc:
            raise PolicyError(f"{where} ({name}): {exc.message}", hint=exc.hint) from None
    return keys
