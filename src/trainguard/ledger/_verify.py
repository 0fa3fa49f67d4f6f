"""Full verification of a ledger: recompute the Merkle tree from the entries and check every signature.

The core, `verify_stream`, needs only the entries, the signed checkpoint notes and the public key; a store
adds its node table, which lets it name the first changed entry exactly. It streams, so memory stays
bounded however long the log is: a Frontier (log n hashes) and one chunk of stored nodes at a time.

What it finds, and what it names as the first bad index:

- an entry that is not a canonical event, or whose hash differs from the leaf hash stored when it was
  appended (edit, reorder, insertion that shifts the rest): that entry;
- a missing index (deletion): the first missing index; the stored leaf hash stands in for the missing entry so
  that the rest of the log is still checked;
- fewer entries than the latest checkpoint covers (truncation): the first missing index;
- entries beyond the latest checkpoint (unsigned rows): the first of them;
- a checkpoint row deleted from the middle: the next checkpoint names the size it follows;
- a checkpoint whose signature is not by the ledger key (key swap) or whose signed root is not the root of
  the entries (entries and nodes rewritten together): when no changed entry was already found, the change
  lies between the last checkpoint that verified and this one, and the first index of that range is named.

Rolling the whole store back to an older, self-consistent state leaves nothing to find inside it; only a
checkpoint kept elsewhere (`trusted`: a witness's, or a saved note) catches that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from trainguard.errors import TrainguardError, VerificationFailed
from trainguard.ledger._events import Event
from trainguard.ledger._keys import VerifierKey
from trainguard.ledger._merkle import EMPTY_ROOT, Frontier, NodeKey, leaf_hash
from trainguard.ledger._note import Checkpoint, Note, open_checkpoint
from trainguard.ledger._store import META_VERIFIER, describe_key

__all__ = ["LedgerExport", "VerifyReport", "verify_ledger", "verify_stream"]

# Entries per batch of stored nodes fetched while streaming.
NODE_CHUNK = 8192
# Problems listed per kind; the rest of a kind are counted in one closing line.
LISTED_PER_KIND = 5
_LISTED = {"later roots": 1}

NodeReader = Callable[[int, int], Mapping[NodeKey, bytes]]


class _VerifiableStore(Protocol):
    """The part of a Store that verification reads."""

    @property
    def location(self) -> str: ...
    def state(self) -> tuple[int, int]: ...
    def meta(self) -> dict[str, str]: ...
    def entries(self, start: int, end: int) -> Iterator[tuple[int, bytes]]: ...
    def checkpoints(self, max_size: int | None = None) -> Iterator[tuple[int, str]]: ...
    def nodes_completed(self, start: int, end: int) -> dict[NodeKey, bytes]: ...


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The outcome of a full verification. `ok` is false whenever any problem was found."""

    ok: bool
    size: int
    """The tree size verified: that of the latest stored checkpoint."""
    root: bytes | None
    """The root recomputed from the entries at `size`, when it could be computed."""
    first_bad_index: int | None
    problems: list[str]
    entries_checked: int
    checkpoints_checked: int
    nodes_checked: int

    def raise_for_problems(self) -> None:
        """Raise VerificationFailed naming the first problem and the first bad index, unless ok."""
        if self.ok:
            return
        more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        raise VerificationFailed(
            f"{self.problems[0]}{more}",
            index=self.first_bad_index,
            hint="run 'trainguard ledger verify' for the full report",
        )


@dataclasses.dataclass(frozen=True)
class LedgerExport:
    """A ledger as a verifier outside the database sees it: its entries and its signed checkpoint notes."""

    entries: Iterable[tuple[int, bytes]]
    notes: Iterable[str]
    origin: str | None = None


