"""The witness as a real process over loopback HTTP: cosigning, 409 retry, rollback, fork, restarts.

Attacks: a log that rolls back (truncates) or forks (rewrites) its history after a witness cosigned it must
not obtain a new cosignature (C2SP tlog-witness, https://c2sp.org/tlog-witness).
"""

from __future__ import annotations

import base64
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainguard.errors import UsageError, VerificationFailed
from trainguard.ledger._keys import ALG_COSIGNATURE_V1, SigningKey
from trainguard.ledger._merkle import Frontier, NodeKey, consistency_proof, leaf_hash, root_hash
from trainguard.ledger._note import Checkpoint, cosign, sign_checkpoint, verify_cosignature
from trainguard.ledger._witness import MAX_REQUEST_BYTES
from trainguard.ledger._witness_client import (
    WitnessConflict,
    WitnessRefused,
    WitnessUnreachable,
    add_checkpoint,
    witness_checkpoint,
)

ORIGIN = "example.com/log"
_START_TIMEOUT_S = 30


class MemoryTree:
    """An in-memory Merkle tree that keeps every completed perfect node, as the stores do."""

    def __init__(self, entries: Collection[bytes] = ()) -> None:
        self.frontier = Frontier.empty()
        self.stored: dict[NodeKey, bytes] = {}
        for entry in entries:
            self.append(entry)

    def append(self, entry: bytes) -> None:
        for key, value in self.frontier.append(leaf_hash(entry)):
            self.stored[key] = value

    @property
    def size(self) -> int:
        return self.frontier.size

    def nodes(self, keys: Collection[NodeKey]) -> Mapping[NodeKey, bytes]:
        return {key: self.stored[key] for key in keys}

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(ORIGIN, self.size, root_hash(self.size, self))

    def proof_from(self, old: int) -> list[bytes]:
        return consistency_proof(old, self.size, self)


def _entries(n: int, tag: str = "real") -> list[bytes]:
    return [f"{tag} entry {i}".encode() for i in range(n)]


@dataclass
class Witness:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    stderr_path: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)

    def log(self) -> str:
        return self.stderr_path.read_text()


@dataclass
class Setup:
    tmp: Path
    log_key: SigningKey
    witness_key: SigningKey
    key_path: Path
    state_path: Path
    started: list[Witness]

    def start(self) -> Witness:
        stderr_path = self.tmp / f"witness-{len(self.started)}.log"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trainguard",
                    "witness",
                    "serve",
                    "--key",
                    str(self.key_path),
                    "--log",
                    self.log_key.verifier().text(),
                    "--state",
                    str(self.state_path),
                    "--listen",
                    "127.0.0.1:0",
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        assert process.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        line = b""
        # Wait for the "port N" line; the only wait in these tests.
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([process.stdout], [], [], max(remaining, 0))
            if not ready:
                process.kill()
                pytest.fail(f"witness did not start: {stderr_path.read_text()}")
            chunk = os.read(process.stdout.fileno(), 100)
            if not chunk:
                process.wait()
                pytest.fail(f"witness exited ({process.returncode}): {stderr_path.read_text()}")
            line += chunk
        port = int(line.decode().split()[1])
        witness = Witness(process, f"http://127.0.0.1:{port}", port, stderr_path)
        self.started.append(witness)
        return witness

    def submit(self, witness: Witness, tree: MemoryTree, known_size: int = 0) -> tuple[str, int]:
        latest = tree.checkpoint()
        note = sign_checkpoint(latest, self.log_key)
        return witness_checkpoint(
            witness.url, note, latest, tree.proof_from, self.witness_key.verifier(), known_size=known_size
        )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    witness_key = SigningKey.generate("witness.example/w1", ALG_COSIGNATURE_V1)
    key_path = tmp_path / "witness.key"
    witness_key.save(key_path)
    s = Setup(tmp_path, SigningKey.generate(ORIGIN), witness_key, key_path, tmp_path / "witness.db", [])
    yield s
    for witness in s.started:
        if witness.process.poll() is None:
            witness.process.kill()
            witness.process.wait()
        if witness.process.stdout is not None:
            witness.process.stdout.close()


