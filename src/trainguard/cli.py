"""The `trainguard` command. Each subcommand imports its room only when it runs, so `--help` is instant."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from trainguard import __version__
from trainguard._argtypes import positive_int, ratio
from trainguard._cli_drill import add_commands as add_drill_commands
from trainguard._cli_env import add_commands as add_env_commands
from trainguard._cli_ledger import add_commands as add_ledger_commands
from trainguard._cli_provenance import add_commands as add_provenance_commands
from trainguard._cli_relay import add_commands as add_relay_commands
from trainguard._cli_run import add_commands as add_run_commands
from trainguard._cli_server import add_commands as add_server_commands
from trainguard.errors import ExitCode, TrainguardError, UsageError

log = logging.getLogger("trainguard")

_EPILOG = "exit codes: 0 clean, 1 findings, 2 usage error, 3 could not decide (fail closed)"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="say more (repeat for debug logs)")
    parser = argparse.ArgumentParser(
        prog="trainguard",
        description="Protects shared PyTorch training clusters from sabotage and silent corruption.",
        epilog=_EPILOG,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"trainguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = commands.add_parser(
        "scan",
        parents=[common],
        help="statically analyse model artifacts without executing them",
        description="Scan pickle, PyTorch (TorchScript too), NumPy, joblib, safetensors, GGUF, Keras, ONNX "
        "and TensorFlow files, folders and archives. Formats are recognised by their bytes; nothing in an "
        "artifact is imported or run.",
        epilog=_EPILOG,
    )
    scan.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (scanned recursively)")
    scan.add_argument("--format", choices=("text", "json", "sarif"), default="text", help="output format")
    scan.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write the report to this file instead of stdout"
    )
    scan.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="MODULE.NAME",
        help="also allow this import (or MODULE.*); repeatable",
    )
    scan.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        default=os.environ.get("TRAINGUARD_POLICY") or None,
        help="TOML policy file with [scan.allow] entries (env: TRAINGUARD_POLICY)",
    )
    scan.add_argument(
        "--jobs",
        type=positive_int,
        metavar="N",
        default=os.environ.get("TRAINGUARD_JOBS") or None,
        help="worker processes (default: every core; env: TRAINGUARD_JOBS)",
    )
    scan.add_argument("--no-progress", action="store_true", help="no progress line on a terminal")
    scan.add_argument(
        "--max-depth", type=positive_int, metavar="N", help="containers nested inside each other (16)"
    )
    scan.add_argument(
        "--max-expanded-bytes",
        type=positive_int,
        metavar="BYTES",
        help="bytes decompressed from one file's containers (8 GiB)",
    )
    scan.add_argument(
        "--max-ratio", type=ratio, metavar="RATIO", help="compression ratio that counts as a bomb (200)"
    )
    scan.add_argument(
        "--max-ops",
        type=positive_int,
        metavar="N",
        help="pickle opcodes run for one file, all its pickles together (20000000)",
    )
    scan.set_defaults(run=_cmd_scan)
    add_ledger_commands(commands, common)
    add_provenance_commands(commands, common)
    add_env_commands(commands, common)
    add_run_commands(commands, common)
    add_drill_commands(commands, common)
    add_server_commands(commands, common)
    add_relay_commands(commands, common)
    return parser


class _ProgressLine:
    """A single self-overwriting progress line on stderr, at most ten updates a second."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, done: int, total: int, path: str) -> None:
        now = time.monotonic()
        if done != total and now - self._last < 0.1:
            return
        self._last = now
        name = path if len(path) <= 60 else "..." + path[-57:]
        sys.stderr.write(f"\r\033[Kscanning {done}/{total} {name}")
        if done == total:
            sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def _write_output(path: Path, text: str) -> None:
    """Write atomically, so an interrupted run never leaves half a report over a good one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _cmd_scan(args: argparse.Namespace) -> int:
    import dataclasses

    from trainguard.report.interface import renderer_for
    from trainguard.scan import ScanLimits, ScanOptions, scan_path

    limits = ScanLimits()
    overrides = {
        "max_depth": args.max_depth,
        "max_expanded_bytes": args.max_expanded_bytes,
        "max_ratio": args.max_ratio,
    }
    limits = dataclasses.replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    if args.max_ops is not None:
        limits = dataclasses.replace(limits, pickle=dataclasses.replace(limits.pickle, max_ops=args.max_ops))
    progress = None if args.no_progress or not sys.stderr.isatty() else _ProgressLine()
    options = ScanOptions(
        allow=tuple(args.allow),
        policy_file=args.policy,
        limits=limits,
        jobs=int(args.jobs) if args.jobs else None,
        progress=progress,
    )
    report = scan_path(args.paths, options)
    color = (
        args.format == "text" and args.output is None and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    )
    text = renderer_for(args.format, verbose=args.verbose > 0, color=color).render(report)
    if args.output is not None:
        _write_output(args.output, text)
    else:
        sys.stdout.write(text)
    return report.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose >= 2 else logging.INFO if args.verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="trainguard: %(message)s")
    try:
        return int(args.run(args))
    except TrainguardError as exc:
        sys.stderr.write(f"trainguard: error: {exc.diagnostics()}\n")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("trainguard: interrupted\n")
        return 130
    except BrokenPipeError:
        return int(ExitCode.CLEAN)
    except Exception as exc:  # a bug must not turn into a "clean" verdict or a traceback
        log.debug("internal error", exc_info=True)
        sys.stderr.write(
            f"trainguard: internal error: {type(exc).__name__}: {exc} (run with -vv for details)\n"
        )
        return int(ExitCode.UNDECIDED)
