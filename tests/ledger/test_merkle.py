"""The Merkle tree against RFC 9162's own recursive definitions, the transparency-dev vectors and pymerkle."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.errors import UsageError, VerificationFailed
from trainguard.ledger._merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    Frontier,
    NodeKey,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    perfect_cover,
    root_from_leaves,
    root_hash,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "vectors" / "rfc9162" / "testdata"


# --- The RFC 9162 section 2.1 definitions, transcribed as literally as possible -------------------------


def _k(n: int) -> int:
    """The largest power of two smaller than n."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over raw entries."""
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(n)
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n])."""
    n = len(d)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b)."""
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) for 0 < m < n."""
    return subproof(m, d, True)


# --- An in-memory node store fed by Frontier, as a database-backed store is -------------------------------


class MemoryNodes:
    """Every perfect node that Frontier.append reports, with a count of nodes() calls."""

    def __init__(self) -> None:
        self.table: dict[NodeKey, bytes] = {}
        self.frontier = Frontier.empty()
        self.calls = 0

    def add(self, entry: bytes) -> None:
        for key, value in self.frontier.append(leaf_hash(entry)):
            assert key not in self.table
            self.table[key] = value

    def nodes(self, keys: Collection[NodeKey]) -> Mapping[NodeKey, bytes]:
        self.calls += 1
        return {key: self.table[key] for key in keys}


def entries(n: int) -> list[bytes]:
    return [f"entry {i}".encode() for i in range(n)]


def build(n: int) -> MemoryNodes:
    source = MemoryNodes()
    for e in entries(n):
        source.add(e)
    return source


# --- transparency-dev/merkle test vectors ---------------------------------------------------------------


def _vector_files(kind: str) -> list[Path]:
    return sorted((VECTORS / kind).rglob("*.json"))


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


def _ids(files: list[Path]) -> list[str]:
    return [str(f.relative_to(VECTORS)) for f in files]


def test_vectors_present() -> None:
    assert len(_vector_files("inclusion")) > 50
    assert len(_vector_files("consistency")) > 50


@pytest.mark.parametrize("vector", _vector_files("inclusion"), ids=_ids(_vector_files("inclusion")))
def test_inclusion_vector(vector: Path) -> None:
    case: dict[str, Any] = json.loads(vector.read_text())
    args = (
        _b64(case["leafHash"]),
        case["leafIdx"],
        case["treeSize"],
        [_b64(p) for p in case["proof"] or []],
        _b64(case["root"]),
    )
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("vector", _vector_files("consistency"), ids=_ids(_vector_files("consistency")))
def test_consistency_vector(vector: Path) -> None:
    case: dict[str, Any] = json.loads(vector.read_text())
    args = (
        case["size1"],
        case["size2"],
        _b64(case["root1"]),
        _b64(case["root2"]),
        [_b64(p) for p in case["proof"] or []],
    )
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


# --- Hashing and covers -------------------------------------------------------------------------------


def test_hashes() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    assert root_from_leaves([]) == EMPTY_ROOT
    assert Frontier.empty().root() == EMPTY_ROOT
    assert root_hash(0, MemoryNodes()) == EMPTY_ROOT


def test_rfc9162_seven_leaf_example() -> None:
    # RFC 9162 2.1.5: the inclusion proof for d0 in the 7-leaf tree is [b, h, l].
    d = entries(7)
    source = build(7)
    b = mth(d[1:2])
    h = mth(d[2:4])
    l_ = mth(d[4:7])
    assert inclusion_proof(0, 7, source) == [b, h, l_]
    # PROOF(3, D[7]) = [c, d, g, l]; PROOF(4, D[7]) = [l]; PROOF(6, D[7]) = [i, j, k].
    assert consistency_proof(3, 7, source) == [mth(d[2:3]), mth(d[3:4]), mth(d[0:2]), l_]
    assert consistency_proof(4, 7, source) == [l_]
    assert consistency_proof(6, 7, source) == [mth(d[4:6]), mth(d[6:7]), mth(d[0:4])]


@given(st.integers(0, 5000), st.integers(0, 5000))
def test_perfect_cover(a: int, b: int) -> None:
    start, end = min(a, b), max(a, b)
    cover = perfect_cover(start, end)
    position = start
    for level, index in cover:
        assert index << level == position
        position += 1 << level
    assert position == end
    assert len(cover) <= 2 * max(end - start, 1).bit_length()
    # Maximal: no two neighbours form a larger aligned block.
    for (l1, i1), (l2, i2) in itertools.pairwise(cover):
        assert not (l1 == l2 and i1 % 2 == 0 and i2 == i1 + 1)


def test_perfect_cover_rejects_bad_ranges() -> None:
    with pytest.raises(UsageError):
        perfect_cover(5, 4)
    with pytest.raises(UsageError):
        perfect_cover(-1, 4)
    assert perfect_cover(3, 3) == []


# --- Generation and verification against the definitions ----------------------------------------------

_sizes = st.integers(1, 300)


@settings(max_examples=150, deadline=None)
@given(_sizes, st.data())
def test_inclusion_matches_rfc(n: int, data: st.DataObject) -> None:
    d = entries(n)
    source = build(n)
    size = data.draw(st.integers(1, n), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    source.calls = 0
    got = inclusion_proof(index, size, source)
    assert source.calls <= 1
    assert got == path(index, d[:size])
    root = mth(d[:size])
    verify_inclusion(leaf_hash(d[index]), index, size, got, root)
    if size > 1:
        with pytest.raises(ProofError):
            verify_inclusion(leaf_hash(d[(index + 1) % size]), index, size, got, root)


@settings(max_examples=150, deadline=None)
@given(_sizes, st.data())
def test_consistency_matches_rfc(n: int, data: st.DataObject) -> None:
    d = entries(n)
    source = build(n)
    new = data.draw(st.integers(1, n), label="new")
    old = data.draw(st.integers(1, new), label="old")
    source.calls = 0
    got = consistency_proof(old, new, source)
    assert source.calls <= 1
    assert got == ([] if old == new else proof(old, d[:new]))
    verify_consistency(old, new, mth(d[:old]), mth(d[:new]), got)
    if old < new:
        with pytest.raises(ProofError):
            verify_consistency(old, new, mth(d[: old - 1]), mth(d[:new]), got)
        with pytest.raises(ProofError):
            verify_consistency(old, new, mth(d[:old]), mth(d[: new - 1]), got)


@settings(max_examples=200, deadline=None)
@given(_sizes, st.data())
def test_flipped_bit_fails_inclusion(n: int, data: st.DataObject) -> None:
    d = entries(n)
    source = build(n)
    index = data.draw(st.integers(0, n - 1), label="index")
    leaf = leaf_hash(d[index])
    root = root_hash(n, source)
    good = inclusion_proof(index, n, source)
    # Which value to damage: the leaf, the root, or one proof hash.
    target = data.draw(st.integers(-2, len(good) - 1), label="target")
    bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1), label="bit")

    def flip(h: bytes) -> bytes:
        b = bytearray(h)
        b[bit // 8] ^= 1 << (bit % 8)
        return bytes(b)

    bad = list(good)
    if target == -2:
        leaf = flip(leaf)
    elif target == -1:
        root = flip(root)
    else:
        bad[target] = flip(bad[target])
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, n, bad, root)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 300), st.data())
def test_flipped_bit_fails_consistency(n: int, data: st.DataObject) -> None:
    source = build(n)
    old = data.draw(st.integers(1, n - 1), label="old")
    old_root, new_root = root_hash(old, source), root_hash(n, source)
    good = consistency_proof(old, n, source)
    target = data.draw(st.integers(-2, len(good) - 1), label="target")
    bit = data.draw(st.integers(0, HASH_SIZE * 8 - 1), label="bit")

    def flip(h: bytes) -> bytes:
        b = bytearray(h)
        b[bit // 8] ^= 1 << (bit % 8)
        return bytes(b)

    bad = list(good)
    if target == -2:
        old_root = flip(old_root)
    elif target == -1:
        new_root = flip(new_root)
    else:
        bad[target] = flip(bad[target])
    with pytest.raises(ProofError):
        verify_consistency(old, n, old_root, new_root, bad)


@settings(max_examples=100, deadline=None)
@given(_sizes, st.data())
def test_wrong_claims_fail(n: int, data: st.DataObject) -> None:
    """A valid proof presented for another index, a doubled size, or with a hash added or removed, fails."""
    d = entries(n)
    source = build(n)
    index = data.draw(st.integers(0, n - 1), label="index")
    good = inclusion_proof(index, n, source)
    leaf, root = leaf_hash(d[index]), mth(d)
    other_index = data.draw(st.integers(0, n).filter(lambda i: i != index), label="other_index")
    with pytest.raises(ProofError):
        verify_inclusion(leaf, other_index, n, good, root)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, 2 * n, good, root)
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, n, [*good, root], root)
    if good:
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, n, good[:-1], root)


def test_frontier_root_every_prefix() -> None:
    d = entries(300)
    frontier = Frontier.empty()
    roots = [frontier.root()]
    for e in d:
        frontier.append(leaf_hash(e))
        roots.append(frontier.root())
    assert [mth(d[:size]) for size in range(301)] == roots
    rebuilt = Frontier(frontier.size, frontier.hashes)
    assert rebuilt.root() == roots[-1]
    assert len(frontier.hashes) == len(Frontier.keys(300))


def test_root_hash_every_size() -> None:
    d = entries(300)
    source = build(300)
    for size in range(301):
        source.calls = 0
        assert root_hash(size, source) == mth(d[:size])
        assert source.calls == (1 if size else 0)
        assert root_from_leaves([leaf_hash(e) for e in d[:size]]) == mth(d[:size])


def test_frontier_append_reports_every_node() -> None:
    source = build(64)
    # 64 leaves, 32 + 16 + 8 + 4 + 2 + 1 interior nodes.
    assert len(source.table) == 127
    assert source.table[(6, 0)] == mth(entries(64))
    f = Frontier.empty()
    assert [key for key, _ in f.append(leaf_hash(b"x"))] == [(0, 0)]
    assert [key for key, _ in f.append(leaf_hash(b"y"))] == [(0, 1), (1, 0)]
    assert f.size == 2


def test_frontier_resumes_from_stored_nodes() -> None:
    source = build(77)
    resumed = Frontier(77, [source.table[k] for k in Frontier.keys(77)])
    full = build(77)
    for e in entries(90)[77:]:
        for key, value in resumed.append(leaf_hash(e)):
            source.table[key] = value
        full.add(e)
    assert resumed.root() == full.frontier.root()
    assert source.table == full.table


def test_frontier_rejects_bad_state() -> None:
    with pytest.raises(ValueError):
        Frontier(3, [EMPTY_ROOT])
    with pytest.raises(ValueError):
        Frontier(1, [b"short"])
    with pytest.raises(ValueError):
        Frontier(-1, [])
    with pytest.raises(ValueError):
        Frontier.empty().append(b"not a hash")


def test_generators_refuse_impossible_requests() -> None:
    source = build(5)
    with pytest.raises(UsageError):
        inclusion_proof(5, 5, source)
    with pytest.raises(UsageError):
        inclusion_proof(-1, 5, source)
    with pytest.raises(UsageError):
        consistency_proof(6, 5, source)
    with pytest.raises(UsageError):
        root_hash(-1, source)
    assert consistency_proof(0, 5, source) == []
    assert consistency_proof(5, 5, source) == []
    assert inclusion_proof(0, 1, source) == []


def test_missing_node_is_reported() -> None:
    source = build(10)
    del source.table[(3, 0)]
    with pytest.raises(KeyError):
        inclusion_proof(9, 10, source)


def test_verifier_messages() -> None:
    source = build(10)
    leaf = leaf_hash(entries(10)[3])
    root = root_hash(10, source)
    good = inclusion_proof(3, 10, source)
    with pytest.raises(ProofError, match="outside a tree of size 10") as info:
        verify_inclusion(leaf, 10, 10, good, root)
    assert isinstance(info.value, VerificationFailed)
    assert info.value.index == 10
    with pytest.raises(ProofError, match="need exactly 4"):
        verify_inclusion(leaf, 3, 10, good[:2], root)
    with pytest.raises(ProofError, match="31 bytes long"):
        verify_inclusion(leaf[:31], 3, 10, good, root)
    with pytest.raises(ProofError, match="does not lead to the root"):
        verify_inclusion(leaf, 3, 10, good, root_hash(9, source))
    with pytest.raises(ProofError, match="shrank"):
        verify_consistency(10, 9, root, root, [])
    with pytest.raises(ProofError, match="forked"):
        verify_consistency(9, 9, root, root_hash(9, source), [])
    with pytest.raises(ProofError, match="old tree"):
        verify_consistency(5, 10, root_hash(4, source), root, consistency_proof(5, 10, source))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 100, 255, 256, 257, 1000])
def test_root_matches_pymerkle(size: int) -> None:
    pymerkle = pytest.importorskip("pymerkle")
    tree = pymerkle.InmemoryTree(algorithm="sha256")
    source = MemoryNodes()
    for e in entries(size):
        tree.append_entry(e)
        source.add(e)
    for s in {1, size // 2 or 1, size - 1 or 1, size}:
        assert tree.get_root(s) == root_hash(s, source)
    assert tree.get_root(size) == source.frontier.root()
