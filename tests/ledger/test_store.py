"""The ledger on both stores: indices, signed heads, proofs from stored nodes, reopening, keys, errors."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import sys
import threading
from pathlib import Path

import pytest

from tests.ledger.conftest import ORIGIN, PG_URL, MemoryTree, event, make_ledger
from trainguard.errors import KeyFileError, MissingExtraError, StoreError, UsageError
from trainguard.ledger._keys import SigningKey, VerifierKey
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._merkle import (
    ProofError,
    leaf_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from trainguard.ledger._note import open_checkpoint
from trainguard.ledger._store import open_store
from trainguard.ledger._verify import LedgerExport, verify_ledger


def test_append_returns_indices(location: str, key: SigningKey) -> None:
    with Ledger.open(location, key=key, origin=ORIGIN) as ledger:
        assert ledger.size == 0
        assert ledger.append(event(0)) == 0
        assert ledger.append_many([event(i) for i in range(1, 11)]) == range(1, 11)
        assert ledger.append(event(11)) == 11
        assert ledger.append_many([]) == range(12, 12)
        assert ledger.size == 12
        assert [ledger.entry(i).payload["n"] for i in range(12)] == list(range(12))
        assert [size for size, _ in ledger.checkpoints()] == [1, 11, 12]


def test_head_is_signed_by_the_key(location: str, key: SigningKey) -> None:
    with make_ledger(location, key, [3, 4]) as ledger:
        checkpoint, note = ledger.head()
        assert open_checkpoint(note, key.verifier()) == checkpoint
        assert checkpoint.origin == ORIGIN
        assert checkpoint.size == 7
        leaves = [leaf_hash(event(i).canonical()) for i in range(7)]
        assert checkpoint.root == root_from_leaves(leaves) == ledger.root()
        assert open_checkpoint(ledger.checkpoint(3)[1], key.verifier()).root == root_from_leaves(leaves[:3])


def test_proofs_from_the_store_equal_those_of_a_memory_tree(location: str, key: SigningKey) -> None:
    batches = [1, 2, 5, 1, 8, 3, 13, 1]  # 34 entries, checkpoints at uneven sizes
    with make_ledger(location, key, batches) as ledger:
        n = ledger.size
        leaves = [leaf_hash(event(i).canonical()) for i in range(n)]
        memory = MemoryTree(leaves)
        for size in range(1, n + 1):
            root = ledger.root(size)
            assert root == memory.roots[size] == root_from_leaves(leaves[:size])
            for index in range(size):
                proof = ledger.inclusion_proof(index, size)
                assert proof == _inclusion(memory, index, size)
                verify_inclusion(leaves[index], index, size, proof, root)
            for old in range(1, size + 1):
                proof = ledger.consistency_proof(old, size)
                assert proof == _consistency(memory, old, size)
                verify_consistency(old, size, memory.roots[old], root, proof)


def _inclusion(memory: MemoryTree, index: int, size: int) -> list[bytes]:
    from trainguard.ledger._merkle import inclusion_proof

    return inclusion_proof(index, size, memory)


def _consistency(memory: MemoryTree, old: int, size: int) -> list[bytes]:
    from trainguard.ledger._merkle import consistency_proof

    return consistency_proof(old, size, memory)


def test_one_query_per_proof(location: str, key: SigningKey) -> None:
    """Proofs read the store once, whatever the tree size: every node they need in one nodes() call."""
    with make_ledger(location, key, [100, 27]) as ledger:
        store = ledger.store
        calls = []
        real = store.nodes

        class Counting:
            def nodes(self, keys):  # type: ignore[no-untyped-def]
                calls.append(len(keys))
                return real(keys)

        from trainguard.ledger._merkle import consistency_proof, inclusion_proof

        inclusion_proof(77, 127, Counting())
        consistency_proof(50, 127, Counting())
        assert len(calls) == 2
        assert max(calls) <= 2 * 7 + 1


def test_a_missing_size_is_refused(location: str, key: SigningKey) -> None:
    with make_ledger(location, key, [5]) as ledger:
        with pytest.raises(ProofError):
            ledger.store.nodes([(0, 5)])
        with pytest.raises(Exception, match="no tree of size 6"):
            ledger.root(6)


def test_reopen_persists(location: str, key: SigningKey) -> None:
    with make_ledger(location, key, [4, 6]) as ledger:
        head = ledger.head()
    with Ledger.open(location, key=key) as again:
        assert again.origin == ORIGIN
        assert again.head() == head
        assert again.append(event(10)) == 10
        assert again.verify().ok


def test_threads_share_one_commit(location: str, key: SigningKey) -> None:
    """Group commit: concurrent append() calls get unique indices and share checkpoints."""
    threads, per_thread = 8, 25
    results: list[list[int]] = [[] for _ in range(threads)]
    with Ledger.open(location, key=key, origin=ORIGIN) as ledger:
        start = threading.Barrier(threads)

        def work(t: int) -> None:
            start.wait()
            for i in range(per_thread):
                results[t].append(ledger.append(event(t * 1000 + i)))

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        indices = sorted(i for r in results for i in r)
        assert indices == list(range(threads * per_thread))
        for t, got in enumerate(results):
            assert [ledger.entry(i).payload["n"] for i in got] == [t * 1000 + i for i in range(per_thread)]
        assert len(list(ledger.checkpoints())) <= threads * per_thread
        assert ledger.verify().ok


def test_wrong_key_is_refused(location: str, key: SigningKey) -> None:
    make_ledger(location, key, [2]).close()
    other = SigningKey.generate(ORIGIN)
    with pytest.raises(KeyFileError) as caught:
        Ledger.open(location, key=other)
    assert key.ident in caught.value.message
    assert other.ident in caught.value.message
    with pytest.raises(KeyFileError):
        Ledger.open(location, verifier=other.verifier())


def test_read_only_with_the_verifier(location: str, key: SigningKey) -> None:
    make_ledger(location, key, [3, 2]).close()
    with Ledger.open(location, verifier=key.verifier()) as ledger:
        assert not ledger.can_append
        checkpoint, _ = ledger.head()
        verify_inclusion(
            leaf_hash(ledger.entry(4).canonical()), 4, 5, ledger.inclusion_proof(4), checkpoint.root
        )
        assert ledger.verify().ok
        with pytest.raises(KeyFileError, match="read-only"):
            ledger.append(event(5))


def test_an_export_verifies_without_the_store(location: str, key: SigningKey) -> None:
    with make_ledger(location, key, [3, 9, 1]) as ledger:
        entries = list(ledger.store.entries(0, ledger.size))
        notes = [note for _, note in ledger.checkpoints()]
    report = verify_ledger(LedgerExport(iter(entries), notes), key.verifier())
    assert report.ok, report.problems
    assert report.size == 13
    edited = [*entries[:5], (5, event(99).canonical()), *entries[6:]]
    report = verify_ledger(LedgerExport(iter(edited), notes), key.verifier())
    assert not report.ok
    assert report.first_bad_index == 3  # the checkpoint at 3 holds; the one at 12 does not


def test_a_new_ledger_needs_a_key(location: str) -> None:
    with pytest.raises(StoreError, match=r"no ledger at|no signing key"):
        Ledger.open(location)


def test_a_new_ledger_takes_its_origin_from_its_key(location: str) -> None:
    # A witness finds a log's key by the log's origin, so the two must agree from the start.
    key = SigningKey.generate("example.org/train-ledger")
    with Ledger.open(location, key=key) as ledger:
        assert ledger.origin == "example.org/train-ledger"
        ledger.append(event(0))
        checkpoint, _ = ledger.head()
        assert checkpoint.origin == key.name


def test_an_origin_other_than_the_keys_name_is_refused(location: str, key: SigningKey) -> None:
    with pytest.raises(UsageError, match=r"origin 'elsewhere/log'.*named 'test.example/ledger'") as caught:
        Ledger.open(location, key=key, origin="elsewhere/log")
    assert caught.value.hint is not None and "--name elsewhere/log" in caught.value.hint
    store = open_store(location)
    try:
        assert store.meta() == {}
    finally:
        store.close()


def test_default_ledger_generates_its_key(_home: Path) -> None:
    with Ledger.open() as ledger:
        assert ledger.location == str(_home / "ledger.db")
        assert ledger.origin.startswith("trainguard/")
        assert ledger.origin == ledger.verifier.name
        assert ledger.append(event(0)) == 0
        verifier = ledger.verifier
    key_file = _home / "keys" / "ledger.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert VerifierKey.load(_home / "keys" / "ledger.pub") == verifier
    assert SigningKey.load(key_file).verifier() == verifier
    with Ledger.open() as again:
        assert again.can_append
        assert again.append(event(1)) == 1
        assert again.verify().ok


def test_a_default_key_of_another_ledger_opens_read_only(
    tmp_path: Path, _home: Path, key: SigningKey
) -> None:
    Ledger.open().close()  # creates the default key
    location = str(tmp_path / "other.db")
    make_ledger(location, key, [1]).close()
    with Ledger.open(location) as ledger:
        assert not ledger.can_append
        assert ledger.verify().ok
        with pytest.raises(KeyFileError, match=re.escape(key.ident)):
            ledger.append(event(1))


def test_a_corrupt_file_is_a_store_error(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match=str(path)) as caught:
        Ledger.open(str(path), key=key)
    assert caught.value.hint


def test_another_sqlite_database_is_not_a_ledger(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(StoreError, match="not a trainguard ledger"):
        Ledger.open(str(path), key=key)


def test_a_missing_file_is_not_created_without_a_key(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(StoreError, match="no ledger at"):
        open_store(path, create=False)
    with pytest.raises(StoreError):
        Ledger.open(str(path))
    assert not path.exists()


def test_an_unreachable_server_is_a_store_error() -> None:
    pytest.importorskip("psycopg")
    url = "postgresql://tg:secret-pw@127.0.0.1:1/nowhere"
    with pytest.raises(StoreError) as caught:
        open_store(url)
    text = caught.value.diagnostics()
    assert "127.0.0.1:1" in text
    assert "secret-pw" not in text


def test_postgresql_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MissingExtraError) as caught:
        open_store(PG_URL)
    assert caught.value.extra == "postgresql"


def test_a_locked_sqlite_ledger_is_a_store_error(
    tmp_path: Path, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainguard.ledger import _sqlite

    location = str(tmp_path / "ledger.db")
    ledger = make_ledger(location, key, [1])
    blocker = sqlite3.connect(location, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(_sqlite, "LOCK_TIMEOUT_S", 0.2)
    ledger.close()
    try:
        with Ledger.open(location, key=key) as again, pytest.raises(StoreError, match="locked") as caught:
            again.append(event(1))
        assert location in caught.value.message
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
