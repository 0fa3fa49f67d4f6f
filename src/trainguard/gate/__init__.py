"""The load gate: verified loading and saving, the re-verification cache, ledger events and checkpoint audits.

`trainguard sign` / `trainguard verify` / `trainguard ckpt audit` run the handlers in `_commands`;
`VerifyCache` (in `_cache`) lets an unchanged checkpoint re-verify without re-hashing; `record` (in
`_events`) writes ``provenance.sign`` and ``provenance.verify`` events to the ledger; `audit` (in `_audit`)
compares the signings the ledger recorded with the files on disk. Importing this package imports no
framework: torch, numpy, safetensors and transformers are imported inside the functions that use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard._lazy import lazy_exports

if TYPE_CHECKING:
    from trainguard.gate._load import LoadRefused, install_load_gate, load, load_gate
    from trainguard.gate._save import save

__all__ = ["LoadRefused", "install_load_gate", "load", "load_gate", "save"]

# Imported on first use, so `trainguard sign` and `verify` do not load the load gate.
_HOMES = {
    "LoadRefused": "_load",
    "install_load_gate": "_load",
    "load": "_load",
    "load_gate": "_load",
    "save": "_save",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
