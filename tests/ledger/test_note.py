"""Signed notes, checkpoints and cosignatures, with the golang.org/x/mod/sumdb/note vectors."""

from __future__ import annotations

import base64
import hashlib

import pytest

from trainguard.errors import KeyFileError, VerificationFailed
from trainguard.ledger._keys import ALG_COSIGNATURE_V1, SigningKey, VerifierKey
from trainguard.ledger._note import (
    MAX_SIGNATURES,
    Checkpoint,
    Note,
    add_signatures,
    cosign,
    cosigned_message,
    open_checkpoint,
    open_note,
    sign_checkpoint,
    sign_note,
    verify_cosignature,
)

# golang.org/x/mod/sumdb/note note_test.go (TestSign, TestOpen)
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_B64 = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
ENOCH_B64 = "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ="
PETER_SIG = f"\u2014 PeterNeumann {PETER_B64}\n"
ENOCH_SIG = f"\u2014 EnochRoot {ENOCH_B64}\n"

ROOT = hashlib.sha256(b"root").digest()


def test_signing_reproduces_the_go_note_byte_for_byte() -> None:
    # Ed25519 is deterministic (RFC 8032): same seed and text, same signature as the reference.
    assert sign_note(TEXT, SigningKey.from_text(PETER_SKEY)) == TEXT + "\n" + PETER_SIG


def test_open_go_note_with_unknown_signatures_ignored() -> None:
    peter, enoch = VerifierKey.from_text(PETER_VKEY), VerifierKey.from_text(ENOCH_VKEY)
    note = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(note, peter) == TEXT
    assert open_note(note, enoch) == TEXT
    assert open_note(note.encode(), peter) == TEXT
    assert [sig.ident for sig in Note.parse(note).signatures] == [
        "PeterNeumann+c74f20a3",
        "EnochRoot+af0cfe78",
    ]
    assert Note.parse(note).render() == note


def test_tampered_text_or_signature_fails() -> None:
    peter = VerifierKey.from_text(PETER_VKEY)
    with pytest.raises(VerificationFailed, match="invalid signature by key PeterNeumann"):
        open_note(TEXT.replace("cryptography", "cryptographY") + "\n" + PETER_SIG, peter)
    # As TestOpen "Invalid signature": four characters spliced into the signature.
    with pytest.raises(VerificationFailed, match="invalid signature"):
        open_note(TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:], peter)
    # A valid signature by the key does not excuse a bad one next to it.
    bad = PETER_SIG[:40] + ("A" if PETER_SIG[40] != "A" else "B") + PETER_SIG[41:]
    with pytest.raises(VerificationFailed, match="invalid signature"):
        open_note(TEXT + "\n" + PETER_SIG + bad, peter)


def test_key_swap_names_expected_and_found_keys() -> None:
    enoch = VerifierKey.from_text(ENOCH_VKEY)
    with pytest.raises(VerificationFailed) as info:
        open_note(TEXT + "\n" + PETER_SIG, enoch)
    assert "EnochRoot+af0cfe78" in info.value.message
    assert "PeterNeumann+c74f20a3" in info.value.message

    # Same name, another key: the classic key swap.
    log = SigningKey.generate("example.com/log")
    impostor = SigningKey.generate("example.com/log")
    note = sign_checkpoint(Checkpoint("example.com/log", 3, ROOT), impostor)
    with pytest.raises(VerificationFailed) as info:
        open_checkpoint(note, log.verifier())
    assert log.verifier().ident in info.value.message
    assert impostor.verifier().ident in info.value.message
    assert info.value.hint is not None and "same name" in info.value.hint


BAD_NOTES = [
    TEXT,
    TEXT + "\n",
    TEXT + "\n" + PETER_SIG[:-1],
    "\x01" + TEXT + "\n" + PETER_SIG,
    TEXT + "\n" + f"\u2014 Bad Name {PETER_B64}",
    TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    TEXT + "\n" + PETER_SIG.replace("\u2014", "-"),
    TEXT + "\n" + "\u2014 PeterNeumann AAAA\n",  # too short to hold a key id and a signature
    TEXT + "\n" + "\u2014 PeterNeumann x08go!\n",
    TEXT + "\n" + "\u2014 PeterNeumann\n",
    TEXT.replace("\n", "\r\n") + "\n" + PETER_SIG,
    TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1),
    "a" * (1 << 20) + "\n\n" + PETER_SIG,
    "\ud800" + TEXT + "\n" + PETER_SIG,
]


@pytest.mark.parametrize("note", BAD_NOTES)
def test_malformed_notes_are_refused(note: str) -> None:
    with pytest.raises(VerificationFailed, match="malformed note"):
        open_note(note, VerifierKey.from_text(PETER_VKEY))


def test_invalid_utf8_bytes_are_refused() -> None:
    with pytest.raises(VerificationFailed, match="UTF-8"):
        Note.parse(b"\xff" + (TEXT + "\n" + PETER_SIG).encode())


def test_up_to_the_signature_limit_is_accepted() -> None:
    note = TEXT + "\n" + PETER_SIG * MAX_SIGNATURES
    assert open_note(note, VerifierKey.from_text(PETER_VKEY)) == TEXT


def test_checkpoint_body_and_round_trip() -> None:
    key = SigningKey.generate("example.com/log")
    checkpoint = Checkpoint("example.com/log", 20852163, ROOT, ("ext one",))
    body = checkpoint.body()
    assert body == b"example.com/log\n20852163\n" + base64.b64encode(ROOT) + b"\next one\n"
    assert Checkpoint.from_body(body) == checkpoint
    note = sign_checkpoint(checkpoint, key)
    assert note.startswith(body.decode() + "\n\u2014 example.com/log ")
    assert open_checkpoint(note, key.verifier()) == checkpoint
    empty = Checkpoint("example.com/log", 0, hashlib.sha256(b"").digest())
    assert Checkpoint.from_body(empty.body()).size == 0


