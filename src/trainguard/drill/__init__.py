"""`trainguard drill`: the 2024 incident replayed against a real training job, and scored.

A small GPT-style language model trains data-parallel under `trainguard run` with the guard on; then each
attack of the incident is planted from outside the guarded code, as an insider would, and the drill
checks that it was caught, by what, naming what, and that the ledger holds the evidence. Everything
happens in a throwaway workspace.
"""
