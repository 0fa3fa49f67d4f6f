"""Signed notes, checkpoints and witness cosignatures (C2SP signed-note, tlog-checkpoint, tlog-cosignature).

A signed note is its text (ending in a newline), a blank line, then one or more lines
``— <key name> base64(key id || signature)``. Notes arrive from disk, databases and the network, so
`Note.parse` bounds their size and signature count and accepts only strict UTF-8 without control
characters other than newline. Verification ignores signatures by unknown keys, as the format requires;
a note with no signature by the expected key fails with a message naming the keys that did sign it.
"""

from __future__ import annotations

import base64
import dataclasses
import re

from trainguard.errors import KeyFileError, VerificationFailed
from trainguard.ledger._keys import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    SigningKey,
    VerifierKey,
    b64decode_strict,
    is_valid_key_name,
)

__all__ = [
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "PREVIOUS_SIZE",
    "Checkpoint",
    "Note",
    "NoteSignature",
    "add_signatures",
    "cosign",
    "cosigned_message",
    "open_checkpoint",
    "open_note",
    "sign_checkpoint",
    "sign_note",
    "verify_cosignature",
]

MAX_NOTE_BYTES = 1 << 20
MAX_SIGNATURES = 100  # golang.org/x/mod/sumdb/note rejects more; C2SP asks verifiers to accept at least 16
_SIG_PREFIX = "\u2014 "  # em dash, space
# The extension line that chains each checkpoint to the one signed before it, so that a checkpoint row
# deleted from the middle of a store is missed by the one after it.
PREVIOUS_SIZE = "previous-size"
_ROOT_BYTES = 32  # SHA-256 root hash (RFC 9162)
_MAX_TIMESTAMP = (1 << 63) - 1
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_COSIGNATURE_BYTES = 8 + 64  # u64 timestamp || Ed25519 signature


def _malformed(what: str) -> VerificationFailed:
    return VerificationFailed(f"malformed note: {what}")


def _check_text(text: str, what: str) -> None:
    for ch in text:
        if ch < " " and ch != "\n":
            raise VerificationFailed(f"malformed {what}: control character U+{ord(ch):04X}")


def _decimal(text: str) -> int | None:
    """A decimal with no leading zeros, below 2**63; None otherwise."""
    if not _DECIMAL.fullmatch(text) or len(text) > 19:
        return None
    value = int(text)
    return value if value <= _MAX_TIMESTAMP else None


@dataclasses.dataclass(frozen=True)
class NoteSignature:
    """One signature line: the key name, the 4-byte key id and the signature bytes after it."""

    name: str
    key_id: bytes
    signature: bytes

    @property
    def ident(self) -> str:
        return f"{self.name}+{self.key_id.hex()}"

    def line(self) -> str:
        """The signature line, newline included."""
        return f"{_SIG_PREFIX}{self.name} {base64.b64encode(self.key_id + self.signature).decode('ascii')}\n"

    @classmethod
    def from_line(cls, line: str) -> NoteSignature:
        """Parse one line (without its newline); VerificationFailed if malformed."""
        if not line.startswith(_SIG_PREFIX):
            raise _malformed("a signature line does not start with an em dash and a space")
        name, sep, data = line[len(_SIG_PREFIX) :].partition(" ")
        if not sep or not is_valid_key_name(name):
            raise _malformed(f"invalid key name in signature line {name!r}")
        try:
            raw = b64decode_strict(data)
        except ValueError:
            raise _malformed(f"the signature by {name} is not valid base64") from None
        if len(raw) < 5:
            raise _malformed(f"the signature by {name} is too short")
        return cls(name, raw[:4], raw[4:])


