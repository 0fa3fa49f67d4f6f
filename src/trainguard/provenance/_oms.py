"""OpenSSF Model Signing (OMS) v1.0 bundles, as `model_signing` 1.1.1 writes and reads them with a key.

A bundle is Sigstore bundle JSON (mediaType ``application/vnd.dev.sigstore.bundle.v0.3+json``) whose
``verificationMaterial.publicKey.hint`` is ``hex(SHA-256(PEM SubjectPublicKeyInfo))`` and whose
``dsseEnvelope`` holds one ECDSA signature over the DSSE PAE of an in-toto Statement v1::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "<basename of the model>", "digest": {"sha256": "<root>"}}],
     "predicateType": "https://model_signing/signature/v1.0",
     "predicate": {"serialization": {"method": "files", "hash_type": "sha256",
                                     "allow_symlinks": false, "ignore_paths": [...]},
                   "resources": [{"name": "dir/file", "algorithm": "sha256", "digest": "<hex>"}, ...]}}

Resources are sorted by path components (``PurePosixPath`` order); a single-file model has one resource
named ``"."``. Their default ("files", SHA-256 of each whole file) is exactly the whole-file digest our
manifest already holds, so a bundle is made without reading the files again.

What model_signing 1.1.1 leaves open, read from its code (``_signing/signing.py``, ``verifying.py``,
``_serialization/file.py``), and how this module and the trainguard format differ:

- The subject digest (the "root") is SHA-256 over the concatenated raw 32-byte resource digests, in
  resource order, and nothing else: no names, sizes, algorithms or serialization parameters. Renaming
  files in a way that keeps their sort order (``model.safetensors`` -> ``model.bin``) keeps the root,
  so the root alone does not identify a model's layout. The ECDSA signature does cover the names (it is
  over the whole statement); our root (`Manifest.root`) covers names, sizes, modes and links itself.
- Duplicate resource names are accepted: their manifest is a dict, so the last digest wins while the
  root still hashes both. We refuse duplicates.
- Resource names are not checked: ``../x`` or absolute names reach ``model_path / name`` when
  verifying with ``--ignore_unsigned_files``. We refuse any name that is not a safe relative path.
- ``ignore_paths`` is chosen by the signer and honoured by the verifier; their CLI also ignores the
  top-level ``.git``, ``.gitattributes``, ``.github`` and ``.gitignore`` whatever the statement says,
  so files added there pass their verification. We ignore exactly the paths the signed statement
  lists, and nothing else.
- No sizes, no file modes (an executable bit is not signed), no symlinks (refused by default; with
  ``allow_symlinks`` they are followed, out of the tree too, and hashed as their targets).
- The subject name is "only informative" and never compared (we compare a directory's name with it,
  so a copy of another signed directory put in its place fails); the statement's key order comes
  from a protobuf Struct and ``ignore_paths`` from a frozenset, so the same model signs to different
  bytes.
- On a bad signature the verifier retries with the pre-1.0 PAE (``DSSEV1 ... b'...'``, a Python bytes
  repr) and accepts the v0.1 predicate, which has no root and no serialization. We accept neither.
- Only ``signatures[0]`` is checked; the signature file is read and parsed without a size bound.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from trainguard._strictjson import loads_strict
from trainguard.errors import UnsupportedFormat, UsageError, VerificationFailed
from trainguard.provenance._keys import ALG_ECDSA_P256, PrivateKey, PublicKey
from trainguard.provenance._manifest import (
    DigestCache,
    FileEntry,
    Manifest,
    build_manifest,
    diff_manifests,
)
from trainguard.provenance._signature import TreeChanged, VerifyResult
from trainguard.provenance._tree import SIGNATURE_NAME, path_problem

__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "MAX_BUNDLE_BYTES",
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "is_oms_bundle",
    "oms_key_hint",
    "to_oms_bundle",
    "verify_oms_bundle",
]

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
_PREDICATE_TYPE_V01 = "https://model_signing/Digests/v0.1"
# What `model_signing sign key` ignores by default: only at the top of the model directory.
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")

MAX_BUNDLE_BYTES = 64 << 20
MAX_RESOURCES = 1_000_000
MAX_IGNORE_PATHS = 10_000
_MAX_NAME_CHARS = 4096
_MAX_SIG_CHARS = 512  # a DER ECDSA P-256 signature is at most 72 bytes
_FILE_RESOURCE = "."
_HEX = frozenset("0123456789abcdef")

Progress = Callable[[int, int], None]


def oms_key_hint(key: PublicKey) -> str:
    """The ``publicKey.hint`` model_signing writes and checks: SHA-256 of the PEM text, in hex."""
    # Re-serialised through cryptography, the same call model_signing makes, so the bytes agree.
    pem = serialization.load_pem_public_key(key.pem()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _sort_key(name: str) -> list[str]:
    # model_signing sorts PurePosixPath keys, which compare by components: "a/b" before "a-c".
    return name.split("/")


def _root_digest(digests: Sequence[str]) -> str:
    hasher = hashlib.sha256()
    for digest in digests:
        hasher.update(bytes.fromhex(digest))
    return hasher.hexdigest()


def _ignored(name: str, ignore: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + "/") for p in ignore)


def _expand_links(manifest: Manifest) -> dict[str, str]:
    """Path -> digest with links to files read as their targets, as model_signing reads followed links.

    Links to directories are left out: whether model_signing descends into them depends on the Python
    version (``Path.glob("**")``), so neither side can sign them reproducibly.
    """
    files = {entry.path: entry.digest for entry in manifest.files}
    out = dict(files)
    for link in manifest.links:
        if link.target in files:
            out[link.path] = files[link.target]
    return out


def to_oms_bundle(
    path: Path,
    manifest: Manifest,
    key: PrivateKey,
    *,
    out: Path | None = None,
    allow_symlinks: bool = False,
) -> bytes:
    """The OMS bundle `model_signing sign key` would write for `path`, from `manifest`'s digests.

    `out` is where the bundle will be written; inside the model directory it is listed in
    ``ignore_paths``, as model_signing's CLI lists its ``--signature``. Our own ``.trainguard.sig``
    is listed too, since the manifest never holds it. Symlinks are refused as model_signing refuses
    them by default; `allow_symlinks` signs them as their targets' content (then
    ``model_signing verify`` needs ``--allow_symlinks``).
    """
    if key.alg != ALG_ECDSA_P256:
        raise UsageError(
            "OMS key signing in model_signing 1.1.1 supports only elliptic-curve keys: use --alg ecdsa-p256",
            hint="generate one with: trainguard keygen --pem --alg ecdsa-p256 FILE",
        )
    files = {entry.path for entry in manifest.files}
    for link in manifest.links:
        if not allow_symlinks:
            raise UsageError(
                f"{path}: symlink {link.path!r}: model_signing refuses symlinks by default",
                hint="replace the symlink with the file, or sign in the trainguard format",
            )
        if link.target not in files:
            raise UsageError(
                f"{path}: symlink {link.path!r} points at a directory, which OMS cannot sign reproducibly",
                hint="replace the symlink with the directory, or sign in the trainguard format",
            )
    if manifest.kind == "file":
        digests = {_FILE_RESOURCE: manifest.files[0].digest}
        ignore = list(GIT_PATHS)
    else:
        ignore = [*GIT_PATHS, SIGNATURE_NAME]
        if out is not None:
            try:
                rel = Path(os.path.realpath(out)).relative_to(os.path.realpath(path))
            except ValueError:
                rel = None
            if rel is not None and rel.parts:
                ignore.append(rel.as_posix())
        digests = {
            name: digest for name, digest in _expand_links(manifest).items() if not _ignored(name, ignore)
        }
        if not digests:
            raise UsageError(f"{path}: no files left to sign once {', '.join(ignore)} are left out")
    names = sorted(digests, key=_sort_key)
    resources = [{"name": name, "digest": digests[name], "algorithm": "sha256"} for name in names]
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": manifest.name, "digest": {"sha256": _root_digest([digests[n] for n in names])}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "allow_symlinks": allow_symlinks,
                "hash_type": "sha256",
                "ignore_paths": sorted(set(ignore)),
            },
            "resources": resources,
        },
    }
    # protobuf's MessageToJson layout: two-space indent, ASCII escapes.
    payload = json.dumps(statement, indent=2).encode("utf-8")
    signature = key.sign(_pae(PAYLOAD_TYPE, payload))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": oms_key_hint(key.public())}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(signature).decode("ascii"), "keyid": ""}],
        },
    }
    return json.dumps(bundle, separators=(",", ":")).encode("utf-8")


def is_oms_bundle(data: bytes) -> bool:
    """Whether `data` looks like a Sigstore bundle with a DSSE envelope (not whether it is valid)."""
    if len(data) > MAX_BUNDLE_BYTES or data.lstrip()[:1] != b"{":
        return False
    try:
        doc = loads_strict(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return (
        type(doc) is dict
        and type(doc.get("mediaType")) is str
        and doc["mediaType"].startswith("application/vnd.dev.sigstore.bundle")
        and type(doc.get("dsseEnvelope")) is dict
    )


class _Bad(Exception):
    """A defect in the bundle; turned into VerificationFailed naming where the bundle came from."""


def _obj(
    value: Any, what: str, required: frozenset[str] | set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if type(value) is not dict:
        raise _Bad(f"{what} is not an object")
    keys = set(value)
    if not required <= keys or not keys <= required | optional:
        raise _Bad(
            f"{what} has keys {sorted(keys)}; expected {sorted(required)}"
            + (f" and optionally {sorted(optional)}" if optional else "")
        )
    return value


def _string(value: Any, what: str, limit: int = _MAX_NAME_CHARS) -> str:
    if type(value) is not str or len(value) > limit:
        raise _Bad(f"{what} is not a string of at most {limit} characters")
    return value


def _b64(value: Any, what: str, limit: int) -> bytes:
    text = _string(value, what, limit)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise _Bad(f"{what} is not base64") from None


def _hex64(value: Any, what: str) -> str:
    if type(value) is not str or len(value) != 64 or not set(value) <= _HEX:
        raise _Bad(f"{what} is not 64 lowercase hex digits")
    return value


def _envelope(doc: Any) -> tuple[str | None, bytes, bytes]:
    """(hint, payload, signature) from the bundle JSON."""
    bundle = _obj(doc, "bundle", {"mediaType", "verificationMaterial", "dsseEnvelope"})
    if bundle["mediaType"] != BUNDLE_MEDIA_TYPE:
        raise _Bad(f"mediaType is {bundle['mediaType']!r}, expected {BUNDLE_MEDIA_TYPE!r}")
    material = _obj(
        bundle["verificationMaterial"], "verificationMaterial", {"publicKey"}, frozenset({"tlogEntries"})
    )
    if material.get("tlogEntries", []) != []:
        raise _Bad("verificationMaterial.tlogEntries is not empty (a Sigstore-signed bundle, not a key one)")
    public = _obj(material["publicKey"], "verificationMaterial.publicKey", set(), frozenset({"hint"}))
    hint = public.get("hint")
    if hint is not None:
        hint = _hex64(hint, "verificationMaterial.publicKey.hint")
    envelope = _obj(bundle["dsseEnvelope"], "dsseEnvelope", {"payload", "payloadType", "signatures"})
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise _Bad(f"dsseEnvelope.payloadType is {envelope['payloadType']!r}, expected {PAYLOAD_TYPE!r}")
    sigs = envelope["signatures"]
    if type(sigs) is not list or len(sigs) != 1:
        raise _Bad("dsseEnvelope.signatures must hold exactly one signature")
    sig = _obj(sigs[0], "dsseEnvelope.signatures[0]", {"sig"}, frozenset({"keyid"}))
    if "keyid" in sig:
        _string(sig["keyid"], "dsseEnvelope.signatures[0].keyid")
    payload = _b64(envelope["payload"], "dsseEnvelope.payload", MAX_BUNDLE_BYTES)
    return hint, payload, _b64(sig["sig"], "dsseEnvelope.signatures[0].sig", _MAX_SIG_CHARS)


def _statement(payload: bytes) -> tuple[str, str, list[tuple[str, str]], list[str], bool]:
    """(model name, root, [(resource name, digest)], ignore_paths, allow_symlinks) from the statement."""
    try:
        doc = loads_strict(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Bad(f"the signed statement is not JSON ({exc})") from None
    statement = _obj(doc, "statement", {"_type", "subject", "predicateType", "predicate"})
    if statement["_type"] != STATEMENT_TYPE:
        raise _Bad(f"statement _type is {statement['_type']!r}, expected {STATEMENT_TYPE!r}")
    if statement["predicateType"] == _PREDICATE_TYPE_V01:
        raise UnsupportedFormat(
            "model_signing v0.1 predicate: it has no root digest and no serialization description",
            hint="re-sign the model with model_signing 1.0 or later",
        )
    if statement["predicateType"] != PREDICATE_TYPE:
        raise _Bad(f"predicateType is {statement['predicateType']!r}, expected {PREDICATE_TYPE!r}")
    subjects = statement["subject"]
    if type(subjects) is not list or len(subjects) != 1:
        raise _Bad("statement must have exactly one subject")
    subject = _obj(subjects[0], "subject[0]", {"name", "digest"})
    name = _string(subject["name"], "subject[0].name")
    root = _hex64(_obj(subject["digest"], "subject[0].digest", {"sha256"})["sha256"], "subject[0].digest")
    predicate = _obj(statement["predicate"], "predicate", {"serialization", "resources"})
    ser = _obj(
        predicate["serialization"],
        "predicate.serialization",
        {"method", "hash_type", "allow_symlinks"},
        frozenset({"ignore_paths", "shard_size"}),
    )
    if ser["method"] != "files" or ser["hash_type"] != "sha256" or "shard_size" in ser:
        raise UnsupportedFormat(
            f"model_signing serialization {ser['method']!r} with {ser['hash_type']!r} is not supported; "
            "only 'files' with 'sha256' (model_signing's default)",
            hint="re-sign with model_signing's default hashing",
        )
    if type(ser["allow_symlinks"]) is not bool:
        raise _Bad("predicate.serialization.allow_symlinks is not a boolean")
    raw_ignore = ser.get("ignore_paths", [])
    if type(raw_ignore) is not list or len(raw_ignore) > MAX_IGNORE_PATHS:
        raise _Bad("predicate.serialization.ignore_paths is not a list of paths")
    ignore = []
    for i, item in enumerate(raw_ignore):
        entry = _string(item, f"ignore_paths[{i}]")
        problem = path_problem(entry)
        if problem:
            raise _Bad(f"ignore_paths[{i}]: {problem}")
        ignore.append(entry)
    raw = predicate["resources"]
    if type(raw) is not list or not raw or len(raw) > MAX_RESOURCES:
        raise _Bad(f"predicate.resources must be a list of 1 to {MAX_RESOURCES} resources")
    resources: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        what = f"resources[{i}]"
        res = _obj(item, what, {"name", "algorithm", "digest"})
        res_name = _string(res["name"], f"{what}.name")
        if res_name != _FILE_RESOURCE:
            problem = path_problem(res_name)
            if problem:
                raise _Bad(f"{what}.name: {problem}")
        if res["algorithm"] != "sha256":
            raise _Bad(f"{what}.algorithm is {res['algorithm']!r}, expected 'sha256'")
        if res_name in seen:
            raise _Bad(f"{what}.name {res_name!r} appears twice")
        seen.add(res_name)
        resources.append((res_name, _hex64(res["digest"], f"{what}.digest")))
    if _FILE_RESOURCE in seen and len(resources) != 1:
        raise _Bad("resource '.' (a single-file model) next to other resources")
    if _root_digest([digest for _, digest in resources]) != root:
        raise _Bad("the subject digest is not the digest of the resources")
    return name, root, resources, ignore, ser["allow_symlinks"]


def _choose_signer(
    hint: str | None, payload: bytes, sig: bytes, trusted: Sequence[PublicKey], where: str
) -> PublicKey:
    keys = [key for key in trusted if key.alg == ALG_ECDSA_P256]
    candidates = [key for key in keys if hint is None or oms_key_hint(key) == hint]
    allowed = ", ".join(key.label for key in trusted)
    if not candidates:
        signer = f"the key whose PEM SHA-256 is {hint}" if hint else "an unnamed key"
        raise VerificationFailed(
            f"{where} is an OMS bundle signed by {signer}, which is no trusted key; trusted: {allowed}"
            + ("" if keys else " (none is an ECDSA P-256 key, the only kind OMS bundles use here)"),
            hint="trust the signer's public key with --trust KEY if you know it is right",
        )
    message = _pae(PAYLOAD_TYPE, payload)
    for key in candidates:
        if key.verify(message, sig):
            return key
    names = ", ".join(key.label for key in candidates)
    raise VerificationFailed(f"{where}: invalid OMS signature by {names}: the bundle was altered")


def _bindable(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _as_compared(digests: dict[str, str], kind: str, name: str, shard_size: int) -> Manifest:
    """A manifest of names and digests only: OMS signs no size, mode or link, so none is compared."""
    files = tuple(FileEntry(path, 0, 0, digests[path]) for path in sorted(digests))
    return Manifest(kind, name, shard_size, files)


def verify_oms_bundle(
    path: Path,
    bundle: bytes,
    trusted: Sequence[PublicKey],
    *,
    where: str = "OMS bundle",
    signature: Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    digest_cache: DigestCache | None = None,
    full: bool = True,
    manifest_builder: Callable[[Path], Manifest] | None = None,
) -> VerifyResult:
    """Verify a model_signing bundle for `path`: a trusted ECDSA key signed it, and the files match.

    Files are matched by name and SHA-256; ``ignore_paths`` from the signed statement are left out, and
    `signature` (the bundle's own file, if inside `path`) too. Raises VerificationFailed for an
    untrusted key or a bad signature or bundle, TreeChanged naming every added, removed, renamed and
    modified file, UnsupportedFormat for serializations other than model_signing's default.
    The result's `manifest` is the files on disk (sizes and modes as found) that the bundle covers, and
    its `root` is the bundle's subject digest, ``sha256:``-prefixed.
    """
    if not trusted:
        raise UsageError("no trusted keys: pass --trust KEY or a policy file")
    path = Path(path)
    if len(bundle) > MAX_BUNDLE_BYTES:
        raise VerificationFailed(f"{where}: larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        doc = loads_strict(bundle)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise VerificationFailed(f"{where}: not JSON ({exc})") from None
    try:
        hint, payload, sig = _envelope(doc)
        signer = _choose_signer(hint, payload, sig, trusted, where)
        name, root, resources, ignore, allow_symlinks = _statement(payload)
    except _Bad as exc:
        raise VerificationFailed(f"{where}: not a valid OMS bundle: {exc}") from None

    if manifest_builder is not None:
        actual = manifest_builder(path)
    else:
        exclude = (signature,) if signature is not None else ()
        actual = build_manifest(
            path,
            workers=workers,
            progress=progress,
            digest_cache=digest_cache,
            exclude=exclude,
            refresh_cache=full,
        )
    signed_is_file = resources[0][0] == _FILE_RESOURCE
    if signed_is_file != (actual.kind == "file"):
        signed_kind = "file" if signed_is_file else "directory"
        raise VerificationFailed(f"{path} is a {actual.kind}, but the OMS bundle is for a {signed_kind}")
    signed = dict(resources)
    if actual.kind == "file":
        # Differences name the file, not model_signing's "." for it.
        only = actual.files[0].path
        signed = {only: signed[_FILE_RESOURCE]}
        on_disk = {only: actual.files[0].digest}
        covered = actual
    else:
        on_disk = _expand_links(actual) if allow_symlinks else {e.path: e.digest for e in actual.files}
        on_disk = {p: d for p, d in on_disk.items() if not _ignored(p, ignore)}
        files = tuple(entry for entry in actual.files if not _ignored(entry.path, ignore))
        links = (
            () if allow_symlinks else tuple(link for link in actual.links if not _ignored(link.path, ignore))
        )
        covered = Manifest(actual.kind, actual.name, actual.shard_size, files, links)
    signed_view = _as_compared(signed, actual.kind, name, actual.shard_size)
    # The subject name is signed: a directory is bound to it unless it was signed without one.
    disk_name = actual.name if actual.kind == "directory" and _bindable(name) else name
    disk_view = _as_compared(on_disk, actual.kind, disk_name, actual.shard_size)
    disk_view = Manifest(disk_view.kind, disk_view.name, disk_view.shard_size, disk_view.files, covered.links)
    diff = diff_manifests(signed_view, disk_view)
    result = VerifyResult(path, covered, signer, diff, "sha256:" + root)
    if not diff.ok:
        lines = diff.describe()
        count = f"{len(lines)} difference{'s' if len(lines) != 1 else ''}"
        raise TreeChanged(
            f"{path} does not match its OMS signature by {signer.label} ({count}):\n  " + "\n  ".join(lines),
            result,
        )
    return result
