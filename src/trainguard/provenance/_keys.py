"""Signing keys for checkpoints: Ed25519 and ECDSA P-256 in PEM (PKCS#8 private, SubjectPublicKeyInfo public).

A public key's id is ``"sha256:" + hex(SHA-256(DER SubjectPublicKeyInfo))[:32]``: it depends on the key
alone, so the same key has the same id in every trust policy, whatever name a policy gives it. ECDSA
signatures are over SHA-256 and DER-encoded, as OpenSSL and model_signing write them; Ed25519 signatures
are the raw 64 bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from trainguard._keyfile import read_key_file, write_new_key_file
from trainguard.errors import KeyFileError, UsageError

__all__ = ["ALGORITHMS", "PrivateKey", "PublicKey"]

ALG_ED25519 = "ed25519"
ALG_ECDSA_P256 = "ecdsa-p256"
ALGORITHMS = (ALG_ED25519, ALG_ECDSA_P256)
# A PEM key of either kind is well under 1 KiB; anything much larger is not a key file.
_MAX_KEY_FILE_BYTES = 16 * 1024

_Private = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
_Public = Ed25519PublicKey | ec.EllipticCurvePublicKey


def _check_alg(alg: str) -> None:
    if alg not in ALGORITHMS:
        raise UsageError(f"unknown key algorithm {alg!r}", hint=f"use one of: {', '.join(ALGORITHMS)}")


def _alg_of(key: object, where: str) -> str:
    """The algorithm name of a loaded key; KeyFileError for any other algorithm or curve."""
    if isinstance(key, (Ed25519PrivateKey, Ed25519PublicKey)):
        return ALG_ED25519
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if isinstance(key.curve, ec.SECP256R1):
            return ALG_ECDSA_P256
        raise KeyFileError(
            f"{where}: ECDSA key on curve {key.curve.name}; only P-256 (secp256r1) is supported"
        )
    raise _unsupported(key, where)


def _unsupported(key: object, where: str) -> KeyFileError:
    return KeyFileError(
        f"{where}: unsupported key type {type(key).__name__}; only Ed25519 and ECDSA P-256 are supported",
        hint="generate one with: trainguard keygen --pem --alg ed25519 FILE",
    )


def _read_key_file(path: Path, *, private: bool) -> bytes:
    return read_key_file(path, private=private, max_bytes=_MAX_KEY_FILE_BYTES)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    write_new_key_file(path, data, mode)


class PublicKey:
    """A public key that verifies signatures; `name` is how messages call it (a trust policy's label)."""

    __slots__ = ("_der", "_key", "alg", "key_id", "name")

    def __init__(self, key: _Public, name: str | None = None) -> None:
        self.alg = _alg_of(key, "public key")
        self._key = key
        self._der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = "sha256:" + hashlib.sha256(self._der).hexdigest()[:32]
        self.name = name or self.key_id

    @classmethod
    def from_pem(cls, data: bytes, name: str | None = None) -> PublicKey:
        """Parse a SubjectPublicKeyInfo PEM; KeyFileError if it is anything else."""
        if b"PRIVATE KEY" in data:
            raise KeyFileError(
                "wrong kind of key: this is a private key, but a public key is needed",
                hint="give the public key (.pub) instead; never share the private key",
            )
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError("malformed public key: not a PEM SubjectPublicKeyInfo") from None
        if not isinstance(key, (Ed25519PublicKey, ec.EllipticCurvePublicKey)):
            raise _unsupported(key, "public key")
        return cls(key, name)

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> PublicKey:
        """Read a public key file; errors name the file."""
        data = _read_key_file(Path(path), private=False)
        try:
            return cls.from_pem(data, name)
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc.message}", hint=exc.hint) from None

    def pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def der(self) -> bytes:
        """The DER SubjectPublicKeyInfo the key id is computed from."""
        return self._der

    def save(self, path: Path) -> None:
        """Write the PEM to a new file with mode 0644; never overwrites (KeyFileError)."""
        _write_new_file(Path(path), self.pem(), 0o644)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is a valid signature of `message` by this key."""
        try:
            if isinstance(self._key, Ed25519PublicKey):
                self._key.verify(signature, message)
            else:
                self._key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    @property
    def label(self) -> str:
        """``name (key id)``, or the key id alone when the key has no other name."""
        return self.key_id if self.name == self.key_id else f"{self.name} ({self.key_id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other._der == self._der

    def __hash__(self) -> int:
        return hash(self._der)

    def __repr__(self) -> str:
        return f"PublicKey({self.alg}, {self.label})"


class PrivateKey:
    """A private signing key. Its repr never shows the secret."""

    __slots__ = ("_key", "_public", "alg")

    def __init__(self, key: _Private) -> None:
        self.alg = _alg_of(key, "private key")
        self._key = key
        self._public = PublicKey(key.public_key())

    @classmethod
    def generate(cls, alg: str) -> PrivateKey:
        """A fresh random key: `alg` is "ed25519" or "ecdsa-p256"."""
        _check_alg(alg)
        if alg == ALG_ED25519:
            return cls(Ed25519PrivateKey.generate())
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, data: bytes, where: str = "private key") -> PrivateKey:
        """Parse an unencrypted PKCS#8 PEM. Messages never quote the key material."""
        if b"ENCRYPTED" in data:
            raise KeyFileError(f"{where}: encrypted private keys are not supported")
        if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
            raise KeyFileError(f"{where}: this is a public key, but a private key is needed to sign")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError(
                f"{where}: malformed private key: not an unencrypted PEM private key",
                hint="generate one with: trainguard keygen --pem --alg ed25519 FILE",
            ) from None
        if not isinstance(key, (Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
            raise _unsupported(key, where)
        _alg_of(key, where)  # the curve, with the file named
        return cls(key)

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> PrivateKey:
        """Read a private key file, refusing one that group or others may access."""
        data = _read_key_file(Path(path), private=True)
        key = cls.from_pem(data, str(path))
        if name:
            key._public.name = name
        return key

    def save(self, path: Path) -> None:
        """Write the PKCS#8 PEM to a new file with mode 0600; never overwrites (KeyFileError)."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_new_file(Path(path), pem, 0o600)

    def public(self) -> PublicKey:
        return self._public

    @property
    def key_id(self) -> str:
        return self._public.key_id

    def sign(self, message: bytes) -> bytes:
        """Ed25519: the raw 64-byte signature; ECDSA P-256: DER signature over SHA-256."""
        if isinstance(self._key, Ed25519PrivateKey):
            return self._key.sign(message)
        return self._key.sign(message, ec.ECDSA(hashes.SHA256()))

    def __repr__(self) -> str:
        return f"PrivateKey({self.alg}, {self.key_id})"
