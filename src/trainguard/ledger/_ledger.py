"""The ledger: appends signed batches of events to a store, and reads entries, checkpoints and proofs back.

Opening needs no private key: verification, reading and proofs use the verifier key alone. Appending needs
the signing key whose verifier the ledger recorded when it was created.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from trainguard.errors import KeyFileError, NoLedgerError, StoreError, UsageError
from trainguard.ledger._events import Event
from trainguard.ledger._keys import SigningKey, VerifierKey, is_valid_key_name
from trainguard.ledger._merkle import consistency_proof, inclusion_proof, root_hash
from trainguard.ledger._note import Checkpoint, open_checkpoint, sign_checkpoint
from trainguard.ledger._store import META_ORIGIN, META_VERIFIER, Store, describe_key, open_store
from trainguard.ledger._verify import VerifyReport, verify_ledger

__all__ = [
    "Ledger",
    "default_home",
    "default_key_path",
    "default_location",
    "default_origin",
]


def default_home() -> Path:
    """$TRAINGUARD_HOME, or ~/.local/share/trainguard."""
    env = os.environ.get("TRAINGUARD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "trainguard"


def default_location() -> Path:
    """The embedded ledger used when no location is given."""
    return default_home() / "ledger.db"


def default_key_path() -> Path:
    """The signing key used when none is given; its public half sits next to it as ledger.pub."""
    return default_home() / "keys" / "ledger.key"


def default_origin() -> str:
    """A log name unique to this host and ledger: trainguard/<hostname>/<8 random hex digits>."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "localhost"
    return f"trainguard/{host}/{secrets.token_hex(4)}"


def _key_name(origin: str) -> str:
    # A note key name may not contain spaces or "+"; the origin is the customary name.
    return re.sub(r"[\s+]", "-", origin)


class _Pending:
    """One event waiting in the group-commit queue."""

    __slots__ = ("data", "done", "error", "index")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.done = False
        self.index = -1
        self.error: BaseException | None = None


