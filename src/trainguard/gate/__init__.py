"""The load gate: verified loading and saving, the re-verification cache, ledger events and checkpoint audits.

`trainguard sign` / `trainguard verify` / `trainguard ckpt audit` run the handlers in `_commands`;
`VerifyCache` (in `_cache`) lets an unchanged checkpoint re-verify without re-hashing; `record` (in
`_events`) writes ``provenance.sign`` and ``provenance.verify`` events to the ledger; `audit` (in `_audit`)
compares the signings the ledger recorded with the files on disk. Importing this package imports no
framework: torch, numpy, safetensors and transformers are imported inside the functions that use them.
"""

from trainguard.gate._load import LoadRefused, install_load_gate, load, load_gate
from trainguard.gate._save import save

__all__ = ["LoadRefused", "install_load_gate", "load", "load_gate", "save"]
