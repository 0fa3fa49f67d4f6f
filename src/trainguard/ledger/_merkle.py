"""The RFC 9162 (section 2) Merkle tree: hashing, roots, inclusion and consistency proofs.

Proofs are built from stored hashes of perfect subtrees, addressed by `NodeKey` = (level, index): the node
covering leaves [index << level, (index + 1) << level). Every completed perfect node of a log is stored once
and never changes, so a root or a proof for any tree size is a handful of indexed reads, fetched in one batch.

Verifiers follow RFC 9162 2.1.3.2 and 2.1.4.2 step by step and check sizes, counts and hash lengths first,
so a wrong proof fails with a message that says what is wrong with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

from trainguard.errors import UsageError, VerificationFailed

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "NodeKey",
    "NodeSource",
    "ProofError",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "perfect_cover",
    "root_from_leaves",
    "root_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256

NodeKey = tuple[int, int]
"""(level, index): the perfect subtree of leaves [index << level, (index + 1) << level); level 0: a leaf."""


def leaf_hash(data: bytes) -> bytes:
    """MTH of a one-entry list: SHA-256(0x00 || entry)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """An interior node: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


class NodeSource(Protocol):
    """Where proofs read node hashes from: a store's node table, or a dictionary in tests."""

    def nodes(self, keys: Collection[NodeKey]) -> Mapping[NodeKey, bytes]:
        """The hash of every key asked for; raises KeyError or ProofError when one is missing."""
        ...


class ProofError(VerificationFailed):
    """A Merkle proof that does not verify, or that is malformed for the sizes it claims."""


def perfect_cover(start: int, end: int) -> list[NodeKey]:
    """The maximal aligned perfect subtrees that exactly cover leaves [start, end), left to right."""
    if not 0 <= start <= end:
        raise UsageError(f"not a leaf range: [{start}, {end})")
    keys: list[NodeKey] = []
    while start < end:
        # The largest block aligned at `start` (any size at 0) that still fits before `end`.
        size = start & -start if start else 1 << (end.bit_length() - 1)
        while start + size > end:
            size >>= 1
        level = size.bit_length() - 1
        keys.append((level, start >> level))
        start += size
    return keys


def _fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from its perfect cover: the tree leans left, so combine from the right."""
    h = hashes[-1]
    for left in reversed(hashes[:-1]):
        h = _sha256(b"\x01" + left + h).digest()
    return h


def _largest_split(n: int) -> int:
    """k in RFC 9162: the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _hashes_of_ranges(ranges: Sequence[tuple[int, int]], source: NodeSource) -> list[bytes]:
    """MTH of each leaf range, with every node fetched in one `nodes()` call."""
    covers = [perfect_cover(lo, hi) for lo, hi in ranges]
    wanted = [key for cover in covers for key in cover]
    if not wanted:
        return []
    found = source.nodes(wanted)
    return [_fold([found[key] for key in cover]) for cover in covers]


def root_hash(size: int, source: NodeSource) -> bytes:
    """MTH of the first `size` leaves, from at most log2(size) + 1 stored nodes."""
    if size < 0:
        raise UsageError(f"tree size cannot be negative: {size}")
    if size == 0:
        return EMPTY_ROOT
    return _hashes_of_ranges([(0, size)], source)[0]