@dataclasses.dataclass(frozen=True)
class Note:
    """A parsed, not yet verified, signed note."""

    text: str
    signatures: tuple[NoteSignature, ...]

    @classmethod
    def parse(cls, note: str | bytes) -> Note:
        """Parse untrusted note bytes or text; VerificationFailed("malformed note: ...") on any defect."""
        if isinstance(note, str):
            if len(note) > MAX_NOTE_BYTES:
                raise _malformed(f"larger than {MAX_NOTE_BYTES} bytes")
            try:
                note = note.encode("utf-8")  # lone surrogates fail here
            except UnicodeEncodeError:
                raise _malformed("not valid UTF-8") from None
        if len(note) > MAX_NOTE_BYTES:
            raise _malformed(f"larger than {MAX_NOTE_BYTES} bytes")
        try:
            note = note.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise _malformed("not valid UTF-8") from None
        _check_text(note, "note")
        split = note.rfind("\n\n")
        if split < 0 or not note.endswith("\n"):
            raise _malformed("no blank line before the signatures, or no final newline")
        text, block = note[: split + 1], note[split + 2 :]
        lines = block.split("\n")[:-1]
        if not lines:
            raise _malformed("no signature lines")
        if len(lines) > MAX_SIGNATURES:
            raise _malformed(f"more than {MAX_SIGNATURES} signatures")
        return cls(text, tuple(NoteSignature.from_line(line) for line in lines))

    def render(self) -> str:
        """The note text, a blank line and the signature lines."""
        return self.text + "\n" + "".join(sig.line() for sig in self.signatures)

    def by_key(self, name: str, key_id: bytes) -> list[NoteSignature]:
        return [sig for sig in self.signatures if sig.name == name and sig.key_id == key_id]

    def missing_key_error(self, key: VerifierKey, what: str) -> VerificationFailed:
        """The error for a note without a signature by `key`: the signal of a swapped or wrong key."""
        found = ", ".join(sig.ident for sig in self.signatures)
        same_name = any(sig.name == key.name for sig in self.signatures)
        hint = (
            "a different key with the same name signed it: the key was replaced, or this is the wrong key"
            if same_name
            else "check that the expected key is the right one; the note was signed by another key"
        )
        return VerificationFailed(
            f"{what} is not signed by key {key.ident}; it is signed by {found}", hint=hint
        )


def _check_note_text(text: str) -> None:
    if not text.endswith("\n"):
        raise ValueError("a note text must end with a newline")
    if len(text.encode("utf-8")) > MAX_NOTE_BYTES:
        raise ValueError(f"a note text must be at most {MAX_NOTE_BYTES} bytes")
    for ch in text:
        if ch < " " and ch != "\n":
            raise ValueError(f"a note text must not contain control character U+{ord(ch):04X}")


def _require_key_alg(alg: int, wanted: int, ident: str, purpose: str) -> None:
    if alg != wanted:
        kinds = {ALG_ED25519: "an Ed25519 note key", ALG_COSIGNATURE_V1: "a cosignature/v1 witness key"}
        actual = kinds.get(alg, "another kind")
        raise KeyFileError(f"wrong kind of key: {purpose} needs {kinds[wanted]}, but {ident} is {actual}")


def sign_note(text: str, key: SigningKey) -> str:
    """The signed note: `text`, a blank line and one Ed25519 signature line by `key`."""
    _require_key_alg(key.alg, ALG_ED25519, key.ident, "signing a note")
    _check_note_text(text)
    sig = NoteSignature(key.name, key.key_id, key.sign(text.encode("utf-8")))
    return text + "\n" + sig.line()


def open_note(note: str | bytes, key: VerifierKey, *, what: str = "the note") -> str:
    """The text of `note` once a signature by `key` verifies; VerificationFailed otherwise.

    A signature line with the key's name and id that fails to verify rejects the whole note.
    """
    _require_key_alg(key.alg, ALG_ED25519, key.ident, "opening a note")
    parsed = Note.parse(note)
    mine = parsed.by_key(key.name, key.key_id)
    if not mine:
        raise parsed.missing_key_error(key, what)
    message = parsed.text.encode("utf-8")
    for sig in mine:
        if not key.verify(message, sig.signature):
            raise VerificationFailed(f"{what} has an invalid signature by key {key.ident}")
    return parsed.text