@pytest.mark.parametrize(
    "body",
    [
        "example.com/log\n5\n",
        "example.com/log\n05\n{root}\n",
        "example.com/log\n-5\n{root}\n",
        "example.com/log\n+5\n{root}\n",
        "example.com/log\n 5\n{root}\n",
        "example.com/log\n99999999999999999999\n{root}\n",
        "example.com/log\n5\n{root}",
        "example.com/log\n5\n{root}\n\n",
        "\n5\n{root}\n",
        "example.com/log\n5\nAAAA\n",
        "example.com/log\n5\n{root}x\n",
        "example.com/log\n\u0665\n{root}\n",  # a non-ASCII digit
    ],
)
def test_malformed_checkpoints_are_refused(body: str) -> None:
    with pytest.raises(VerificationFailed, match="malformed checkpoint"):
        Checkpoint.from_body(body.format(root=base64.b64encode(ROOT).decode()).encode())


def test_signed_non_checkpoint_is_refused() -> None:
    key = SigningKey.generate("example.com/log")
    with pytest.raises(VerificationFailed, match="malformed checkpoint"):
        open_checkpoint(sign_note("hello\n", key), key.verifier())


def test_checkpoint_constructor_validates() -> None:
    with pytest.raises(ValueError):
        Checkpoint("", 1, ROOT)
    with pytest.raises(ValueError):
        Checkpoint("o\nx", 1, ROOT)
    with pytest.raises(ValueError):
        Checkpoint("o", -1, ROOT)
    with pytest.raises(ValueError):
        Checkpoint("o", 1, ROOT[:31])
    with pytest.raises(ValueError):
        Checkpoint("o", 1, ROOT, ("",))


def test_sign_note_refuses_bad_text() -> None:
    key = SigningKey.generate("k")
    for text in ("no newline", "tab\there\n"):
        with pytest.raises(ValueError):
            sign_note(text, key)


def test_cosignature_round_trip_and_timestamp() -> None:
    log = SigningKey.generate("example.com/log")
    witness = SigningKey.generate("witness.example/w1", ALG_COSIGNATURE_V1)
    checkpoint = Checkpoint("example.com/log", 42, ROOT)
    note = sign_checkpoint(checkpoint, log)
    line = cosign(checkpoint, witness, 1679315147)
    assert line.startswith("\u2014 witness.example/w1 ") and line.endswith("\n")
    raw = base64.b64decode(line.split(" ")[2])
    assert raw[:4] == witness.key_id
    assert int.from_bytes(raw[4:12], "big") == 1679315147
    # The signed message is the tlog-cosignature/v1 one.
    message = b"cosignature/v1\ntime 1679315147\n" + checkpoint.body()
    assert cosigned_message(checkpoint.body(), 1679315147) == message
    assert witness.verifier().verify(message, raw[12:])

    cosigned = add_signatures(note, line)
    assert verify_cosignature(cosigned, witness.verifier()) == 1679315147
    assert open_checkpoint(cosigned, log.verifier()) == checkpoint  # the log signature still opens
    # The latest of several cosignatures is reported.
    later = add_signatures(cosigned, cosign(checkpoint, witness, 1679315200))
    assert verify_cosignature(later, witness.verifier()) == 1679315200


def test_cosignature_failures() -> None:
    log = SigningKey.generate("example.com/log")
    witness = SigningKey.generate("witness.example/w1", ALG_COSIGNATURE_V1)
    other = SigningKey.generate("witness.example/w2", ALG_COSIGNATURE_V1)
    checkpoint = Checkpoint("example.com/log", 42, ROOT)
    note = sign_checkpoint(checkpoint, log)
    line = cosign(checkpoint, witness, 1000)

    with pytest.raises(VerificationFailed, match=r"witness\.example/w2"):
        verify_cosignature(add_signatures(note, line), other.verifier())
    # The cosignature does not transfer to another checkpoint.
    moved = sign_checkpoint(Checkpoint("example.com/log", 43, ROOT), log)
    with pytest.raises(VerificationFailed, match="invalid cosignature"):
        verify_cosignature(add_signatures(moved, line), witness.verifier())
    # Changing the timestamp breaks the signature.
    raw = bytearray(base64.b64decode(line.split(" ")[2]))
    raw[11] ^= 1
    forged = f"\u2014 witness.example/w1 {base64.b64encode(bytes(raw)).decode()}\n"
    with pytest.raises(VerificationFailed, match="invalid cosignature"):
        verify_cosignature(add_signatures(note, forged), witness.verifier())
    with pytest.raises(ValueError):
        cosign(checkpoint, witness, -1)
    with pytest.raises(ValueError):
        cosign(checkpoint, witness, 1 << 63)


def test_key_kinds_are_not_interchangeable() -> None:
    log = SigningKey.generate("example.com/log")
    witness = SigningKey.generate("witness.example/w1", ALG_COSIGNATURE_V1)
    checkpoint = Checkpoint("example.com/log", 1, ROOT)
    with pytest.raises(KeyFileError, match="wrong kind"):
        sign_checkpoint(checkpoint, witness)
    with pytest.raises(KeyFileError, match="wrong kind"):
        cosign(checkpoint, log, 1)
    note = sign_checkpoint(checkpoint, log)
    with pytest.raises(KeyFileError, match="wrong kind"):
        open_checkpoint(note, witness.verifier())
    with pytest.raises(KeyFileError, match="wrong kind"):
        verify_cosignature(note, log.verifier())
