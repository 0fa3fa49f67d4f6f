"""Real processes: a writer killed mid-append loses nothing it reported; concurrent writers stay safe."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

from tests.ledger.conftest import ORIGIN
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._merkle import verify_consistency
from trainguard.ledger._note import open_checkpoint

# Appends batches of events tagged (worker, seq) and prints "first last" once each append has returned.
WRITER = textwrap.dedent(
    """
    import os, sys
    from trainguard.ledger._events import new_event
    from trainguard.ledger._keys import SigningKey
    from trainguard.ledger._ledger import Ledger

    location, worker, batches, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    key = SigningKey.from_text(os.environ["TG_TEST_KEY"])
    seq = 0
    with Ledger.open(location, key=key) as ledger:
        for _ in range(batches):
            events = [new_event("test.write", {"worker": worker, "seq": seq + i}) for i in range(batch)]
            done = ledger.append_many(events)
            seq += batch
            print(done.start, done.stop - 1, flush=True)
    """
)


def _writer(location: str, key: SigningKey, worker: int, batches: int, batch: int) -> subprocess.Popen[str]:
    env = {**os.environ, "TG_TEST_KEY": key.text()}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, location, str(worker), str(batches), str(batch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _committed(output: str) -> list[tuple[int, int]]:
    """The ranges a writer reported; a line cut short by the kill is not a report."""
    ranges = []
    for line in output.splitlines(keepends=True):
        if line.endswith("\n"):
            first, last = line.split()
            ranges.append((int(first), int(last)))
    return ranges


def _check_consistent(ledger: Ledger, key: SigningKey) -> None:
    """Every stored checkpoint is signed, and each extends the one before it."""
    previous = None
    for size, note in ledger.checkpoints():
        checkpoint = open_checkpoint(note, key.verifier())
        assert checkpoint.size == size
        if previous is not None:
            proof = ledger.consistency_proof(previous.size, size)
            verify_consistency(previous.size, size, previous.root, checkpoint.root, proof)
        previous = checkpoint


def test_sigkill_mid_append(location: str, key: SigningKey) -> None:
    """Each writer is killed at a random moment; every append it reported is in the ledger, which verifies."""
    Ledger.open(location, key=key, origin=ORIGIN).close()
    iterations = 10 if location.endswith(".db") else 4
    rng = random.Random(os.getpid())
    for worker in range(iterations):
        batch = rng.choice([1, 7, 50])
        child = _writer(location, key, worker, batches=100_000, batch=batch)
        assert child.stdout is not None
        lines = []
        for _ in range(rng.randrange(0, 12)):
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
        time.sleep(rng.uniform(0, 0.01))
        child.send_signal(signal.SIGKILL)
        rest, err = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, err
        ranges = _committed("".join(lines) + rest)
        with Ledger.open(location, verifier=key.verifier()) as ledger:
            report = ledger.verify()
            assert report.ok, report.problems
            seq = 0
            for first, last in ranges:
                assert last - first + 1 == batch
                for index in range(first, last + 1):
                    payload = ledger.entry(index).payload
                    assert (payload["worker"], payload["seq"]) == (worker, seq)
                    seq += 1
    with Ledger.open(location, verifier=key.verifier()) as ledger:
        _check_consistent(ledger, key)


def test_concurrent_writers(location: str, key: SigningKey) -> None:
    """Eight processes append at once: every event lands exactly once, indices are 0..N-1, all verifies."""
    Ledger.open(location, key=key, origin=ORIGIN).close()
    workers, batches, batch = 8, 12, 40
    children = [_writer(location, key, w, batches, batch) for w in range(workers)]
    reported: list[list[tuple[int, int]]] = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        reported.append(_committed(out))
    total = workers * batches * batch
    with Ledger.open(location, verifier=key.verifier()) as ledger:
        assert ledger.size == total
        seen: dict[tuple[int, int], int] = {}
        indices = []
        for index, event in ledger.entries():
            indices.append(index)
            tag = (event.payload["worker"], event.payload["seq"])
            assert tag not in seen, f"{tag} stored twice"
            seen[tag] = index
        assert indices == list(range(total))
        assert set(seen) == {(w, s) for w in range(workers) for s in range(batches * batch)}
        for w, ranges in enumerate(reported):
            assert len(ranges) == batches
            for r, (first, last) in enumerate(ranges):
                assert [seen[(w, r * batch + i)] for i in range(batch)] == list(range(first, last + 1))
        report = ledger.verify()
        assert report.ok, report.problems
        assert report.size == total
        _check_consistent(ledger, key)