def inclusion_proof(index: int, size: int, source: NodeSource) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 2.1.3.1, leaf side first."""
    if not 0 <= index < size:
        raise UsageError(
            f"no entry {index} in a tree of size {size}", hint=f"indices run from 0 to {size - 1}"
        )
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _largest_split(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
    ranges.reverse()
    return _hashes_of_ranges(ranges, source)


def consistency_proof(old_size: int, new_size: int, source: NodeSource) -> list[bytes]:
    """PROOF(old_size, D[0:new_size]) of RFC 9162 2.1.4.1; empty when the sizes are equal or old_size is 0."""
    if not 0 <= old_size <= new_size:
        raise UsageError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    # SUBPROOF(m, D[lo:hi], b), unrolled: collect sibling ranges top-down, then emit them bottom-up.
    ranges: list[tuple[int, int]] = []
    m, lo, hi, whole = old_size, 0, new_size, True
    while m != hi - lo:
        k = _largest_split(hi - lo)
        if m <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            m -= k
            lo += k
            whole = False
    if not whole:
        ranges.append((lo, hi))
    ranges.reverse()
    return _hashes_of_ranges(ranges, source)


def _check_hash(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes long, not {HASH_SIZE}")


def _check_path(proof: Sequence[bytes], expected: int, what: str) -> None:
    if len(proof) != expected:
        raise ProofError(f"{what} has {len(proof)} hashes; these tree sizes need exactly {expected}")
    for i, h in enumerate(proof):
        if len(h) != HASH_SIZE:
            raise ProofError(f"{what} hash {i} is {len(h)} bytes long, not {HASH_SIZE}")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf` (a leaf hash) is entry `index` of the tree (`size`, `root`); RFC 9162 2.1.3.2.

    Raises ProofError naming the problem; returns None when the proof holds.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}", index=index)
    _check_hash("leaf hash", leaf)
    _check_hash("root hash", root)
    sn = size - 1
    inner = (index ^ sn).bit_length()
    _check_path(proof, inner + (index >> inner).bit_count(), "inclusion proof")

    sha256 = _sha256
    fn = index
    r = leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is high", index=index)
        if fn & 1 or fn == sn:
            r = sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is high", index=index)
    if r != root:
        raise ProofError(
            f"inclusion proof for entry {index} does not lead to the root of the tree of size {size}",
            index=index,
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree (`new_size`, `new_root`) extends (`old_size`, `old_root`) (RFC 9162 2.1.4.2).

    Equal sizes need an empty proof and equal roots. A proof from size 0 is refused, as RFC 9162 defines none:
    the caller decides whether a first sighting of a log needs checking at all.
    """
    if old_size < 0 or new_size < 0:
        raise ProofError(f"tree sizes cannot be negative: {old_size}, {new_size}")
    if old_size > new_size:
        raise ProofError(f"the tree shrank from size {old_size} to {new_size}: an append-only log cannot")
    if old_size == 0:
        raise ProofError("a consistency proof from the empty tree (size 0) is meaningless")
    if old_size == new_size:
        if proof:
            raise ProofError(
                f"consistency proof between equal sizes ({old_size}) must be empty, has {len(proof)}"
            )
        if old_root != new_root:
            raise ProofError(f"two different roots for the same tree size {old_size}: the log has forked")
        return
    if not proof:
        raise ProofError(f"consistency proof from size {old_size} to {new_size} is empty")
    _check_hash("old root hash", old_root)
    _check_hash("new root hash", new_root)
    fn, sn = old_size - 1, new_size - 1
    inner = (fn ^ sn).bit_length()
    border = (fn >> inner).bit_count()
    shift = (old_size & -old_size).bit_length() - 1
    # When old_size is a power of two its root is the first path element, so the proof omits it.
    power_of_two = old_size == 1 << shift
    _check_path(proof, inner - shift + border + (0 if power_of_two else 1), "consistency proof")

    sha256 = _sha256
    if power_of_two:
        fr = sr = old_root
        rest: Sequence[bytes] = proof
    else:
        fr = sr = proof[0]
        rest = proof[1:]
    while fn & 1:
        fn >>= 1
        sn >>= 1
    for c in rest:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is high")
        if fn & 1 or fn == sn:
            fr = sha256(b"\x01" + c + fr).digest()
            sr = sha256(b"\x01" + c + sr).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = sha256(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is high")
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the root of the old tree (size {old_size})")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the root of the new tree (size {new_size})")


def root_from_leaves(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH from all leaf hashes, level by level; an unpaired last node moves up unchanged, as in RFC 9162."""
    if not leaf_hashes:
        return EMPTY_ROOT
    sha256 = _sha256
    level = list(leaf_hashes)
    while len(level) > 1:
        nxt = [sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class Frontier:
    """The right edge of a tree (a compact range): enough to append leaves and compute the root.

    Holds the hashes of `perfect_cover(0, size)`, left to right, i.e. one perfect subtree per set bit of size.
    """

    __slots__ = ("_hashes", "size")

    def __init__(self, size: int, hashes: Sequence[bytes]) -> None:
        if size < 0:
            raise ValueError(f"tree size cannot be negative: {size}")
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"a tree of size {size} has {size.bit_count()} frontier hashes, got {len(hashes)}"
            )
        for h in hashes:
            if len(h) != HASH_SIZE:
                raise ValueError(f"frontier hash is {len(h)} bytes long, not {HASH_SIZE}")
        self.size = size
        self._hashes = list(hashes)

    @classmethod
    def empty(cls) -> Frontier:
        """The frontier of a tree with no leaves."""
        return cls(0, [])

    @staticmethod
    def keys(size: int) -> list[NodeKey]:
        """The nodes a store reads to rebuild the frontier of a tree of `size` leaves."""
        return perfect_cover(0, size)

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """The frontier hashes, in the order of `keys(size)`."""
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> list[tuple[NodeKey, bytes]]:
        """Add one leaf hash; returns every perfect node it completes, the leaf itself (level 0) first."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf)}")
        sha256 = _sha256
        hashes = self._hashes
        size = self.size
        h = leaf
        level = 0
        done: list[tuple[NodeKey, bytes]] = [((0, size), leaf)]
        # Each set low bit of the old size is a finished subtree that the new node now pairs with.
        while size >> level & 1:
            h = sha256(b"\x01" + hashes.pop() + h).digest()
            level += 1
            done.append(((level, size >> level), h))
        hashes.append(h)
        self.size = size + 1
        return done

    def root(self) -> bytes:
        """MTH of the whole tree so far."""
        if not self._hashes:
            return EMPTY_ROOT
        return _fold(self._hashes)

    def __repr__(self) -> str:
        return f"Frontier(size={self.size})"
