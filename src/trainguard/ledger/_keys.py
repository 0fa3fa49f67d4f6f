"""Ed25519 keys in the text forms of C2SP signed-note (golang.org/x/mod/sumdb/note).

Verifier key: ``<name>+<key id, 8 hex>+<base64(alg || 32-byte public key)>``
Signing key:  ``PRIVATE+KEY+<name>+<key id, 8 hex>+<base64(alg || 32-byte seed)>``

The key id is ``SHA-256(name || "\\n" || alg || public key)[:4]``. One class covers both key kinds; the
``alg`` byte says which: ``ALG_ED25519`` (0x01) signs notes such as checkpoints, ``ALG_COSIGNATURE_V1``
(0x04) is a witness key that signs C2SP tlog-cosignature/v1 statements. The verifier text form with 0x04
is the vkey form of tlog-cosignature; the private form with 0x04 mirrors the note signer form.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from trainguard._keyfile import read_key_file, write_new_key_file
from trainguard.errors import KeyFileError

__all__ = [
    "ALG_COSIGNATURE_V1",
    "ALG_ED25519",
    "SigningKey",
    "VerifierKey",
    "b64decode_strict",
    "compute_key_id",
    "is_valid_key_name",
]

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
_ALG_KINDS = {ALG_ED25519: "Ed25519 note key", ALG_COSIGNATURE_V1: "cosignature/v1 witness key"}

_PRIVATE_PREFIX = "PRIVATE+KEY+"
_KEY_BYTES = 32
# A key file holds one line of well under 200 characters; anything much larger is not a key file.
_MAX_KEY_FILE_BYTES = 4096


def is_valid_key_name(name: str) -> bool:
    """Key names are non-empty and contain neither Unicode spaces nor "+" (C2SP signed-note)."""
    return bool(name) and "+" not in name and not any(c.isspace() or ord(c) < 0x20 for c in name)


def compute_key_id(name: str, alg: int, public: bytes) -> bytes:
    """The 4-byte key id: the first four bytes of SHA-256(name || 0x0A || alg || public key)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public).digest()[:4]


def b64decode_strict(text: str) -> bytes:
    """Standard base64 with padding, in its one canonical spelling; ValueError otherwise."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError("not valid base64") from exc
    if base64.b64encode(data).decode("ascii") != text:
        # Non-zero padding bits or missing padding: two spellings of one value are not accepted.
        raise ValueError("not canonical base64")
    return data


def _kind(alg: int) -> str:
    return _ALG_KINDS.get(alg, f"key of unknown algorithm 0x{alg:02x}")


def _check_alg(alg: int) -> None:
    if alg not in _ALG_KINDS:
        raise ValueError(f"unsupported key algorithm 0x{alg:02x}")


def _check_name(name: str) -> None:
    if not is_valid_key_name(name):
        raise ValueError(f"invalid key name {name!r}: it must be non-empty, without spaces or '+'")


def _parse_key_fields(text: str, what: str, *, secret: bool) -> tuple[str, bytes, int, bytes]:
    """Split ``name+hash+base64`` into (name, key id, alg, 32 key bytes); KeyFileError on any defect.

    With `secret`, messages quote nothing from `text`: a mangled separator can shift key material into
    any field.
    """

    def show(value: str) -> str:
        return "" if secret else f" {value!r}"

    name, sep1, rest = text.partition("+")
    hash_hex, sep2, key64 = rest.partition("+")  # base64 itself may contain "+"
    if not (sep1 and sep2):
        raise KeyFileError(f"malformed {what}: expected NAME+KEYID+KEYDATA")
    if not is_valid_key_name(name):
        raise KeyFileError(f"malformed {what}: invalid key name{show(name)}")
    if len(hash_hex) != 8 or any(c not in "0123456789abcdefABCDEF" for c in hash_hex):
        raise KeyFileError(f"malformed {what}: the key id{show(hash_hex)} is not 8 hex digits")
    try:
        raw = b64decode_strict(key64)
    except ValueError as exc:
        raise KeyFileError(f"malformed {what}: the key data is {exc}") from None
    if len(raw) != 1 + _KEY_BYTES:
        raise KeyFileError(f"malformed {what}: the key data has {len(raw)} bytes, expected {1 + _KEY_BYTES}")
    if raw[0] not in _ALG_KINDS:
        raise KeyFileError(f"unsupported {what}: unknown algorithm byte 0x{raw[0]:02x}")
    return name, bytes.fromhex(hash_hex), raw[0], raw[1:]


def _require_alg(key_alg: int, alg: int | None, what: str) -> None:
    if alg is not None and key_alg != alg:
        raise KeyFileError(f"wrong kind of key: {what} is a {_kind(key_alg)}, but a {_kind(alg)} is needed")


def _read_key_file(path: Path, *, private: bool) -> str:
    """Read a key file's text; a private key file must not be accessible to group or others."""
    data = read_key_file(path, private=private, max_bytes=_MAX_KEY_FILE_BYTES)
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} is not a text key file") from None


def _write_new_file(path: Path, text: str, mode: int) -> None:
    """Create `path` exclusively (never overwriting) and write `text` durably."""
    write_new_key_file(path, text.encode("ascii") + b"\n", mode)