def _post(witness: Witness, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", witness.port, timeout=10)
    try:
        conn.request("POST", "/add-checkpoint", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def _request(old: int, proof: list[bytes], note: str) -> bytes:
    lines = [f"old {old}\n"] + [base64.b64encode(p).decode() + "\n" for p in proof]
    return ("".join(lines) + "\n" + note).encode()


def test_first_checkpoint_then_growth_are_cosigned(setup: Setup) -> None:
    witness = setup.start()
    tree = MemoryTree(_entries(5))
    before = int(time.time())
    line, timestamp = setup.submit(witness, tree)
    assert before <= timestamp <= int(time.time()) + 1
    note = sign_checkpoint(tree.checkpoint(), setup.log_key)
    assert verify_cosignature(note + line, setup.witness_key.verifier()) == timestamp

    for extra in (1, 2, 8, 100):  # growth, with valid consistency proofs from the cosigned size
        old = tree.size
        for entry in _entries(extra, f"batch {old}"):
            tree.append(entry)
        line, _ = setup.submit(witness, tree, known_size=old)
        assert line.startswith("\u2014 witness.example/w1 ")

    # The same checkpoint again: cosigned again.
    setup.submit(witness, tree, known_size=tree.size)
    assert witness.stop() == 0
    log = witness.log()
    assert f"origin='{ORIGIN}' size=5 (was 0)" in log
    assert f"origin='{ORIGIN}' size=116 (was 16)" in log


def test_stale_old_size_gets_409_with_the_witness_size_and_the_client_retries(setup: Setup) -> None:
    witness = setup.start()
    tree = MemoryTree(_entries(7))
    setup.submit(witness, tree)
    tree.append(b"one more")
    note = sign_checkpoint(tree.checkpoint(), setup.log_key)

    with pytest.raises(WitnessConflict) as info:
        add_checkpoint(witness.url, note, 0, [])
    assert info.value.witness_size == 7
    status, content_type, body = _post(witness, _request(3, tree.proof_from(3), note))
    assert (status, content_type, body) == (409, "text/x.tlog.size", "7\n")

    # witness_checkpoint starts from a stale size (0, then 3) and recovers with the witness's size.
    setup.submit(witness, tree, known_size=0)
    tree.append(b"and another")
    setup.submit(witness, tree, known_size=3)
    assert "old size 0, but the witness has cosigned size 7" in witness.log()


def test_rollback_is_detected(setup: Setup) -> None:
    witness = setup.start()
    setup.submit(witness, MemoryTree(_entries(10)))
    truncated = MemoryTree(_entries(6))  # the same history, with the last four entries removed
    with pytest.raises(VerificationFailed) as info:
        setup.submit(witness, truncated, known_size=6)
    assert info.value.message == (
        f"rollback: the witness has cosigned size 10 for origin {ORIGIN}, the log now has only 6 entries"
    )


def test_fork_at_the_same_size_is_detected(setup: Setup) -> None:
    witness = setup.start()
    setup.submit(witness, MemoryTree(_entries(10)))
    forged = MemoryTree([*_entries(4), b"edited entry", *_entries(10)[5:]])
    for known in (0, 10):
        with pytest.raises(VerificationFailed, match=r"^fork: .* different root at size 10"):
            setup.submit(witness, forged, known_size=known)
    assert "FORK at size 10" in witness.log()


def test_fork_with_a_longer_rewritten_history_is_detected(setup: Setup) -> None:
    witness = setup.start()
    setup.submit(witness, MemoryTree(_entries(10)))
    forged = MemoryTree(_entries(3) + _entries(12, "rewritten"))
    with pytest.raises(VerificationFailed) as info:
        setup.submit(witness, forged, known_size=10)
    assert info.value.message.startswith("fork: ")
    assert "size 10" in info.value.message and "15" in info.value.message
    # The witness kept its state: the honest log still grows from size 10.
    honest = MemoryTree(_entries(10) + _entries(2, "new"))
    setup.submit(witness, honest, known_size=10)


def test_a_forged_proof_is_refused_with_422(setup: Setup) -> None:
    witness = setup.start()
    tree = MemoryTree(_entries(10))
    setup.submit(witness, tree)
    tree.append(b"x")
    note = sign_checkpoint(tree.checkpoint(), setup.log_key)
    proof = tree.proof_from(10)
    proof[0] = bytes(32)
    status, _, _ = _post(witness, _request(10, proof, note))
    assert status == 422


def test_wrong_log_key_or_unknown_origin_is_refused(setup: Setup) -> None:
    witness = setup.start()
    tree = MemoryTree(_entries(3))
    impostor = SigningKey.generate(ORIGIN)
    note = sign_checkpoint(tree.checkpoint(), impostor)
    with pytest.raises(WitnessRefused) as info:
        add_checkpoint(witness.url, note, 0, [])
    assert info.value.status == 403
    assert witness.url in info.value.message and impostor.verifier().ident in info.value.message

    other = Checkpoint("other.example/log", 3, tree.checkpoint().root)
    with pytest.raises(WitnessRefused) as info:
        add_checkpoint(witness.url, sign_checkpoint(other, SigningKey.generate("other.example/log")), 0, [])
    assert info.value.status == 404


def test_a_cosignature_by_another_witness_key_is_not_accepted(setup: Setup) -> None:
    witness = setup.start()
    tree = MemoryTree(_entries(3))
    latest = tree.checkpoint()
    note = sign_checkpoint(latest, setup.log_key)
    other = SigningKey.generate("witness.example/w1", ALG_COSIGNATURE_V1)
    with pytest.raises(VerificationFailed, match="no valid cosignature"):
        witness_checkpoint(witness.url, note, latest, tree.proof_from, other.verifier())


def test_malformed_requests_get_400(setup: Setup) -> None:
    witness = setup.start()
    tree = MemoryTree(_entries(4))
    note = sign_checkpoint(tree.checkpoint(), setup.log_key)
    good_hash = base64.b64encode(bytes(32)).decode()
    bodies = [
        b"",
        b"garbage",
        b"old 0\n" + note.encode(),  # no empty line before the checkpoint
        b"old 00\n\n" + note.encode(),
        b"old -1\n\n" + note.encode(),
        b"old x\n\n" + note.encode(),
        b"old 5\n\n" + note.encode(),  # above the checkpoint size
        b"old 0\n" + good_hash.encode() + b"\n\n" + note.encode(),  # a proof from size 0
        b"old 1\nnot base64!\n\n" + note.encode(),
        b"old 1\nAAAA\n\n" + note.encode(),  # not a 32-byte hash
        ("old 1\n" + (good_hash + "\n") * 64 + "\n").encode() + note.encode(),
        b"\xff\xfeold 0\n\n" + note.encode(),
        b"old 0\n\nnot a note\n",
        b"old 0\n\n" + note.replace("\n\n", "\n\x01\n").encode(),
        _request(0, [], sign_checkpoint(tree.checkpoint(), setup.log_key).replace("\n4\n", "\n04\n")),
    ]
    for body in bodies:
        status, _, text = _post(witness, body)
        assert status == 400, (body, status, text)
    assert _post(witness, _request(0, [], note))[0] == 200  # the witness still works


def test_oversized_and_unframed_requests(setup: Setup) -> None:
    witness = setup.start()
    conn = http.client.HTTPConnection("127.0.0.1", witness.port, timeout=10)
    try:
        conn.putrequest("POST", "/add-checkpoint")
        conn.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    status, _, _ = _post(witness, b"x" * (MAX_REQUEST_BYTES + 1))
    assert status == 413
    conn = http.client.HTTPConnection("127.0.0.1", witness.port, timeout=10)
    try:
        conn.request("POST", "/add-checkpoint", body=iter([b"old 0\n"]), encode_chunked=True)
        assert conn.getresponse().status == 411
    finally:
        conn.close()
    assert _post(witness, b"old 0\n\n", {})[0] == 400
    conn = http.client.HTTPConnection("127.0.0.1", witness.port, timeout=10)
    try:
        conn.request("GET", "/")
        assert conn.getresponse().status == 404
    finally:
        conn.close()


def test_state_survives_a_restart(setup: Setup) -> None:
    witness = setup.start()
    setup.submit(witness, MemoryTree(_entries(10)))
    assert witness.stop() == 0
    assert "witness stopped" in witness.log()

    witness = setup.start()
    with pytest.raises(VerificationFailed, match="rollback: the witness has cosigned size 10"):
        setup.submit(witness, MemoryTree(_entries(9)), known_size=9)
    with pytest.raises(VerificationFailed, match=r"^fork: "):
        setup.submit(witness, MemoryTree(_entries(10, "other")), known_size=10)
    setup.submit(witness, MemoryTree(_entries(12)), known_size=10)
    witness.process.send_signal(signal.SIGINT)
    assert witness.process.wait(timeout=15) == 0

    witness = setup.start()
    with pytest.raises(WitnessConflict) as info:
        add_checkpoint(
            witness.url, sign_checkpoint(MemoryTree(_entries(13)).checkpoint(), setup.log_key), 0, []
        )
    assert info.value.witness_size == 12


def test_unreachable_witness_is_a_usage_error_naming_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    key = SigningKey.generate(ORIGIN)
    note = sign_checkpoint(MemoryTree(_entries(1)).checkpoint(), key)
    with pytest.raises(WitnessUnreachable) as info:
        add_checkpoint(url, note, 0, [], timeout=5)
    assert url in info.value.message
    assert info.value.exit_code == UsageError.exit_code
    with pytest.raises(UsageError, match="not an http"):
        add_checkpoint("file:///etc/passwd", note, 0, [])


def test_witness_refuses_to_start_with_a_log_key_as_its_key(setup: Setup, tmp_path: Path) -> None:
    log_key_path = tmp_path / "log.key"
    setup.log_key.save(log_key_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainguard",
            "witness",
            "serve",
            "--key",
            str(log_key_path),
            "--log",
            setup.log_key.verifier().text(),
            "--state",
            str(tmp_path / "w.db"),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"wrong kind of key" in result.stderr


def test_cosign_lines_from_the_witness_match_local_cosign(setup: Setup) -> None:
    # The witness's line is exactly what cosign() produces for the same key and timestamp.
    witness = setup.start()
    tree = MemoryTree(_entries(2))
    line, timestamp = setup.submit(witness, tree)
    assert line == cosign(tree.checkpoint(), setup.witness_key, timestamp)
