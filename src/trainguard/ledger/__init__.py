"""A tamper-evident, append-only evidence log: RFC 9162 Merkle tree, signed checkpoints, proofs, witness.

from trainguard.ledger import Ledger, new_event

with Ledger.open() as ledger:                      # $TRAINGUARD_HOME/ledger.db, or a postgresql:// URL
    index = ledger.append(new_event("run.start", {"world_size": 512}, run_id="r42"))
    checkpoint, note = ledger.head()               # signed (C2SP signed-note) tree head
    proof = ledger.inclusion_proof(index)          # RFC 9162, checked with verify_inclusion
    assert ledger.verify().ok                      # every entry, stored hash and signature
"""

from trainguard.ledger._events import Actor, EntryError, Event, new_event
from trainguard.ledger._keys import ALG_COSIGNATURE_V1, ALG_ED25519, SigningKey, VerifierKey
from trainguard.ledger._ledger import Ledger, default_home, default_key_path, default_location
from trainguard.ledger._merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion
from trainguard.ledger._note import Checkpoint, open_checkpoint, sign_checkpoint
from trainguard.ledger._store import Store, open_store
from trainguard.ledger._verify import LedgerExport, VerifyReport, verify_ledger

__all__ = [
    "ALG_COSIGNATURE_V1",
    "ALG_ED25519",
    "Actor",
    "Checkpoint",
    "EntryError",
    "Event",
    "Ledger",
    "LedgerExport",
    "ProofError",
    "SigningKey",
    "Store",
    "VerifierKey",
    "VerifyReport",
    "default_home",
    "default_key_path",
    "default_location",
    "leaf_hash",
    "new_event",
    "open_checkpoint",
    "open_store",
    "sign_checkpoint",
    "verify_consistency",
    "verify_inclusion",
    "verify_ledger",
]