@dataclasses.dataclass(frozen=True)
class VerifierKey:
    """A public Ed25519 key with its name and algorithm byte; `key_id` is derived from all three."""

    name: str
    alg: int
    public: bytes
    key_id: bytes = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_alg(self.alg)
        if len(self.public) != _KEY_BYTES:
            raise ValueError(f"an Ed25519 public key has {_KEY_BYTES} bytes, not {len(self.public)}")
        object.__setattr__(self, "key_id", compute_key_id(self.name, self.alg, self.public))

    @property
    def ident(self) -> str:
        """``name+keyid``: how a key is named in messages and signature lookups."""
        return f"{self.name}+{self.key_id.hex()}"

    @classmethod
    def from_text(cls, text: str, *, alg: int | None = None) -> VerifierKey:
        """Parse ``name+hash+base64``; KeyFileError if malformed, of the wrong kind, or the hash disagrees."""
        text = text.strip()
        if text.startswith(_PRIVATE_PREFIX):
            raise KeyFileError(
                "wrong kind of key: this is a private signing key, but a public verifier key is needed",
                hint="give the verifier key (name+keyid+data) instead; never share the private key",
            )
        name, key_id, key_alg, public = _parse_key_fields(text, "verifier key", secret=False)
        key = cls(name, key_alg, public)
        if key.key_id != key_id:
            raise KeyFileError(f"malformed verifier key {name}: the key id does not match the key")
        _require_alg(key.alg, alg, f"verifier key {key.ident}")
        return key

    @classmethod
    def load(cls, path: Path, *, alg: int | None = None) -> VerifierKey:
        """Read a verifier key file; errors name the file."""
        text = _read_key_file(Path(path), private=False)
        try:
            return cls.from_text(text, alg=alg)
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc.message}", hint=exc.hint) from None

    def save(self, path: Path) -> None:
        """Write the key text to a new file (mode 0644, never overwriting)."""
        _write_new_file(Path(path), self.text(), 0o644)

    def text(self) -> str:
        """The verifier key text form."""
        data = base64.b64encode(bytes([self.alg]) + self.public).decode("ascii")
        return f"{self.name}+{self.key_id.hex()}+{data}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is a valid Ed25519 signature of `message` by this key."""
        if len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def __str__(self) -> str:
        return self.text()


class SigningKey:
    """A private Ed25519 key with its name and algorithm byte. Its repr never shows the secret."""

    __slots__ = ("_private", "_verifier", "alg", "name")

    def __init__(self, name: str, private: Ed25519PrivateKey, alg: int = ALG_ED25519) -> None:
        _check_name(name)
        _check_alg(alg)
        self.name = name
        self.alg = alg
        self._private = private
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._verifier = VerifierKey(name, alg, public)

    @property
    def key_id(self) -> bytes:
        return self._verifier.key_id

    @property
    def ident(self) -> str:
        return self._verifier.ident

    @classmethod
    def generate(cls, name: str, alg: int = ALG_ED25519) -> SigningKey:
        """A fresh random key; `alg` ALG_COSIGNATURE_V1 makes a witness key."""
        return cls(name, Ed25519PrivateKey.generate(), alg)

    @classmethod
    def from_text(cls, text: str, *, alg: int | None = None) -> SigningKey:
        """Parse ``PRIVATE+KEY+name+hash+base64(alg || seed)``. Error messages never echo the secret."""
        text = text.strip()
        if not text.startswith(_PRIVATE_PREFIX):
            raise KeyFileError(
                "wrong kind of key: a private signing key (PRIVATE+KEY+...) is needed, "
                "but this is not one (a verifier key, perhaps)"
            )
        name, key_id, key_alg, seed = _parse_key_fields(
            text[len(_PRIVATE_PREFIX) :], "private key", secret=True
        )
        key = cls(name, Ed25519PrivateKey.from_private_bytes(seed), key_alg)
        if key.key_id != key_id:
            raise KeyFileError(f"malformed private key {name}: the key id does not match the key")
        _require_alg(key.alg, alg, f"private key {key.ident}")
        return key

    @classmethod
    def load(cls, path: Path, *, alg: int | None = None) -> SigningKey:
        """Read a private key file, refusing one that group or others may access."""
        text = _read_key_file(Path(path), private=True)
        try:
            return cls.from_text(text, alg=alg)
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc.message}", hint=exc.hint) from None

    def save(self, path: Path) -> None:
        """Write the private key to a new file with mode 0600; never overwrites (KeyFileError)."""
        _write_new_file(Path(path), self.text(), 0o600)

    def text(self) -> str:
        """The private key text form. It is the secret: keep it out of logs."""
        seed = self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        data = base64.b64encode(bytes([self.alg]) + seed).decode("ascii")
        return f"{_PRIVATE_PREFIX}{self.name}+{self.key_id.hex()}+{data}"

    def verifier(self) -> VerifierKey:
        return self._verifier

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message` (deterministic, RFC 8032)."""
        return self._private.sign(message)

    def __repr__(self) -> str:
        return f"SigningKey({self.ident!r}, {_kind(self.alg)})"
