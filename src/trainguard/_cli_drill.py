"""Arguments of `trainguard drill`; the handler imports the drill room only when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainguard._argtypes import handler, positive_int

_EPILOG = (
    "exit codes: 0 every attack caught and no false alarm in the clean run, 1 an attack slipped through "
    "or the clean run raised an alarm (named on stderr), 2 usage error"
)


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    drill = commands.add_parser(
        "drill",
        parents=[common],
        help="replay the 2024 sabotage against a real training job and score the defences",
        description="Train a small GPT-style language model data-parallel under `trainguard run` with the "
        "guard on, first clean, then with each of the incident's attacks planted from outside the guarded "
        "code (a patched module of the job, a checkpoint on the load path, a signal from another process, "
        "an edited checkpoint or ledger). Prints a scorecard: caught or not, by what, naming what, how "
        "soon, and the ledger entry that holds the evidence. Works in a throwaway folder; your own "
        "ledger, keys, checkpoints and environment are never touched.",
        epilog=_EPILOG,
    )
    drill.add_argument(
        "--attacks",
        nargs="+",
        metavar="NAME",
        help="attacks by name, or groups a-f (default: all)",
    )
    drill.add_argument("--world-size", type=positive_int, default=2, help="processes of the job (2)")
    drill.add_argument("--steps", type=positive_int, default=20, help="training steps per run (20)")
    drill.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (NCCL)")
    drill.add_argument(
        "--out", type=Path, default=Path("drill-report"), help="folder for drill.json and report.html"
    )
    drill.add_argument("--keep", action="store_true", help="keep the workspace (runs, ledger, keys)")
    drill.set_defaults(run=handler("trainguard.drill._commands", "cmd_drill"))
