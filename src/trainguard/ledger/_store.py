"""The ledger store interface, shared by the SQLite and PostgreSQL backends.

A store holds five tables:

    entries(idx, data)                  the canonical bytes of every event, indexed from 0
    nodes(level, idx, hash)             every completed perfect subtree of the Merkle tree, leaves at level 0
    checkpoints(size, note, created)    one signed checkpoint note per committed batch
    cosignatures(size, witness, line)   witness cosignature lines for a checkpoint
    meta(key, value)                    the log's origin and the verifier key its checkpoints are signed with

Tables of other rooms may live beside these (the server's event keys, its tokens): `Store.transaction`
and the `within` callback of `Store.append_batch` write them in the ledger's own transactions, through a
`Transaction`, so such a row and the entries it speaks of commit together or not at all.

Appends take a writer lock that spans processes and hosts (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL
transaction-level advisory lock), read the tree's right edge, and write the entries, the nodes they complete
and the new signed checkpoint in one transaction: a crash leaves either all of a batch or none of it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from trainguard.errors import KeyFileError, MissingExtraError, StoreError
from trainguard.ledger._keys import VerifierKey
from trainguard.ledger._merkle import Frontier, NodeKey, ProofError, leaf_hash, perfect_cover
from trainguard.ledger._note import PREVIOUS_SIZE, Checkpoint

__all__ = [
    "META_FORMAT",
    "META_ORIGIN",
    "META_VERIFIER",
    "STORE_FORMAT",
    "Batch",
    "Signer",
    "Store",
    "Transaction",
    "Within",
    "check_meta",
    "completed_ranges",
    "describe_key",
    "is_postgres_location",
    "missing_nodes_error",
    "next_batch",
    "open_store",
]

META_ORIGIN = "origin"
META_VERIFIER = "verifier"
META_FORMAT = "format"
# Written on init; a store whose meta table names another format is refused rather than guessed at.
STORE_FORMAT = "trainguard-ledger/1"


Signer = Callable[[Checkpoint], str]
_T = TypeVar("_T")


class Transaction(Protocol):
    """Statements inside one of the store's write transactions, for tables beside the ledger's own.

    SQL is written with ``?`` placeholders on either database; `dialect` ("sqlite" or "postgresql") says
    which SQL to write where they differ. A statement that fails rolls the whole transaction back.
    """

    @property
    def dialect(self) -> str: ...

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> int:
        """Run one statement per row; the number of rows changed in all."""
        ...

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Every row of one query, read inside the transaction."""
        ...


Within = Callable[[Transaction, int], None]


class Store(Protocol):
    """One ledger database. Every method raises StoreError, naming the location, when the database fails."""

    @property
    def location(self) -> str:
        """Where the store lives, fit to show a person (a PostgreSQL password is never shown)."""
        ...

    def init(self, origin: str, verifier: VerifierKey) -> None:
        """Record the log's origin and verifier key; idempotent, refuses a different origin or key."""
        ...

    def append_batch(
        self, entries: Sequence[bytes], sign: Signer, within: Within | None = None
    ) -> tuple[int, str]:
        """Append `entries` and one signed checkpoint in one transaction; returns (first index, note).

        `within(transaction, first_index)` runs after the entries are written and before the checkpoint is
        signed, in the same transaction: whatever it writes commits with them, and what it raises rolls
        the batch back and leaves `append_batch` unchanged.
        """
        ...

    def transaction(self, work: Callable[[Transaction], _T]) -> _T:
        """Run `work` in one write transaction that holds the ledger's writer lock (so it is serialised
        with every append, in every process and host); commits when it returns, rolls back if it raises."""
        ...

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Every row of one query (``?`` placeholders), outside any write transaction."""
        ...

    def size(self) -> int:
        """The number of entries (one past the highest index stored)."""
        ...

    def state(self) -> tuple[int, int]:
        """(entries size, latest checkpoint size), read together in one statement."""
        ...

    def nodes(self, keys: Collection[NodeKey]) -> Mapping[NodeKey, bytes]:
        """Stored node hashes, in one query; ProofError when one is missing."""
        ...

    def nodes_completed(self, start: int, end: int) -> dict[NodeKey, bytes]:
        """Every stored node completed by a leaf in [start, end): the nodes `Frontier.append` returns."""
        ...

    def entries(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(index, canonical bytes) of stored entries with start <= index < end, by index, streamed."""
        ...

    def checkpoints(self, max_size: int | None = None) -> Iterator[tuple[int, str]]:
        """(size, note) of stored checkpoints by size, streamed; up to `max_size` when given."""
        ...

    def checkpoint(self, size: int) -> str | None:
        """The note of the checkpoint at `size`, if one is stored."""
        ...

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """(size, note) of the largest checkpoint, or None for an empty log."""
        ...

    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        """Store (or replace) one witness's cosignature line for the checkpoint at `size`."""
        ...

    def cosignatures(self, size: int) -> list[tuple[str, str]]:
        """(witness, line) of every cosignature stored for the checkpoint at `size`."""
        ...

    def meta(self) -> dict[str, str]:
        """The meta table: origin and verifier key text; empty before init."""
        ...

    def close(self) -> None:
        """Release the connection; the store cannot be used afterwards."""
        ...


