"""Scan benchmark: trainguard against picklescan, modelscan, fickling and modelaudit, side by side.

Usage (from the repository root)::

    .venv/bin/python bench/scan/run.py [--workdir DIR] [--quick] [--markdown-out PATH]

It installs each peer into its own venv under ``WORKDIR/venvs``, builds (or reuses) a corpus under
``WORKDIR/corpus`` (harmless malicious samples, benign checkpoints made by torch/numpy/safetensors/joblib,
a folder of many benign checkpoints, 1 GiB and 4 GiB torch checkpoints), then measures:

* per-file detection: one invocation per sample and tool (detected, false alarms, errors, wall time);
* the folder: one invocation per tool over the whole folder (wall time; the median of interleaved rounds);
* the large checkpoints: one invocation per tool and file (wall time, warm page cache).

It prints a markdown table, writes every outcome to ``WORKDIR/results.json`` and, with ``--markdown-out``,
the table to a file.  ``--quick`` uses a 200-file folder and skips the 4 GiB checkpoint.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_corpus as corpus
import bench_tools as tools

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORKDIR = Path("/tmp/trainguard-bench")
FULL_FOLDER, QUICK_FOLDER = 2000, 200
FULL_LARGE, QUICK_LARGE = [1, 4], [1]
# Folder scans slower than this run once instead of once per round.
REPEAT_LIMIT_S = 60.0

TimeOf = Callable[["ToolResult"], "float | None"]


@dataclass
class ToolResult:
    """Everything measured for one tool."""

    name: str
    version: str
    verdict_rule: str
    unavailable: str = ""
    per_file: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample path -> outcome + label
    folder: dict[str, Any] | None = None
    large: dict[str, dict[str, Any]] = field(default_factory=dict)  # GiB -> outcome
    summary: dict[str, Any] = field(default_factory=dict)


def log(message: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"venvs, corpus and results.json live here (default {DEFAULT_WORKDIR})",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_FOLDER}-file folder, no 4 GiB checkpoint"
    )
    parser.add_argument("--markdown-out", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per invocation (default 600)")
    parser.add_argument(
        "--folder-timeout",
        type=float,
        default=3600.0,
        help="seconds for one whole-folder invocation (default 3600)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="re-print the tables from WORKDIR/results.json, run nothing",
    )
    parser.add_argument("--tools", help="comma-separated subset of tools to run (default: all)")
    parser.add_argument(
        "--folder-rounds",
        type=int,
        default=5,
        help="interleaved folder runs per tool; the median is reported (default 5)",
    )
    return parser.parse_args(argv)


def outcome_dict(outcome: tools.Outcome) -> dict[str, Any]:
    return asdict(outcome)


# --------------------------------------------------------------------------- measuring


def scratch_dir(workdir: Path, tool: tools.Tool) -> Path:
    """Per-tool working directory, so stray output files (e.g. fickling's JSON) stay out of the repo."""
    path = workdir / "scratch" / tool.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def measure_files(
    workdir: Path,
    root: Path,
    samples: list[corpus.Sample],
    toolset: list[tools.Tool],
    results: dict[str, ToolResult],
    timeout: float,
) -> None:
    """One invocation per (sample, tool); tools interleaved per sample so drift hits them all alike."""
    for index, sample in enumerate(samples, 1):
        path = corpus.sample_path(root, sample)
        for tool in toolset:
            scratch = scratch_dir(workdir, tool)
            outcome = tools.run_tool(
                tool, tool.file_cmd(path, scratch / "report.json"), scratch, timeout, scratch / "report.json"
            )
            results[tool.name].per_file[sample.path] = {
                "label": sample.label,
                "kind": sample.kind,
                **outcome_dict(outcome),
            }
        if index % 10 == 0 or index == len(samples):
            log(f"per-file: {index}/{len(samples)} samples")


def measure_folder(
    workdir: Path,
    folder: Path,
    count: int,
    toolset: list[tools.Tool],
    results: dict[str, ToolResult],
    timeout: float,
    rounds: int,
) -> None:
    """Each tool scans the whole folder in one invocation, in `rounds` interleaved rounds; the median counts.

    Interleaving spreads a noisy machine's slow spells over every tool alike. A tool whose first run took
    longer than REPEAT_LIMIT_S (or did not finish) runs once: repeating a 30-minute scan would add nothing.
    """
    runs: dict[str, list[tools.Outcome]] = {tool.name: [] for tool in toolset}
    for round_no in range(1, rounds + 1):
        for tool in toolset:
            if tool.folder_cmd is None:
                results[tool.name].folder = {
                    "verdict": "n/a",
                    "detail": "CLI scans one file per invocation",
                    "files": count,
                }
                continue
            done = runs[tool.name]
            if done and (done[0].verdict == "timeout" or done[0].seconds > REPEAT_LIMIT_S):
                continue
            log(f"folder ({count} files), round {round_no}/{rounds}: {tool.name}")
            scratch = scratch_dir(workdir, tool)
            report = scratch / "folder-report.json"
            done.append(tools.run_tool(tool, tool.folder_cmd(folder, report), scratch, timeout, report))
    for name, done in runs.items():
        if not done:
            continue
        median = sorted(done, key=lambda o: o.seconds)[(len(done) - 1) // 2]
        results[name].folder = {
            "files": count,
            **outcome_dict(median),
            "runs_seconds": [round(o.seconds, 4) for o in done],
        }


def measure_large(
    workdir: Path,
    files: dict[int, Path],
    toolset: list[tools.Tool],
    results: dict[str, ToolResult],
    timeout: float,
) -> None:
    """One invocation per tool and large checkpoint, with the file already in the page cache."""
    for gib, path in files.items():
        corpus.warm_page_cache(path)
        for tool in toolset:
            log(f"{gib} GiB checkpoint: {tool.name}")
            scratch = scratch_dir(workdir, tool)
            outcome = tools.run_tool(
                tool, tool.file_cmd(path, scratch / "report.json"), scratch, timeout, scratch / "report.json"
            )
            results[tool.name].large[str(gib)] = outcome_dict(outcome)


# --------------------------------------------------------------------------- summarising


def summarise(result: ToolResult) -> dict[str, Any]:
    """Counts and timings for the table."""
    rows = list(result.per_file.values())
    malicious = [r for r in rows if r["label"] == "malicious"]
    benign = [r for r in rows if r["label"] == "benign"]
    failed = ("error", "timeout")
    return {
        "malicious": len(malicious),
        "detected": sum(r["verdict"] == "flagged" for r in malicious),
        "missed": [
            name
            for name, r in result.per_file.items()
            if r["label"] == "malicious" and r["verdict"] != "flagged"
        ],
        "benign": len(benign),
        "false_alarms": sum(r["verdict"] == "flagged" for r in benign),
        "false_alarm_files": [
            name
            for name, r in result.per_file.items()
            if r["label"] == "benign" and r["verdict"] == "flagged"
        ],
        "errors": sum(r["verdict"] in failed for r in rows),
        "skipped": sum(r["verdict"] == "skipped" for r in rows),
        "mean_seconds": sum(r["seconds"] for r in rows) / len(rows) if rows else None,
    }


def timed(entry: dict[str, Any] | None) -> float | None:
    """Wall time of a folder/large run that finished (any verdict but timeout or n/a)."""
    if not entry or entry.get("verdict") in ("n/a", "timeout", None):
        return None
    return float(entry["seconds"])


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def fmt_errors(summary: dict[str, Any]) -> str:
    """Error count, with the files a tool declined as unsupported (misses, not errors) alongside."""
    skipped = int(summary.get("skipped", 0))
    return f"{summary['errors']} (+{skipped} unsupported)" if skipped else str(summary["errors"])


def fmt_run(entry: dict[str, Any] | None) -> str:
    """Seconds, plus the verdict when the run did not come back clean."""
    if not entry:
        return "n/a"
    verdict = entry.get("verdict")
    if verdict in ("n/a", "timeout"):
        return str(verdict)
    text = fmt_seconds(float(entry["seconds"]))
    return text if verdict == "clean" else f"{text} ({verdict})"


def fastest_peer(results: list[ToolResult], value: TimeOf) -> tuple[str, float] | None:
    """(name, seconds) of the fastest peer by ``value(result)``, ignoring peers without a time."""
    times = [(r.name, value(r)) for r in results if r.name != "trainguard" and not r.unavailable]
    finite = [(n, t) for n, t in times if t is not None]
    return min(finite, key=lambda item: item[1]) if finite else None


def ratio_line(label: str, results: list[ToolResult], value: TimeOf) -> str:
    """trainguard's time over the fastest peer's (and over each other peer's)."""
    ours = next((value(r) for r in results if r.name == "trainguard" and not r.unavailable), None)
    best = fastest_peer(results, value)
    if ours is None or best is None or best[1] <= 0:
        return f"- {label}: n/a"
    others = [
        f"{r.name} {fmt_ratio(ours / t)}"
        for r in results
        if r.name not in ("trainguard", best[0]) and not r.unavailable and (t := value(r))
    ]
    name, seconds = best
    line = f"- {label}: **{fmt_ratio(ours / seconds)}** the fastest peer ({name}, {fmt_seconds(seconds)} s)"
    return line + (f"; vs the others: {', '.join(others)}" if others else "")


def folder_per_file(result: ToolResult) -> float | None:
    seconds = timed(result.folder)
    return seconds / result.folder["files"] if seconds is not None and result.folder else None


def markdown(results: list[ToolResult], folder_count: int, large: list[int]) -> str:
    """The results table, ratio lines and a per-sample verdict table."""
    head = [
        "Tool",
        "Version",
        "Detected / malicious",
        "False alarms / benign",
        "Errors",
        "Mean s / file",
        f"Folder ({folder_count} files) s",
        "Folder s / file",
        *[f"{g} GiB s" for g in large],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.unavailable:
            reason = r.unavailable.replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {r.name} | {r.version or '-'} | unavailable: {reason} |" + " |" * (len(head) - 3)
            )
            continue
        s = r.summary
        per_file = folder_per_file(r)
        cells = [
            r.name,
            r.version,
            f"{s['detected']} / {s['malicious']}",
            f"{s['false_alarms']} / {s['benign']}",
            fmt_errors(s),
            fmt_seconds(s["mean_seconds"]),
            fmt_run(r.folder),
            f"{per_file * 1000:.2f} ms" if per_file is not None else "n/a",
            *[fmt_run(r.large.get(str(g))) for g in large],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "trainguard time relative to the fastest peer (lower is better):",
        ratio_line(
            f"folder ({folder_count} files, one invocation, median of interleaved rounds)",
            results,
            lambda r: timed(r.folder),
        ),
        ratio_line(
            "per file (mean of one invocation per sample)", results, lambda r: r.summary.get("mean_seconds")
        ),
        "",
        "Folder runs, in seconds, in the order run: "
        + "; ".join(
            f"{r.name} {', '.join(f'{t:.3f}' for t in r.folder['runs_seconds'])}"
            for r in results
            if r.folder and r.folder.get("runs_seconds")
        ),
        "",
        "Folder and large-file cells show the verdict in brackets when it was not clean.",
        "",
        verdict_table(results),
        "",
        rules_section(results),
    ]
    return "\n".join(lines) + "\n"


def rules_section(results: list[ToolResult]) -> str:
    """How each tool's answer was turned into a verdict."""
    lines = ["<details><summary>How verdicts are read</summary>", ""]
    lines += [f"- {r.name}: {r.verdict_rule}" for r in results]
    lines += [
        "- every tool: exit 1 with an uncaught Python traceback is an error, not a detection; "
        "a run killed at the time limit is an error (timeout)",
        "",
        "</details>",
    ]
    return "\n".join(lines)


_MARK = {"flagged": "flagged", "clean": "clean", "error": "ERROR", "timeout": "TIMEOUT", "skipped": "skipped"}


def verdict_table(results: list[ToolResult]) -> str:
    """Per-sample verdicts, so misses and false alarms can be traced to a file."""
    available = [r for r in results if not r.unavailable]
    if not available:
        return ""
    head = ["Sample", "Label", *[r.name for r in available]]
    lines = [
        "<details><summary>Per-sample verdicts</summary>",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, first in available[0].per_file.items():
        cells = [name, first["label"]]
        for r in available:
            verdict = r.per_file.get(name, {}).get("verdict", "-")
            expected = "flagged" if first["label"] == "malicious" else "clean"
            mark = _MARK.get(verdict, verdict)
            cells.append(mark if verdict == expected else f"**{mark}**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", "</details>"])


# --------------------------------------------------------------------------- main


def select_tools(workdir: Path, only: str | None) -> list[tools.Tool]:
    """trainguard and the peers (installing those missing), or the ``--tools`` subset of them."""
    known = ["trainguard", *tools.PEER_FACTORIES]
    wanted = [t.strip() for t in only.split(",")] if only else known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"unknown tool(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    peers = [name for name in tools.PEER_FACTORIES if name in wanted]
    trainguard = [tools.trainguard_tool(REPO, workdir / "venvs", log)] if "trainguard" in wanted else []
    return trainguard + tools.peer_tools(workdir / "venvs", log, peers)


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Install, build, measure; returns the results.json payload."""
    folder_count = QUICK_FOLDER if args.quick else FULL_FOLDER
    large = QUICK_LARGE if args.quick else FULL_LARGE
    started = time.perf_counter()
    toolset = select_tools(workdir, args.tools)
    for tool in toolset:
        state = f"UNAVAILABLE: {tool.unavailable}" if tool.unavailable else "ready"
        log(f"{tool.name} {tool.version} {state}")
    root = workdir / "corpus"
    manifest = corpus.ensure_corpus(root, folder_count, large, log)
    folder = root / manifest.folders[str(folder_count)]["path"]
    large_files = {g: root / manifest.large[str(g)]["path"] for g in large}

    results = {t.name: ToolResult(t.name, t.version, t.verdict_rule, t.unavailable) for t in toolset}
    runnable = [t for t in toolset if not t.unavailable]
    measure_files(workdir, root, manifest.samples, runnable, results, args.timeout)
    measure_folder(workdir, folder, folder_count, runnable, results, args.folder_timeout, args.folder_rounds)
    measure_large(workdir, large_files, runnable, results, args.timeout)
    for result in results.values():
        if not result.unavailable:
            result.summary = summarise(result)
    return {
        "environment": environment(),
        "quick": args.quick,
        "timeout_s": args.timeout,
        "folder_timeout_s": args.folder_timeout,
        "folder_rounds": args.folder_rounds,
        "elapsed_s": time.perf_counter() - started,
        "folder_count": folder_count,
        "large_gib": large,
        "corpus": {
            "root": str(root),
            "generator_version": corpus.GENERATOR_VERSION,
            "samples": [asdict(s) for s in manifest.samples],
            "folder": manifest.folders[str(folder_count)],
            "large": {str(g): manifest.large[str(g)] for g in large},
        },
        "tools": {name: asdict(r) for name, r in results.items()},
    }


def render(payload: dict[str, Any]) -> str:
    """The markdown for a results.json payload."""
    results = [ToolResult(**raw) for raw in payload["tools"].values()]
    quick = bool(payload.get("quick"))
    folder_count = int(payload.get("folder_count", QUICK_FOLDER if quick else FULL_FOLDER))
    large = [int(g) for g in payload.get("large_gib", QUICK_LARGE if quick else FULL_LARGE)]
    return markdown(results, folder_count, large)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    results_path = workdir / "results.json"
    payload = json.loads(results_path.read_text()) if args.render_only else run_benchmark(args, workdir)
    table = render(payload)
    payload["markdown"] = table
    print(table)
    if not args.render_only:
        results_path.write_text(json.dumps(payload, indent=2))
        log(f"wrote {results_path} ({payload['elapsed_s']:.0f} s)")
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
