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
        usage="%(prog)s [options] [--script FILE [-- ARGS...]]",
        description="Train a small GPT-style language model data-parallel under `trainguard run` with the "
        "guard on, first clean, then with each of the incident's attacks planted from outside the guarded "
        "code (a patched module of the job, a checkpoint on the load path, a signal from another process, "
        "an edited checkpoint or ledger). Prints a scorecard: caught or not, by what, naming what, how "
        "soon, and the ledger entry that holds the evidence. Works in a throwaway folder; your own "
        "ledger, keys, checkpoints and environment are never touched. With --script, the job is your own "
        "training script instead, so that the drill tests your real stack.",
        epilog=_EPILOG,
    )
    drill.add_argument(
        "--attacks",
        nargs="+",
        metavar="NAME",
        help="attacks by name, or groups a-f (default: all)",
    )
    drill.add_argument("--world-size", type=positive_int, default=2, help="processes of the job (2)")
    drill.add_argument(
        "--steps",
        type=positive_int,
        help="training steps per run of the built-in job (20); a script takes its own after --",
    )
    drill.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (NCCL)")
    drill.add_argument(
        "--out", type=Path, default=Path("drill-report"), help="folder for drill.json and report.html"
    )
    drill.add_argument("--keep", action="store_true", help="keep the workspace (runs, ledger, keys)")
    drill.add_argument(
        "--script",
        type=Path,
        metavar="FILE",
        help="drill your own training script instead of the built-in job: one that calls trainguard.watch "
        "(or uses the callbacks) and runs data-parallel under torchrun. It runs as `torchrun "
        "--nproc-per-node=WORLD FILE ARGS` under `trainguard run`, from a throwaway folder (relative "
        "outputs land there) with the drill's own home, keys and ledger; the file is never edited nor "
        "copied: code is planted through a sitecustomize.py put first on the job's PYTHONPATH (the attacks "
        "on the training loop's optimizer and guard act from a thread of their own that finds them). Give "
        "its "
        "arguments after -- (--steps is not passed on: make it train past step 6, ideally 12 steps or "
        "more, and save 2 signed checkpoints with trainguard.save for the checkpoint attacks). Attacks the "
        "script gives no hold for (resuming from a checkpoint, an optimizer patch when it does not run "
        "AdamW single-tensor, no signed checkpoint) are 'not applicable', with the reason, and count "
        "neither way",
    )
    drill.add_argument(
        "script_args",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="the script's own arguments, after --",
    )
    drill.set_defaults(run=handler("trainguard.drill._commands", "cmd_drill"))
