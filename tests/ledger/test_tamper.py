"""Attacks on a ledger by someone with full write access to its database, on both stores.

Each test changes the tables with plain SQL, then checks that verification fails and names the first bad
index: exactly when the stored leaf hashes show it, otherwise the first entry after the last checkpoint that
still verifies (the documented bound). Rolling everything back to an older consistent state is caught only
against a checkpoint kept outside the database: that is the threat model, not a gap in these tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.ledger.conftest import ORIGIN, Attacker, event, make_ledger
from trainguard.errors import StoreError
from trainguard.ledger._keys import SigningKey
from trainguard.ledger._ledger import Ledger
from trainguard.ledger._note import Checkpoint, open_checkpoint, sign_checkpoint
from trainguard.ledger._verify import VerifyReport

# 40 entries in batches of 5: checkpoints at sizes 5, 10, ..., 40.
BATCHES = [5] * 8
SIZE = 40

AttackerFor = Callable[[str], Attacker]


@pytest.fixture
def ledger(location: str, key: SigningKey) -> Any:
    with make_ledger(location, key, BATCHES) as built:
        assert built.verify().ok
        yield built


def _verify(ledger: Ledger, key: SigningKey, trusted: Checkpoint | None = None) -> VerifyReport:
    with Ledger.open(ledger.location, verifier=key.verifier()) as fresh:
        return fresh.verify(trusted)


def _bad(report: VerifyReport, index: int) -> None:
    assert not report.ok
    assert report.first_bad_index == index, report.problems


def test_edited_entry(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker_for(ledger.location).execute(
        "UPDATE entries SET data = ? WHERE idx = ?", (event(1717, "run.hidden").canonical(), 17)
    )
    report = _verify(ledger, key)
    _bad(report, 17)
    assert "entry 17" in report.problems[0]


def test_entry_replaced_by_garbage(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker_for(ledger.location).execute("UPDATE entries SET data = ? WHERE idx = ?", (b'{"type": 1}', 3))
    report = _verify(ledger, key)
    _bad(report, 3)
    assert "entry 3 is not" in report.problems[0]


def test_deleted_row(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker_for(ledger.location).execute("DELETE FROM entries WHERE idx = ?", (22,))
    report = _verify(ledger, key)
    _bad(report, 22)
    # The stored leaf hash stands in for the row: nothing else is reported.
    assert report.problems == ["entry 22 is missing (its row was deleted or moved)"]


def test_deleted_rows(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker_for(ledger.location).execute("DELETE FROM entries WHERE idx BETWEEN ? AND ?", (8, 12))
    report = _verify(ledger, key)
    _bad(report, 8)
    assert report.problems == ["entries 8..12 are missing (5 rows deleted or moved)"]


def test_reordered_rows(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker = attacker_for(ledger.location)
    rows = dict(attacker.entries())
    attacker.execute("UPDATE entries SET data = ? WHERE idx = ?", (rows[23], 12))
    attacker.execute("UPDATE entries SET data = ? WHERE idx = ?", (rows[12], 23))
    _bad(_verify(ledger, key), 12)


def test_inserted_row_shifts_the_rest(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker = attacker_for(ledger.location)
    # Two steps, so that no primary key collides on the way.
    attacker.execute("UPDATE entries SET idx = -idx - 1 WHERE idx >= ?", (17,))
    attacker.execute("UPDATE entries SET idx = -idx WHERE idx < 0")
    attacker.execute("INSERT INTO entries (idx, data) VALUES (?, ?)", (17, event(999).canonical()))
    report = _verify(ledger, key)
    _bad(report, 17)
    assert any("not covered by any signed checkpoint" in p for p in report.problems)


def test_truncated_tail(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker = attacker_for(ledger.location)
    attacker.execute("DELETE FROM entries WHERE idx >= ?", (30,))
    attacker.delete_nodes_from(30, SIZE)
    report = _verify(ledger, key)
    _bad(report, 30)
    assert "entries 30..39 are missing" in report.problems[0]
    assert "checkpoint covers 40" in report.problems[0]


def test_unsigned_row_at_the_end(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker_for(ledger.location).execute(
        "INSERT INTO entries (idx, data) VALUES (?, ?)", (SIZE, event(SIZE).canonical())
    )
    _bad(_verify(ledger, key), SIZE)
    # Nor will trainguard sign over the foreign row.
    with pytest.raises(StoreError, match="damaged"):
        ledger.append(event(41))


def test_changed_interior_node(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker_for(ledger.location).execute(
        "UPDATE nodes SET hash = ? WHERE level = ? AND idx = ?", (b"\x00" * 32, 2, 3)
    )
    report = _verify(ledger, key)
    _bad(report, 12)  # node (2, 3) covers entries 12..15
    assert "tree node (2, 3)" in report.problems[0]


def test_entries_and_nodes_rewritten_without_resigning(
    ledger: Ledger, key: SigningKey, attacker_for: AttackerFor
) -> None:
    attacker = attacker_for(ledger.location)
    attacker.execute("UPDATE entries SET data = ? WHERE idx = ?", (event(1717).canonical(), 17))
    attacker.rebuild_nodes()
    report = _verify(ledger, key)
    # Nothing stored shows which entry changed; the checkpoint at 15 holds, the one at 20 does not.
    _bad(report, 15)
    assert "entries from 15 on are not covered by a valid checkpoint" in " ".join(report.problems)
    assert "the first invalid at size 20" in " ".join(report.problems)


def test_deleted_middle_checkpoint(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    attacker_for(ledger.location).execute("DELETE FROM checkpoints WHERE size = ?", (20,))
    report = _verify(ledger, key)
    assert not report.ok
    assert report.problems == [
        "the checkpoint at size 20 is missing: the one at size 25 was signed after it (its row was deleted)"
    ]


def test_replaced_verifier_key_in_the_meta_table(
    ledger: Ledger, key: SigningKey, attacker_for: AttackerFor
) -> None:
    forged = SigningKey.generate(key.name)
    attacker_for(ledger.location).execute(
        "UPDATE meta SET value = ? WHERE key = 'verifier'", (forged.verifier().text(),)
    )
    report = _verify_with_pinned_key(ledger, key)
    assert not report.ok
    assert report.problems == [
        f"the store records verifier key {forged.ident}, not the ledger's key {key.ident}: its meta table "
        "was changed"
    ]


def test_key_swap(ledger: Ledger, key: SigningKey, attacker_for: AttackerFor) -> None:
    """Rewrite history consistently and re-sign it with the attacker's key, under the same key name."""
    attacker = attacker_for(ledger.location)
    forged = SigningKey.generate(key.name)
    attacker.execute("UPDATE entries SET data = ? WHERE idx = ?", (event(1717).canonical(), 17))
    attacker.rebuild_nodes()
    attacker.execute("UPDATE meta SET value = ? WHERE key = 'verifier'", (forged.verifier().text(),))
    with Ledger.open(ledger.location, key=forged) as rewritten:
        for size in range(20, SIZE + 1, 5):
            note = sign_checkpoint(Checkpoint(ORIGIN, size, rewritten.root(size)), forged)
            attacker.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (note, size))
    report = _verify_with_pinned_key(ledger, key)
    _bad(report, 15)
    text = " ".join(report.problems)
    assert key.ident in text
    assert forged.ident in text