@dataclass(frozen=True)
class Batch:
    """What one append writes besides the entries: the new nodes and the new tree size and root."""

    nodes: list[tuple[int, int, bytes]]
    size: int
    root: bytes
    previous: int
    """The size of the latest checkpoint before this batch."""

    def checkpoint(self, origin: str) -> Checkpoint:
        """The checkpoint to sign for this batch, chained to the one before it."""
        return Checkpoint(origin, self.size, self.root, (f"{PREVIOUS_SIZE} {self.previous}",))


def next_batch(
    location: str,
    size: int,
    signed: int,
    read_nodes: Callable[[Sequence[NodeKey]], Mapping[NodeKey, bytes]],
    entries: Sequence[bytes],
) -> Batch:
    """The batch that extends the stored tree of `size` leaves with `entries`, read under the writer lock.

    StoreError when the store is damaged: rows beyond the latest checkpoint, or a missing frontier node.
    """
    if size != signed:
        raise StoreError(
            f"ledger {location} is damaged: it holds {size} entries but its latest checkpoint "
            f"covers {signed}; refusing to sign over it",
            hint="run 'trainguard ledger verify' to see what was changed",
        )
    keys = perfect_cover(0, size)
    found = read_nodes(keys) if keys else {}
    try:
        hashes = [found[key] for key in keys]
    except KeyError as exc:
        raise StoreError(
            f"ledger {location} is damaged: tree node {exc.args[0]} is missing, so nothing can be appended",
            hint="run 'trainguard ledger verify' to see what was changed",
        ) from None
    frontier = Frontier(size, hashes)
    nodes: list[tuple[int, int, bytes]] = []
    for data in entries:
        nodes.extend((level, idx, h) for (level, idx), h in frontier.append(leaf_hash(data)))
    return Batch(nodes, frontier.size, frontier.root(), signed)


def check_meta(existing: Mapping[str, str], origin: str, verifier: VerifierKey, location: str) -> None:
    """Refuse to re-initialise a ledger with a different origin or key (KeyFileError names both key ids)."""
    fmt = existing.get(META_FORMAT, STORE_FORMAT)
    if fmt != STORE_FORMAT:
        raise StoreError(f"ledger {location} has format {fmt!r}; this trainguard reads {STORE_FORMAT!r}")
    stored = existing.get(META_VERIFIER)
    if stored is not None and stored != verifier.text():
        raise KeyFileError(
            f"ledger {location} is signed by key {describe_key(stored)}, not by {verifier.ident}",
            hint="use the ledger's own signing key, or a new ledger for the new key",
        )
    if existing.get(META_ORIGIN, origin) != origin:
        raise StoreError(
            f"ledger {location} has origin {existing[META_ORIGIN]!r}, not {origin!r}",
            hint="an origin is fixed when a ledger is created",
        )


def describe_key(text: str) -> str:
    """``name+keyid`` of a verifier key text, or the text itself when it does not parse."""
    try:
        return VerifierKey.from_text(text).ident
    except (KeyFileError, ValueError):
        return repr(text)


def completed_ranges(start: int, end: int) -> list[tuple[int, int, int]]:
    """(level, first idx, last idx) of the nodes completed by leaves in [start, end), one triple per level.

    Node (level, j) is completed by leaf ((j + 1) << level) - 1.
    """
    ranges: list[tuple[int, int, int]] = []
    if start >= end:
        return ranges
    for level in range(end.bit_length()):
        lo = ((start + (1 << level)) >> level) - 1
        hi = (end >> level) - 1
        if lo <= hi:
            ranges.append((level, lo, hi))
    return ranges


def missing_nodes_error(
    keys: Collection[NodeKey], found: Mapping[NodeKey, bytes], location: str
) -> ProofError:
    """A ProofError naming the first node asked for but not stored."""
    missing = sorted(set(keys) - set(found))
    return ProofError(
        f"ledger {location} lacks tree node {missing[0]} (and {len(missing) - 1} more)"
        if len(missing) > 1
        else f"ledger {location} lacks tree node {missing[0]}",
        hint="the tree size asked for may be beyond the ledger, or the node table was changed; "
        "run 'trainguard ledger verify'",
    )


def is_postgres_location(location: str | Path) -> bool:
    """Whether `location` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_store(location: str | Path, *, create: bool = True) -> Store:
    """Open the store at `location`: a ``postgresql://`` URL, or otherwise the path of a SQLite file.

    With `create` false a missing SQLite file, or a PostgreSQL schema without a ledger, is a StoreError
    instead of a new empty ledger. A URL's ``?schema=NAME`` names the PostgreSQL schema (default
    ``trainguard``, created when `create` allows).
    """
    if is_postgres_location(location):
        try:
            import psycopg  # noqa: F401  (only to find out whether the extra is installed)
        except ImportError:
            raise MissingExtraError("psycopg", "postgresql", "A PostgreSQL ledger") from None
        from trainguard.ledger._postgres import PostgresStore

        return PostgresStore(str(location), create=create)
    from trainguard.ledger._sqlite import SqliteStore

    return SqliteStore(Path(location), create=create)