class Ledger:
    """An append-only, signed, verifiable log of events. Thread-safe; many processes may share a store."""

    def __init__(
        self,
        store: Store,
        verifier: VerifierKey,
        origin: str,
        *,
        key: SigningKey | None = None,
        key_problem: str | None = None,
    ) -> None:
        self._store = store
        self.verifier = verifier
        self.origin = origin
        self._key = key
        self._key_problem = key_problem
        self._writer = threading.Lock()  # one batch in flight per process; the store locks across processes
        self._queue_lock = threading.Lock()
        self._queue: list[_Pending] = []

    @classmethod
    def open(
        cls,
        location: str | Path | None = None,
        *,
        key: SigningKey | None = None,
        verifier: VerifierKey | None = None,
        origin: str | None = None,
        create: bool = True,
    ) -> Ledger:
        """Open (creating if needed) the ledger at `location`: a SQLite path or a ``postgresql://`` URL.

        With `create` false nothing is made (no store, no key): a missing or empty ledger is a StoreError.

        `location` None is $TRAINGUARD_HOME/ledger.db. `key` None reads $TRAINGUARD_HOME/keys/ledger.key when
        it exists; a new default ledger without one gets a freshly generated key there (mode 0600). Without a
        signing key the ledger opens read-only. `verifier`, when given, must be the ledger's recorded key.
        A new ledger's origin is its key's name, as witnesses find a log's key by its origin: `origin`, when
        given, must be that name (a generated default key is named after it; default
        trainguard/<hostname>/<random>). KeyFileError when a key given differs from the ledger's, naming both.
        """
        default = location is None
        explicit_key = key is not None
        key_path = default_key_path()
        if key is None and key_path.exists():
            key = SigningKey.load(key_path)
        where = default_location() if location is None else location
        store = open_store(where, create=create and (key is not None or default))
        try:
            meta = store.meta()
            if not meta and not create:
                raise NoLedgerError(
                    f"no ledger at {store.location} yet: nothing to read",
                    hint="the first append creates it (trainguard ledger append, sign, run, watch)",
                )
            if not meta:
                meta, key = cls._initialise(store, key, origin, default)
            elif key is None and key_path.exists():
                # Another process created the default key and this ledger since we looked.
                key = SigningKey.load(key_path)
            return cls._from_meta(store, meta, key, explicit_key, verifier, origin)
        except BaseException:
            store.close()
            raise

    @staticmethod
    def _initialise(
        store: Store, key: SigningKey | None, origin: str | None, default: bool
    ) -> tuple[dict[str, str], SigningKey]:
        if origin is not None and not is_valid_key_name(origin):
            raise UsageError(
                f"cannot create ledger {store.location} with origin {origin!r}: it names the ledger's key, "
                "so it may hold neither spaces nor '+'"
            )
        if key is None:
            if not default:
                raise StoreError(
                    f"ledger {store.location} is empty and no signing key was given to create it",
                    hint="make one with 'trainguard keygen FILE --name ORIGIN' and pass it (--key, "
                    f"TRAINGUARD_LEDGER_KEY), or create {default_key_path()}",
                )
            key = _generate_default_key(origin or default_origin())
        # A witness finds the key of a log by its origin (the key's name): a ledger named otherwise could
        # never be witnessed.
        new_origin = key.name if origin is None else origin
        if new_origin != key.name:
            raise UsageError(
                f"cannot create ledger {store.location} with origin {new_origin!r}: its key {key.ident} is "
                f"named {key.name!r}, and a ledger's origin is its key's name",
                hint=f"make the key with 'trainguard keygen FILE --name {new_origin}', or give no origin",
            )
        try:
            store.init(new_origin, key.verifier())
        except StoreError:
            # Another process created the same ledger first; its origin stands unless one was asked for.
            meta = store.meta()
            if origin is not None or meta.get(META_VERIFIER) != key.verifier().text():
                raise
            return meta, key
        return store.meta(), key

    @classmethod
    def _from_meta(
        cls,
        store: Store,
        meta: dict[str, str],
        key: SigningKey | None,
        explicit_key: bool,
        verifier: VerifierKey | None,
        origin: str | None,
    ) -> Ledger:
        try:
            recorded = VerifierKey.from_text(meta[META_VERIFIER])
            recorded_origin = meta[META_ORIGIN]
        except (KeyError, KeyFileError, ValueError):
            raise StoreError(
                f"ledger {store.location} has no valid origin and verifier key in its meta table",
                hint="the store was damaged or is not a trainguard ledger",
            ) from None
        if origin is not None and origin != recorded_origin:
            raise StoreError(f"ledger {store.location} has origin {recorded_origin!r}, not {origin!r}")
        if verifier is not None and verifier != recorded:
            raise KeyFileError(
                f"ledger {store.location} records key {recorded.ident}, not the expected {verifier.ident}",
                hint="the ledger's key was replaced, or this is another ledger",
            )
        problem = None
        if key is not None and key.verifier() != recorded:
            problem = (
                f"ledger {store.location} is signed by key {describe_key(meta[META_VERIFIER])}, "
                f"not by {key.ident}"
            )
            if explicit_key:
                raise KeyFileError(problem, hint="use the ledger's own signing key")
            key = None  # the default key belongs to another ledger: read-only here
        return cls(store, verifier or recorded, recorded_origin, key=key, key_problem=problem)

    @property
    def location(self) -> str:
        return self._store.location

    @property
    def store(self) -> Store:
        return self._store

    @property
    def can_append(self) -> bool:
        """Whether this ledger was opened with its signing key."""
        return self._key is not None

    def _signer(self) -> SigningKey:
        if self._key is None:
            raise KeyFileError(
                self._key_problem
                or f"ledger {self.location} was opened without its signing key; it is read-only",
                hint=f"give the key that created it (default {default_key_path()})",
            )
        return self._key

    def _sign(self, checkpoint: Checkpoint) -> str:
        return sign_checkpoint(checkpoint, self._signer())

    # Writing

    def append(self, event: Event) -> int:
        """Append one event durably and return its index.

        Concurrent callers in this process are committed together: whichever thread gets the writer lock
        takes every queued event into one transaction with one signed checkpoint.
        """
        self._signer()
        item = _Pending(event.canonical())
        with self._queue_lock:
            self._queue.append(item)
        with self._writer:
            if not item.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    first, _ = self._store.append_batch([p.data for p in batch], self._sign)
                except BaseException as exc:
                    for p in batch:
                        p.error, p.done = exc, True
                else:
                    for i, p in enumerate(batch):
                        p.index, p.done = first + i, True
        if item.error is not None:
            raise item.error
        return item.index

    def append_many(self, events: Sequence[Event]) -> range:
        """Append `events` in one transaction under one signed checkpoint; their indices, contiguous."""
        self._signer()
        data = [event.canonical() for event in events]
        if not data:
            size = self.size
            return range(size, size)
        with self._writer:
            first, _ = self._store.append_batch(data, self._sign)
        return range(first, first + len(data))

    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        """Keep a witness's cosignature line for the checkpoint at `size`."""
        self._store.add_cosignature(size, witness, line)

    # Reading

    @property
    def size(self) -> int:
        """The number of entries covered by the latest signed checkpoint."""
        return self._store.state()[1]

    def head(self) -> tuple[Checkpoint, str]:
        """The latest checkpoint, its signature verified, and its signed note."""
        latest = self._store.latest_checkpoint()
        if latest is None:
            raise UsageError(f"ledger {self.location} is empty: it has no checkpoint yet")
        return self._open(*latest)

    def checkpoint(self, size: int) -> tuple[Checkpoint, str]:
        """The stored checkpoint at `size`, its signature verified, and its note."""
        note = self._store.checkpoint(size)
        if note is None:
            raise UsageError(f"ledger {self.location} has no checkpoint at size {size}")
        return self._open(size, note)

    def checkpoints(self) -> Iterator[tuple[int, str]]:
        """(size, note) of every stored checkpoint, unverified, by size."""
        return self._store.checkpoints()

    def _open(self, size: int, note: str) -> tuple[Checkpoint, str]:
        checkpoint = open_checkpoint(note, self.verifier)
        if checkpoint.size != size or checkpoint.origin != self.origin:
            raise StoreError(
                f"ledger {self.location}: the checkpoint stored at size {size} is for "
                f"{checkpoint.origin!r} at size {checkpoint.size}",
                hint="run 'trainguard ledger verify'",
            )
        return checkpoint, note

    def entry(self, index: int) -> Event:
        """The event at `index`, parsed strictly."""
        for i, data in self._store.entries(index, index + 1):
            return Event.from_canonical(data, index=i)
        raise UsageError(f"ledger {self.location} has no entry {index}", hint=f"it holds {self.size} entries")

    def entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, Event]]:
        """(index, event) for start <= index < end, streamed."""
        stop = self.size if end is None else end
        for i, data in self._store.entries(start, stop):
            yield i, Event.from_canonical(data, index=i)

    def _size_arg(self, size: int | None) -> int:
        current = self.size
        if size is None:
            return current
        if not 0 <= size <= current:
            raise UsageError(f"ledger {self.location} has {current} entries; no tree of size {size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root of the first `size` entries (default: all), from stored nodes."""
        return root_hash(self._size_arg(size), self._store)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The RFC 9162 inclusion proof of entry `index` in the tree of `size` entries (default: all)."""
        return inclusion_proof(index, self._size_arg(size), self._store)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The RFC 9162 consistency proof from `old_size` to `new_size` (default: all)."""
        return consistency_proof(old_size, self._size_arg(new_size), self._store)

    def verify(self, trusted: Checkpoint | None = None, *, key: VerifierKey | None = None) -> VerifyReport:
        """Verify the whole ledger against `key` (default: the ledger's verifier key)."""
        return verify_ledger(self._store, key or self.verifier, trusted)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self.location!r}, origin={self.origin!r})"


def _generate_default_key(origin: str) -> SigningKey:
    """Create the default signing key (0600) and its public half; a racing process's key wins."""
    path = default_key_path()
    key = SigningKey.generate(_key_name(origin))
    try:
        key.save(path)
    except KeyFileError:
        if path.exists():
            return SigningKey.load(path)
        raise
    pub = path.with_name("ledger.pub")
    if not pub.exists():
        key.verifier().save(pub)
    logging.getLogger("trainguard").warning(
        "created the ledger signing key %s (keep a copy of %s elsewhere to verify against)", path, pub
    )
    return key