def _verify_with_pinned_key(ledger: Ledger, key: SigningKey) -> VerifyReport:
    # The meta table now names the forged key, so open without pinning and verify with the real one.
    with Ledger.open(ledger.location) as fresh:
        return fresh.verify(key=key.verifier())


def test_rollback_is_caught_only_against_a_trusted_checkpoint(
    ledger: Ledger, key: SigningKey, attacker_for: AttackerFor
) -> None:
    trusted = open_checkpoint(ledger.head()[1], key.verifier())
    attacker = attacker_for(ledger.location)
    attacker.execute("DELETE FROM entries WHERE idx >= ?", (25,))
    attacker.delete_nodes_from(25, SIZE)
    attacker.execute("DELETE FROM checkpoints WHERE size > ?", (25,))
    # An older, self-consistent ledger: nothing inside the database can show that it was longer.
    assert _verify(ledger, key).ok
    report = _verify(ledger, key, trusted)
    _bad(report, 25)
    assert "rolled back" in " ".join(report.problems)


def test_fork_against_a_trusted_checkpoint(ledger: Ledger, key: SigningKey) -> None:
    """A trusted checkpoint whose root the ledger does not have (a fork, e.g. with a stolen key)."""
    _, note = ledger.checkpoint(20)
    real = open_checkpoint(note, key.verifier())
    other = Checkpoint(real.origin, real.size, bytes(32))
    report = _verify(ledger, key, other)
    assert not report.ok
    assert "forked" in report.problems[0]
