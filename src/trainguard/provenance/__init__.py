"""Signed manifests of checkpoint files and directories.

from trainguard.provenance import PrivateKey, PublicKey, sign_path, verify_path

key = PrivateKey.load(Path("signing.pem"))                 # Ed25519 or ECDSA P-256, mode 0600
signed = sign_path(Path("ckpt/"), key)                     # writes ckpt/.trainguard.sig
result = verify_path(Path("ckpt/"), [key.public()])        # re-hashes; VerificationFailed names changes
print(result.signer.label, result.root)

Every file's path, size, mode and SHA-256 (and per-shard SHA-256 of large files) go into a manifest;
its RFC 8785 canonical JSON is what is signed, and its SHA-256 is the root. The walk refuses symlinks
that leave the tree, symlink cycles, special files, unsafe names and empty models (`UnsafeTree`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports
from trainguard.provenance._hashing import BUFFER_SIZE, FileDigests, hash_files
from trainguard.provenance._keys import ALGORITHMS, PrivateKey, PublicKey
from trainguard.provenance._manifest import (
    DEFAULT_SHARD_SIZE,
    DigestCache,
    FileEntry,
    LinkEntry,
    Manifest,
    TreeDiff,
    build_manifest,
    diff_manifests,
)
from trainguard.provenance._signature import (
    SIGNED_PREFIX,
    Signature,
    SignatureFile,
    SignResult,
    TreeChanged,
    VerifyResult,
    choose_signer,
    load_trust_policy,
    read_signature_bytes,
    read_signature_file,
    sign_manifest,
    sign_path,
    signed_message,
    verify_path,
    verify_tree,
)
from trainguard.provenance._tree import (
    SIGNATURE_NAME,
    UnreadableTree,
    UnsafeTree,
    path_problem,
    signature_path,
    walk,
)

if TYPE_CHECKING:
    from trainguard.provenance._oms import is_oms_bundle, oms_key_hint, to_oms_bundle, verify_oms_bundle

# OMS bundles are imported on first use: most signings and verifications never touch one.
_LAZY = frozenset({"is_oms_bundle", "oms_key_hint", "to_oms_bundle", "verify_oms_bundle"})

__all__ = [
    "ALGORITHMS",
    "BUFFER_SIZE",
    "DEFAULT_SHARD_SIZE",
    "SIGNATURE_NAME",
    "SIGNED_PREFIX",
    "DigestCache",
    "FileDigests",
    "FileEntry",
    "LinkEntry",
    "Manifest",
    "PrivateKey",
    "PublicKey",
    "SignResult",
    "Signature",
    "SignatureFile",
    "TreeChanged",
    "TreeDiff",
    "UnreadableTree",
    "UnsafeTree",
    "VerifyResult",
    "build_manifest",
    "choose_signer",
    "diff_manifests",
    "hash_files",
    "is_oms_bundle",
    "load_trust_policy",
    "oms_key_hint",
    "path_problem",
    "read_signature_bytes",
    "read_signature_file",
    "sign_manifest",
    "sign_path",
    "signature_path",
    "signed_message",
    "to_oms_bundle",
    "verify_oms_bundle",
    "verify_path",
    "verify_tree",
    "walk",
]


__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_LAZY, "_oms"), globals())
