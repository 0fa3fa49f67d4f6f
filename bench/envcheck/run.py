"""Verifying an installed torch environment, side by side with the checks people have.

    python bench/envcheck/run.py [--workdir DIR] [--rounds 5]

Builds (once, in WORKDIR) a venv with `pip install torch==2.13.0`, takes a trainguard baseline of it, then
times with a warm page cache, the tools interleaved round by round (medians):
- trainguard full verify against the baseline (every file hashed), in process;
- trainguard quick verify (signed stat cache), in process and through the CLI with interpreter start;
- trainguard verify without a baseline (RECORD hashes, bytecode compiled against sources);
- distlib's RECORD check (`InstalledDistribution.check_installed_files` for every distribution);
- `sha256sum` over the same regular files the full verify hashes.
Prints markdown tables; ratios are against the full verify.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainguard.envcheck import snapshot_environment, verify_environment
from trainguard.envcheck._layout import resolve_layout
from trainguard.envcheck._walk import environment_roots, inventory, is_cached_bytecode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import interleaved, run_command, table

TORCH = "torch==2.13.0"


def _venv(workdir: Path) -> Path:
    venv = workdir / "torch-venv"
    if not (venv / ".complete").exists():
        print(f"building {venv} ({TORCH}) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", TORCH, "distlib"], check=True)
        (venv / ".complete").write_text("")
    return venv


def _distlib_check(venv: Path) -> None:
    code = (
        "import sys\n"
        "from distlib.database import DistributionPath\n"
        "bad = 0\n"
        "for dist in DistributionPath(path=sys.argv[1:]).get_distributions():\n"
        "    bad += len(dist.check_installed_files())\n"
        "print(bad)\n"
    )
    site = resolve_layout(prefix=str(venv)).site_dirs
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code, *site], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-300:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tg-bench-envcheck")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    venv = _venv(args.workdir)
    home = args.workdir / "home"
    os.environ["TRAINGUARD_HOME"] = str(home)
    environ = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}

    start = time.perf_counter()
    baseline, snap = snapshot_environment(prefix=str(venv), environ=environ)
    snapshot_s = time.perf_counter() - start
    if snap.findings or snap.undecided:
        print("the fresh venv has findings:", *snap.findings, *snap.undecided, sep="\n", file=sys.stderr)
        return 1
    key_dir = args.workdir / "keys"
    key_dir.mkdir(exist_ok=True)
    from trainguard.envcheck import write_baseline
    from trainguard.provenance import PrivateKey

    key = PrivateKey.generate("ed25519")
    key.public().save(key_dir / f"{os.getpid()}.pub")
    baseline_file = args.workdir / "baseline.json"
    write_baseline(baseline_file, baseline, [key])

    entries, _ = inventory(environment_roots(resolve_layout(prefix=str(venv))))
    files = [e.location for e in entries.values() if e.kind == "file"]
    total = sum(e.size for e in entries.values() if e.kind == "file")
    list_file = args.workdir / "files.lst"
    list_file.write_bytes(b"\0".join(os.fsencode(f) for f in files))
    hashed = [e for e in entries.values() if e.kind == "file" and not is_cached_bytecode(e.path)]
    verify_environment(prefix=str(venv), baseline=baseline, environ=environ, full=False)  # fill the cache
    cli = [
        sys.executable, "-m", "trainguard", "env", "verify", "--prefix", str(venv), "--baseline",
        str(baseline_file), "--trust", str(key_dir / f"{os.getpid()}.pub"), "--no-ledger",
    ]  # fmt: skip

    def full() -> None:
        report = verify_environment(prefix=str(venv), baseline=baseline, environ=environ, full=True)
        assert report.ok, report.findings

    def quick() -> None:
        report = verify_environment(prefix=str(venv), baseline=baseline, environ=environ, full=False)
        assert report.ok and report.hashed == 0, (report.findings, report.hashed)

    def records() -> None:
        report = verify_environment(prefix=str(venv), environ=environ, full=True)
        assert report.ok, report.findings

    def records_only() -> None:
        report = verify_environment(prefix=str(venv), environ=environ, full=True, check_bytecode=False)
        assert report.ok, report.findings

    cases = {
        "trainguard env verify --full, baseline (library)": full,
        "trainguard env verify, quick, baseline (library)": quick,
        "trainguard env verify, quick, baseline (CLI, with interpreter start)": run_command(cli),
        "trainguard env verify --full, no baseline (RECORDs + bytecode)": records,
        "trainguard env verify --full --no-bytecode, no baseline (RECORDs)": records_only,
        "distlib check_installed_files, every distribution": lambda: _distlib_check(venv),
        "sha256sum over the same files": run_command(
            ["sh", "-c", f"xargs -0 sha256sum < {list_file} > /dev/null"]
        ),
    }
    results = interleaved(cases, args.rounds)
    lines = [
        f"{TORCH} venv with the base standard library and interpreter: {len(files):,} files "
        f"({len(hashed):,} checked by digest, the rest cached bytecode), {total / 1e6:.0f} MB; "
        f"baseline taken in {snapshot_s:.1f} s",
        "",
        *table(
            "Verify the torch venv (goal: full <= 1.5 s, quick <= 0.2 s)",
            results,
            "trainguard env verify --full, baseline (library)",
            total,
        ),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