class _Run:
    """The state of one verification pass."""

    def __init__(self, key: VerifierKey, origin: str | None, trusted: Checkpoint | None) -> None:
        self.key = key
        self.origin = origin
        self.trusted = trusted
        self.frontier: Frontier | None = Frontier.empty()
        self.problems: list[str] = []
        self.counts: dict[str, int] = {}
        self.first_bad: int | None = None
        self.first_node_bad: int | None = None  # the first entry under a changed or missing tree node
        self.last_exact: int | None = None  # the latest entry found bad by its own hash or absence
        self.last_good = 0  # size of the latest checkpoint that verified completely
        self.bound_from: int | None = None  # the last_good already reported as the start of a bad range
        self.entries_checked = 0
        self.checkpoints_checked = 0
        self.nodes_checked = 0
        self.previous_stored = 0  # the size of the stored checkpoint before the one being checked
        # The current run of missing rows, and the problem line that describes it (while listed).
        self.gap_start = 0
        self.gap_len = 0
        self.gap_line: int | None = None

    def problem(self, kind: str, message: str, index: int | None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= _LISTED.get(kind, LISTED_PER_KIND):
            self.problems.append(message)
        if index is not None and (self.first_bad is None or index < self.first_bad):
            self.first_bad = index

    def exact(self, kind: str, message: str, index: int) -> None:
        self.last_exact = index if self.last_exact is None else max(self.last_exact, index)
        self.problem(kind, message, index)

    # Entries

    def entry(self, index: int, data: bytes | None, stored: Mapping[NodeKey, bytes] | None) -> None:
        """Check entry `index` (None when its row is missing) and add its leaf to the tree."""
        stored_leaf = None if stored is None else stored.get((0, index))
        if data is None:
            self.missing(index)
            leaf = stored_leaf  # keep checking the rest of the log with the hash recorded at append time
        else:
            self.gap_len = 0
            self.entries_checked += 1
            try:
                Event.from_canonical(data, index=index)
            except VerificationFailed as exc:
                self.exact("invalid", exc.message, index)
            leaf = leaf_hash(data)
            if stored is not None:
                self.nodes_checked += 1
                if stored_leaf is None:
                    self.problem("node", f"the stored leaf hash of entry {index} is missing", index)
                elif stored_leaf != leaf:
                    self.exact(
                        "leaf",
                        f"entry {index} does not match the leaf hash stored when it was appended: "
                        "the entry (or the node table) was changed, or rows were inserted or reordered",
                        index,
                    )
        if self.frontier is None:
            return
        if leaf is None:
            self.frontier = None
            self.problem(
                "broken",
                f"the tree cannot be recomputed beyond entry {index}: both its row and its stored leaf hash "
                "are missing",
                index,
            )
            return
        for key, h in self.frontier.append(leaf)[1:]:
            if stored is None:
                continue
            self.nodes_checked += 1
            got = stored.get(key)
            level, j = key
            first = j << level
            # A node over an entry already found bad differs as a consequence; say nothing more about it.
            if self.last_exact is not None and self.last_exact >= first:
                continue
            # A bad node only bounds the change: when leaf hashes or signed checkpoints locate it more
            # closely, they name the first bad index; otherwise the node's first entry does.
            if got is None or got != h:
                if self.first_node_bad is None:
                    self.first_node_bad = first
                what = (
                    "is missing from the store"
                    if got is None
                    else "differs from the hash of its entries: the node table was changed, so proofs over "
                    "these entries fail"
                )
                self.problem("node", f"tree node {key} (entries {first}..{index}) {what}", None)

    def missing(self, index: int) -> None:
        if self.gap_len and index == self.gap_start + self.gap_len:
            self.gap_len += 1
            if self.gap_line is not None:
                self.problems[self.gap_line] = (
                    f"entries {self.gap_start}..{index} are missing ({self.gap_len} rows deleted or moved)"
                )
            return
        self.gap_start, self.gap_len = index, 1
        listed = self.counts.get("missing", 0) < _LISTED.get("missing", LISTED_PER_KIND)
        self.exact("missing", f"entry {index} is missing (its row was deleted or moved)", index)
        self.gap_line = len(self.problems) - 1 if listed else None

    # Checkpoints

    def checkpoint(self, size: int, note: str) -> None:
        """Check one stored checkpoint against the key and against the tree recomputed up to `size`."""
        self.checkpoints_checked += 1
        signed = True
        try:
            cp: Checkpoint | None = open_checkpoint(note, self.key)
        except VerificationFailed as exc:
            signed = False
            self.problem("signature", f"checkpoint at size {size}: {exc.message}", None)
            cp = _unsigned_body(note)
        good = signed and cp is not None
        if signed and cp is not None:
            self.chained(size, cp)
        self.previous_stored = size
        if cp is not None:
            if cp.size != size:
                good = False
                self.problem(
                    "checkpoint", f"the checkpoint stored at size {size} is for size {cp.size}", None
                )
            if self.origin is None:
                self.origin = cp.origin
            elif cp.origin != self.origin:
                good = False
                self.problem(
                    "checkpoint",
                    f"checkpoint at size {size} is for log {cp.origin!r}, not {self.origin!r}",
                    None,
                )
            if (
                self.frontier is not None
                and self.frontier.size == cp.size
                and self.frontier.root() != cp.root
            ):
                good = False
                if self._explained():
                    # Every later root differs too once an entry is bad; one line says so.
                    self.problem(
                        "later roots",
                        f"checkpoints from size {size} on sign roots that differ from the stored entries, "
                        f"which include changed entry {self.first_bad}",
                        None,
                    )
                else:
                    self.problem(
                        "root",
                        f"checkpoint at size {size} signs a root that is not the root of the stored entries "
                        f"0..{size - 1}",
                        None,
                    )
            if self.frontier is None:
                good = False
        if good:
            self.last_good = size
            return
        # A bad checkpoint that no entry found bad explains: the change lies after the last good one.
        if not self._explained() and self.bound_from != self.last_good:
            self.bound_from = self.last_good
            self.problem(
                "bound",
                f"entries from {self.last_good} on are not covered by a valid checkpoint; "
                f"the last valid one is at size {self.last_good}, the first invalid at size {size}",
                self.last_good,
            )

    def chained(self, size: int, cp: Checkpoint) -> None:
        """Compare the size a checkpoint says it follows with the stored checkpoint before it."""
        try:
            previous = cp.previous_size()
        except VerificationFailed as exc:
            self.problem("checkpoint", exc.message, None)
            return
        if previous is None or previous == self.previous_stored:
            return
        if previous > self.previous_stored:
            self.problem(
                "deleted checkpoint",
                f"the checkpoint at size {previous} is missing: the one at size {size} was signed after it "
                "(its row was deleted)",
                None,
            )
        else:
            self.problem(
                "checkpoint",
                f"the checkpoint at size {size} follows size {previous}, but a checkpoint at size "
                f"{self.previous_stored} is stored between them",
                None,
            )

    def _explained(self) -> bool:
        """Whether an entry found bad since the last good checkpoint accounts for a bad root."""
        return self.last_exact is not None and self.last_exact >= self.last_good

    def trusted_at(self, size: int) -> None:
        """Compare the recomputed tree with the trusted checkpoint, once the tree reaches its size."""
        trusted = self.trusted
        if trusted is None or size != trusted.size:
            return
        if self.origin is not None and trusted.origin != self.origin:
            self.problem(
                "trusted", f"the trusted checkpoint is for log {trusted.origin!r}, not {self.origin!r}", 0
            )
        elif self.frontier is not None and self.frontier.root() != trusted.root:
            self.problem(
                "trusted",
                f"the trusted checkpoint at size {size} disagrees with the root of entries 0..{size - 1}: "
                "the ledger was rewritten (forked) after that checkpoint was taken",
                self.last_exact if self.last_exact is not None else 0,
            )

    def report(self, size: int, root: bytes | None) -> VerifyReport:
        problems = list(self.problems)
        for kind, n in self.counts.items():
            listed = _LISTED.get(kind, LISTED_PER_KIND)
            if n > listed:
                problems.append(f"... and {n - listed} more problems of the kind {kind!r}")
        return VerifyReport(
            ok=not problems,
            size=size,
            root=root,
            first_bad_index=self.first_bad if self.first_bad is not None else self.first_node_bad,
            problems=problems,
            entries_checked=self.entries_checked,
            checkpoints_checked=self.checkpoints_checked,
            nodes_checked=self.nodes_checked,
        )


def _unsigned_body(note: str) -> Checkpoint | None:
    """The checkpoint in a note whose signature did not verify, to compare its root all the same."""
    try:
        return Checkpoint.from_body(Note.parse(note).text)
    except (TrainguardError, ValueError):
        return None


def verify_stream(
    entries: Iterable[tuple[int, bytes]],
    checkpoints: Iterable[tuple[int, str]],
    key: VerifierKey,
    *,
    size: int,
    origin: str | None = None,
    trusted: Checkpoint | None = None,
    stored_nodes: NodeReader | None = None,
) -> VerifyReport:
    """Verify a log of `size` entries from its (index, bytes) stream and its (size, note) checkpoints.

    Both streams are in increasing order. `size` is the size of the latest checkpoint; entries at or beyond
    it are reported as unsigned. `stored_nodes(start, end)`, when given, returns the stored nodes completed
    by leaves in [start, end), which are compared with the recomputed ones.
    """
    run = _Run(key, origin, trusted)
    cps = iter(checkpoints)
    next_cp = next(cps, None)
    stored: Mapping[NodeKey, bytes] | None = None
    stored_end = 0
    pos = 0
    unsigned = 0

    def checkpoints_upto(n: int) -> None:
        nonlocal next_cp
        while next_cp is not None and next_cp[0] <= n:
            if next_cp[0] < n:  # only possible for an unordered export, or a size-0 checkpoint
                run.problem("checkpoint", f"checkpoint at size {next_cp[0]} is out of order", None)
            else:
                run.checkpoint(*next_cp)
            next_cp = next(cps, None)
        run.trusted_at(n)

    def advance(index: int, data: bytes | None) -> None:
        nonlocal stored, stored_end
        if stored_nodes is not None and index >= stored_end:
            stored_end = min(index + NODE_CHUNK, size)
            stored = stored_nodes(index, stored_end)
        checkpoints_upto(index)
        run.entry(index, data, stored)

    for index, data in entries:
        if index >= size:
            unsigned += 1
            continue
        if index < pos:
            run.problem("order", f"entry {index} appears again or out of order", index)
            continue
        while pos < index:
            advance(pos, None)
            pos += 1
        advance(index, data)
        pos += 1
    checkpoints_upto(pos)
    if pos < size:
        run.problem(
            "truncated",
            f"entries {pos}..{size - 1} are missing: the latest checkpoint covers {size} entries, "
            f"the ledger holds {pos}",
            pos,
        )
        run.frontier = None
    if unsigned:
        run.problem(
            "unsigned",
            f"{unsigned} entries from index {size} on are not covered by any signed checkpoint "
            "(rows added outside trainguard, or a write that did not finish)",
            size,
        )
    if trusted is not None and trusted.size > pos:
        run.problem(
            "trusted",
            f"the trusted checkpoint covers {trusted.size} entries, but the ledger holds only {pos}: "
            "it was truncated or rolled back",
            pos,
        )
    root = None
    if run.frontier is not None and run.frontier.size == size:
        root = run.frontier.root() if size else EMPTY_ROOT
    return run.report(size, root)


def _store_stream(store: _VerifiableStore, key: VerifierKey, trusted: Checkpoint | None) -> VerifyReport:
    entries_size, signed_size = store.state()
    meta = store.meta()
    report = verify_stream(
        store.entries(0, signed_size),
        store.checkpoints(signed_size),
        key,
        size=signed_size,
        origin=meta.get("origin"),
        trusted=trusted,
        stored_nodes=store.nodes_completed,
    )
    problems = list(report.problems)
    first = report.first_bad_index
    recorded = meta.get(META_VERIFIER)
    if _parsed_key(recorded) != key:
        # Checked against a key kept elsewhere, the log may verify while the store names another key:
        # every later append would then be refused, or signed by the wrong key.
        problems.append(
            f"the store records verifier key {describe_key(recorded or '')}, not the ledger's key "
            f"{key.ident}: its meta table was changed"
        )
    if entries_size > signed_size:
        # Rows beyond the latest checkpoint were never signed: trainguard writes both in one transaction.
        problems.append(
            f"entries {signed_size}..{entries_size - 1} are not covered by any signed checkpoint "
            "(rows added outside trainguard)"
        )
        first = signed_size if first is None else min(first, signed_size)
    if problems == report.problems:
        return report
    return dataclasses.replace(report, ok=False, problems=problems, first_bad_index=first)


def _parsed_key(text: str | None) -> VerifierKey | None:
    try:
        return None if text is None else VerifierKey.from_text(text)
    except (TrainguardError, ValueError):
        return None


def _export_stream(export: LedgerExport, key: VerifierKey, trusted: Checkpoint | None) -> VerifyReport:
    parsed: list[tuple[int, str]] = []
    bad: list[str] = []
    for note in export.notes:
        cp = _unsigned_body(note)
        if cp is None:
            bad.append("a checkpoint note in the export is malformed")
        else:
            parsed.append((cp.size, note))
    parsed.sort(key=lambda item: item[0])
    size = parsed[-1][0] if parsed else 0
    report = verify_stream(export.entries, parsed, key, size=size, origin=export.origin, trusted=trusted)
    if not bad:
        return report
    return dataclasses.replace(report, ok=False, problems=[*bad, *report.problems])


def verify_ledger(
    source: _VerifiableStore | LedgerExport, key: VerifierKey, trusted: Checkpoint | None = None
) -> VerifyReport:
    """Verify a whole ledger, from its store or from an export, against the ledger's public key.

    `trusted` is a checkpoint obtained independently of the store (from a witness, or saved earlier); the
    ledger must extend it. Without one, a store rolled back to an older consistent state verifies.
    """
    if isinstance(source, LedgerExport):
        return _export_stream(source, key, trusted)
    return _store_stream(source, key, trusted)
