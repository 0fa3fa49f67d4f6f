"""Scanner adapters for the scan benchmark: install peers into their own venvs, run each CLI, read verdicts.

Each tool turns (exit code, stdout, stderr, report file) into one verdict:

* ``flagged``: the tool says the file is unsafe (or, for trainguard, could not decide);
* ``clean``: the tool scanned it and found nothing;
* ``skipped``: the tool says it does not handle this file type (counts as a miss, not an error);
* ``error``: the tool failed and reported no finding; ``timeout``: killed after the time limit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TORCH_PIN = "torch==2.13.0"
TORCH_WHEELS = "/opt/wheels"

# Pinned so verdict parsing stays valid; bump deliberately and re-check each adapter below.  Extras beyond
# the peer itself are what its CLI needs to judge the corpus fairly:
PEER_REQUIREMENTS: dict[str, list[str]] = {
    # picklescan imports numpy to read .npy files but does not declare it.
    "picklescan": ["picklescan==1.0.5", "numpy"],
    # modelscan 0.8.8 calls numpy.lib.format._check_version, which numpy 2.3 removed.
    "modelscan": ["modelscan==0.8.8", "numpy<2.3"],
    # fickling 0.1.12 imports typing_extensions on Python < 3.12 but only declares it in dev extras.
    "fickling": ["fickling==0.1.12", "typing_extensions"],
    # modelaudit proves torch/numpy/joblib globals safe against the installed modules; without them it warns
    # on every benign torch and joblib file.
    "modelaudit": ["modelaudit==0.2.54", "joblib"],
}
PEERS_NEEDING_TORCH = {"modelaudit"}

QUIET_ENV = {
    # modelaudit sends usage telemetry unless told not to; the others ignore these.
    "PROMPTFOO_DISABLE_TELEMETRY": "1",
    "NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "NO_COLOR": "1",
    "PYTHONWARNINGS": "ignore",
}


@dataclass
class Outcome:
    """One tool invocation."""

    verdict: str
    rc: int | None
    seconds: float
    detail: str = ""


@dataclass
class Tool:
    """A scanner CLI and how to read its answer."""

    name: str
    version: str
    file_cmd: Callable[[Path, Path], list[str]]  # (target, report file) -> argv
    folder_cmd: Callable[[Path, Path], list[str]] | None
    classify: Callable[[int, str, str, Path], tuple[str, str]]  # -> (verdict, detail)
    verdict_rule: str
    env: dict[str, str] = field(default_factory=dict)
    unavailable: str = ""  # why the tool could not be run at all


# --------------------------------------------------------------------------- venvs


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pip(venv: Path, args: list[str], log: Path) -> None:
    cmd = [str(_venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", *args]
    with log.open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=1800)


def installed_version(venv: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    out = subprocess.run([str(_venv_python(venv)), "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def ensure_peer_venv(venvs: Path, name: str, log: Callable[[str], None]) -> tuple[Path, str]:
    """Create (or reuse) ``venvs/name`` with the pinned peer; returns (venv, installed version)."""
    venv = venvs / name
    marker = venv / "bench-installed.json"
    wanted = PEER_REQUIREMENTS[name]
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("requirements") == wanted and saved.get("torch") == (name in PEERS_NEEDING_TORCH):
            return venv, str(saved["version"])
    if venv.exists():
        shutil.rmtree(venv)
    log(f"installing {name} into {venv}")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install_log = venv / "install.log"
    if name in PEERS_NEEDING_TORCH:
        _pip(venv, ["--find-links", TORCH_WHEELS, TORCH_PIN], install_log)
    _pip(venv, wanted, install_log)
    version = installed_version(venv, name)
    marker.write_text(
        json.dumps({"requirements": wanted, "torch": name in PEERS_NEEDING_TORCH, "version": version})
    )
    return venv, version


# --------------------------------------------------------------------------- running


def run_tool(tool: Tool, argv: list[str], cwd: Path, timeout: float, report: Path) -> Outcome:
    """Run one invocation, timing wall clock, and classify the result."""
    report.unlink(missing_ok=True)
    env = {**os.environ, **QUIET_ENV, **tool.env}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Outcome("timeout", None, time.perf_counter() - start, f"killed after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    if crashed(proc.returncode, proc.stderr):
        return Outcome("error", proc.returncode, seconds, f"crashed: {_tail(proc.stderr)}")
    try:
        verdict, detail = tool.classify(proc.returncode, proc.stdout, proc.stderr, report)
    except Exception as exc:  # a report we cannot read is the tool's error, not the harness's
        verdict, detail = "error", f"unreadable output: {exc!r}"
    if verdict == "error" and not detail:
        detail = _tail(proc.stderr or proc.stdout)
    return Outcome(verdict, proc.returncode, seconds, detail)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def crashed(rc: int, stderr: str) -> bool:
    """An uncaught Python exception also exits 1, which must not read as "flagged"."""
    if rc != 1 or "Traceback (most recent call last)" not in stderr:
        return False
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return bool(lines) and bool(_EXCEPTION_LINE.match(lines[-1]))


def _tail(text: str, limit: int = 300) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-limit:]


def _read_json(path: Path, fallback: str) -> Any:
    if path.exists() and path.stat().st_size:
        return json.loads(path.read_text())
    return json.loads(fallback)


# --------------------------------------------------------------------------- trainguard


def _trainguard_findings(stdout: str) -> str:
    """The rules behind a trainguard verdict, read from its JSON report (empty if unreadable)."""
    try:
        data = json.loads(stdout)
    except ValueError:
        return ""
    rules = {f.get("rule", "?") for r in data.get("results", []) for f in r.get("findings", [])}
    problems = sum(len(r.get("problems", [])) for r in data.get("results", []))
    return ", ".join(sorted(rules)) + (f"; {problems} problems" if problems else "")


def _classify_trainguard(rc: int, stdout: str, stderr: str, _report: Path) -> tuple[str, str]:
    if rc == 0:
        return "clean", ""
    if rc == 1:
        return "flagged", _trainguard_findings(stdout) or "findings"
    if rc == 3:
        return "flagged", "could not decide (exit 3): " + _trainguard_findings(stdout)
    return "error", f"exit {rc}: {_tail(stderr or stdout)}"


def trainguard_tool(repo: Path, venvs: Path, log: Callable[[str], None]) -> Tool:
    """trainguard installed from the working tree into its own venv, as the peers are installed from PyPI.

    A regular (not editable) install compiles the bytecode, as ``pip install trainguard`` would; an
    editable install in an environment with PYTHONDONTWRITEBYTECODE would compile every module at each
    start, a cost no user pays.
    """
    venv = venvs / "trainguard"
    exe = venv / "bin" / "trainguard"
    rule = "exit 0 clean; 1 findings and 3 could-not-decide count as flagged; 2 or anything else is an error"
    tool = Tool(
        "trainguard",
        "",
        lambda p, _r: [str(exe), "scan", str(p), "--format", "json"],
        lambda p, _r: [str(exe), "scan", str(p), "--format", "json"],
        _classify_trainguard,
        rule,
    )
    install_log = venvs / "trainguard-install.log"
    try:
        if not _venv_python(venv).exists():
            log(f"installing trainguard's dependencies into {venv}")
            venv.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            _pip(venv, [str(repo)], install_log)
        # The current tree, every run: the dependencies stay, trainguard itself is rebuilt.
        _pip(venv, ["--no-deps", "--force-reinstall", str(repo)], install_log)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        tool.unavailable = f"pip install of {repo} failed ({exc}); see {install_log}"
        return tool
    probe = subprocess.run([str(exe), "scan", "--help"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        tool.unavailable = f"`trainguard scan --help` exited {probe.returncode}: {_tail(probe.stderr, 160)}"
        return tool
    tool.version = _trainguard_version(repo)
    return tool


def _trainguard_version(repo: Path) -> str:
    try:
        from importlib.metadata import version

        ver = version("trainguard")
    except Exception:
        ver = "unknown"
    rev = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if rev:
        ver += f" ({rev}{'+dirty' if dirty else ''})"
    return ver


# --------------------------------------------------------------------------- picklescan

_PS_DANGEROUS = re.compile(r"^Dangerous globals: (\d+)", re.MULTILINE)


def _classify_picklescan(rc: int, stdout: str, stderr: str, _report: Path) -> tuple[str, str]:
    match = _PS_DANGEROUS.search(stdout)
    dangerous = int(match.group(1)) if match else 0
    if dangerous or rc == 1:
        return "flagged", f"{dangerous} dangerous globals" + (" (with scan errors)" if rc == 2 else "")
    if rc == 0:
        return "clean", ""
    return "error", f"exit {rc}: {_tail(stdout + stderr)}"


def picklescan_tool(venv: Path, version: str) -> Tool:
    exe = str(venv / "bin" / "picklescan")
    rule = (
        "exit 1 = dangerous globals; exit 2 = scan error, counted as flagged when the summary still "
        "reports 'Dangerous globals: N>0'; exit 0 = clean"
    )
    return Tool(
        "picklescan",
        version,
        lambda p, _r: [exe, "-p", str(p)],
        lambda p, _r: [exe, "-p", str(p)],
        _classify_picklescan,
        rule,
    )


# --------------------------------------------------------------------------- modelscan


def _classify_modelscan(rc: int, stdout: str, stderr: str, report: Path) -> tuple[str, str]:
    data = _read_json(report, "{}")
    issues = int(data.get("summary", {}).get("total_issues", 0))
    errors = data.get("errors", [])
    if issues or rc == 1:
        return "flagged", f"{issues} issues" + (" (with scan errors)" if errors else "")
    if rc == 0:
        return "clean", ""
    if rc == 3:
        return "skipped", "no supported files"
    first = errors[0].get("description", "") if errors else _tail(stdout + stderr)
    return "error", f"exit {rc}: {str(first)[:200]}"


def modelscan_tool(venv: Path, version: str) -> Tool:
    exe = str(venv / "bin" / "modelscan")
    rule = (
        "JSON report total_issues > 0 (exit 1) = flagged; exit 0 = clean; exit 3 = no supported file "
        "(skipped, a miss); exit 2 with no issues = error"
    )

    def cmd(path: Path, report: Path) -> list[str]:
        return [exe, "scan", "-p", str(path), "-r", "json", "-o", str(report)]

    return Tool("modelscan", version, cmd, cmd, _classify_modelscan, rule)


# --------------------------------------------------------------------------- fickling


def _classify_fickling(rc: int, stdout: str, stderr: str, _report: Path) -> tuple[str, str]:
    if rc == 0:
        return "clean", ""
    if rc == 1:
        return "flagged", "unsafe"
    return "error", f"exit {rc}: {_tail(stderr or stdout)}"


def fickling_tool(venv: Path, version: str) -> Tool:
    exe = str(venv / "bin" / "fickling")
    rule = (
        "`--check-safety`: exit 1 = unsafe (flagged), 0 = clean, 2 = could not parse (error); "
        "the CLI takes one file, so there is no folder run"
    )
    return Tool(
        "fickling",
        version,
        lambda p, r: [exe, "--check-safety", "--json-output", str(r), str(p)],
        None,
        _classify_fickling,
        rule,
    )


# --------------------------------------------------------------------------- modelaudit

_MA_SECURITY = {"critical", "warning"}


def _classify_modelaudit(rc: int, stdout: str, stderr: str, _report: Path) -> tuple[str, str]:
    data = json.loads(stdout) if stdout.strip().startswith("{") else {}
    severities = [str(i.get("severity", "")).lower() for i in data.get("issues", [])]
    serious = sum(s in _MA_SECURITY for s in severities)
    if serious or rc == 1:
        return "flagged", f"{serious} warning/critical issues" + (" (with scan errors)" if rc == 2 else "")
    if rc == 0:
        return "clean", ""
    outcomes = {
        str(m.get("scan_outcome")) for m in data.get("file_metadata", {}).values() if isinstance(m, dict)
    }
    if rc == 2 and not data.get("has_errors") and "inconclusive" in outcomes:
        # modelaudit fails closed when it cannot cover a file: the same as trainguard's exit 3.
        return "flagged", "inconclusive (fails closed)"
    return "error", f"exit {rc}: {_tail(stderr or stdout)}"


def modelaudit_tool(venv: Path, version: str) -> Tool:
    exe = str(venv / "bin" / "modelaudit")
    rule = (
        "`scan --no-cache --format json`: exit 1 or any WARNING/CRITICAL issue in the JSON = flagged "
        "(its exit 2 for an operational error wins over findings); exit 2 with scan_outcome 'inconclusive' "
        "and no operational error = flagged (fails closed, like trainguard's exit 3); exit 0 = clean; "
        "any other exit 2 = error"
    )

    def cmd(path: Path, _report: Path) -> list[str]:
        return [exe, "scan", "--no-cache", "--format", "json", str(path)]

    return Tool("modelaudit", version, cmd, cmd, _classify_modelaudit, rule)


PEER_FACTORIES: dict[str, Callable[[Path, str], Tool]] = {
    "picklescan": picklescan_tool,
    "modelscan": modelscan_tool,
    "fickling": fickling_tool,
    "modelaudit": modelaudit_tool,
}


def _peer_tool(venvs: Path, name: str, log: Callable[[str], None]) -> Tool:
    factory = PEER_FACTORIES[name]
    try:
        venv, version = ensure_peer_venv(venvs, name, log)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        tool = factory(venvs / name, "")
        tool.unavailable = f"install failed: {exc!r} (see {venvs / name / 'install.log'})"
        return tool
    return factory(venv, version)


def peer_tools(venvs: Path, log: Callable[[str], None], names: list[str]) -> list[Tool]:
    """The named peers, installed on demand; a peer that will not install is returned as unavailable."""
    return [_peer_tool(venvs, name, log) for name in names]