def add_signatures(note: str, lines: str) -> str:
    """`note` with more signature `lines` (e.g. cosignatures) appended; both parts are validated."""
    combined = note + lines
    Note.parse(combined)
    return combined


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin, size and root hash, with optional extension lines (C2SP tlog-checkpoint)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise ValueError("a checkpoint origin must be one non-empty line")
        if not 0 <= self.size <= _MAX_TIMESTAMP:
            raise ValueError(f"a checkpoint size must be between 0 and 2**63-1, not {self.size}")
        if len(self.root) != _ROOT_BYTES:
            raise ValueError(f"a checkpoint root hash has {_ROOT_BYTES} bytes, not {len(self.root)}")
        for ext in self.extensions:
            if not ext or "\n" in ext:
                raise ValueError("a checkpoint extension must be one non-empty line")

    def body(self) -> bytes:
        """The note text: ``<origin>\\n<size>\\n<base64 root>\\n`` and the extension lines."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii"), *self.extensions]
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def from_body(cls, body: bytes | str) -> Checkpoint:
        """Parse a checkpoint note text; VerificationFailed("malformed checkpoint: ...") on any defect."""
        if isinstance(body, bytes):
            if len(body) > MAX_NOTE_BYTES:
                raise VerificationFailed("malformed checkpoint: too large")
            try:
                body = body.decode("utf-8", errors="strict")
            except UnicodeDecodeError:
                raise VerificationFailed("malformed checkpoint: not valid UTF-8") from None
        _check_text(body, "checkpoint")
        if not body.endswith("\n"):
            raise VerificationFailed("malformed checkpoint: no final newline")
        lines = body[:-1].split("\n")
        if len(lines) < 3 or any(not line for line in lines):
            raise VerificationFailed("malformed checkpoint: it needs origin, size and root lines, none empty")
        origin, size_text, root_text, *extensions = lines
        size = _decimal(size_text)
        if size is None:
            raise VerificationFailed(f"malformed checkpoint: the size {size_text[:40]!r} is not a decimal")
        try:
            root = b64decode_strict(root_text)
        except ValueError:
            raise VerificationFailed("malformed checkpoint: the root hash is not base64") from None
        if len(root) != _ROOT_BYTES:
            raise VerificationFailed(f"malformed checkpoint: the root hash has {len(root)} bytes")
        return cls(origin, size, root, tuple(extensions))

    def previous_size(self) -> int | None:
        """The size of the checkpoint signed before this one, from its `previous-size N` extension line;
        None for a checkpoint without one (written before the line existed). VerificationFailed for a
        line that is repeated or not a decimal."""
        found = [ext for ext in self.extensions if ext.startswith(PREVIOUS_SIZE + " ")]
        if not found:
            return None
        value = _decimal(found[0][len(PREVIOUS_SIZE) + 1 :])
        if len(found) > 1 or value is None or value >= self.size:
            raise VerificationFailed(f"malformed checkpoint: bad {PREVIOUS_SIZE} line at size {self.size}")
        return value


def sign_checkpoint(checkpoint: Checkpoint, key: SigningKey) -> str:
    """The signed checkpoint note."""
    return sign_note(checkpoint.body().decode("utf-8"), key)


def open_checkpoint(note: str | bytes, key: VerifierKey) -> Checkpoint:
    """The checkpoint in `note` once `key`'s signature verifies; VerificationFailed otherwise."""
    text = open_note(note, key, what="the checkpoint")
    return Checkpoint.from_body(text)


def cosigned_message(body: bytes, timestamp: int) -> bytes:
    """What a cosignature/v1 signs: a header line, a time line, then the checkpoint note text."""
    return b"cosignature/v1\ntime %d\n" % timestamp + body


def cosign(checkpoint: Checkpoint, key: SigningKey, timestamp: int) -> str:
    """One cosignature/v1 signature line (newline included) by witness `key` at POSIX `timestamp`."""
    _require_key_alg(key.alg, ALG_COSIGNATURE_V1, key.ident, "cosigning")
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise ValueError(f"a cosignature timestamp must be between 0 and 2**63-1, not {timestamp}")
    signature = key.sign(cosigned_message(checkpoint.body(), timestamp))
    return NoteSignature(key.name, key.key_id, timestamp.to_bytes(8, "big") + signature).line()


def verify_cosignature(note: str | bytes, key: VerifierKey) -> int:
    """The timestamp of witness `key`'s valid cosignature on checkpoint `note`; VerificationFailed otherwise.

    `note` is the checkpoint note with the cosignature lines among its signatures. If the key cosigned more
    than once, every such line must verify and the latest timestamp is returned.
    """
    _require_key_alg(key.alg, ALG_COSIGNATURE_V1, key.ident, "verifying a cosignature")
    parsed = Note.parse(note)
    Checkpoint.from_body(parsed.text)  # only a well-formed checkpoint is ever cosigned
    body = parsed.text.encode("utf-8")
    mine = parsed.by_key(key.name, key.key_id)
    if not mine:
        raise parsed.missing_key_error(key, "the checkpoint")
    latest = -1
    for sig in mine:
        if len(sig.signature) != _COSIGNATURE_BYTES:
            raise VerificationFailed(f"the cosignature by {key.ident} has the wrong length")
        timestamp = int.from_bytes(sig.signature[:8], "big")
        if timestamp > _MAX_TIMESTAMP or not key.verify(cosigned_message(body, timestamp), sig.signature[8:]):
            raise VerificationFailed(f"the checkpoint has an invalid cosignature by witness key {key.ident}")
        latest = max(latest, timestamp)
    return latest
