"""Signing, verifying and saving, side by side with the tools people use for the same job.

    python bench/provenance/run.py [--size-mb 2048] [--files 8] [--save-mb 512] [--rounds 3]

Over one directory of random files (created under $TMPDIR and deleted afterwards), with a warm page cache:
trainguard sign and verify (library calls, and the CLI when it is wired up), `sha256sum`, raw hashlib
(one thread, and one thread per file), model_signing's CLI (1.1.1, from the dev extra) when installed;
then the re-verification of the unchanged directory from the signed cache, and trainguard.save against
torch.save on a state dict. Every figure is the median of the rounds, the tools interleaved round by
round. Prints a markdown table; ratios are against the baseline named in each section.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from trainguard.provenance import PrivateKey, PublicKey, sign_path, verify_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import interleaved as _interleaved
from _timing import run_command as _run
from _timing import table as _table

# The model_signing CLI of the project's dev environment (pyproject's dev extra pins model-signing 1.1.1).
MODEL_SIGNING = Path(sys.executable).parent / "model_signing"
CHUNK = 8 << 20


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        left = size
        while left:
            n = min(CHUNK, left)
            handle.write(os.urandom(n))
            left -= n


def _hashlib_serial(files: list[Path]) -> None:
    for path in files:
        with path.open("rb") as handle:
            hashlib.file_digest(handle, "sha256")


def _hashlib_threads(files: list[Path]) -> None:
    def one(path: Path) -> str:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(one, files))


def bench_tree(work: Path, size_mb: int, count: int, rounds: int) -> list[str]:
    model = work / "model"
    model.mkdir()
    per_file = (size_mb << 20) // count
    files = [model / f"shard-{i:02d}.bin" for i in range(count)]
    for path in files:
        _write_random(path, per_file)
    total = per_file * count
    _hashlib_serial(files)  # warm the page cache: every tool reads from memory

    key = PrivateKey.generate("ecdsa-p256")
    key_file, pub_file = work / "signing.pem", work / "signing.pub"
    key.save(key_file)
    key.public().save(pub_file)
    trusted = [key.public()]
    env = {**os.environ, "TRAINGUARD_HOME": str(work / "home")}
    cli = [sys.executable, "-m", "trainguard"]
    ms_sig = work / "model.sig"

    sign_cases: dict[str, Callable[[], object]] = {
        "raw hashlib, 1 thread": lambda: _hashlib_serial(files),
        "raw hashlib, 1 thread per file": lambda: _hashlib_threads(files),
        "sha256sum": _run(["sha256sum", *map(str, files)]),
        "trainguard sign (library)": lambda: sign_path(model, key),
        "trainguard sign (CLI)": _run([*cli, "sign", str(model), "--key", str(key_file), "--no-ledger"], env),
    }
    if MODEL_SIGNING.exists():
        sign_cases["model_signing sign key"] = _run(
            [
                str(MODEL_SIGNING),
                "sign",
                "key",
                str(model),
                "--ignore-paths",
                str(model / ".trainguard.sig"),
                "--private_key",
                str(key_file),
                "--signature",
                str(ms_sig),
            ]
        )
    signed = _interleaved(sign_cases, rounds)

    sign_path(model, key)
    verify_cases: dict[str, Callable[[], object]] = {
        "raw hashlib, 1 thread per file": lambda: _hashlib_threads(files),
        "sha256sum": _run(["sha256sum", *map(str, files)]),
        "trainguard verify --full (library)": lambda: verify_path(model, trusted, full=True),
        "trainguard verify --full (CLI)": _run(
            [*cli, "verify", str(model), "--trust", str(pub_file), "--full", "--no-ledger"], env
        ),
    }
    if MODEL_SIGNING.exists() and ms_sig.exists():
        verify_cases["model_signing verify key"] = _run(
            [
                str(MODEL_SIGNING),
                "verify",
                "key",
                str(model),
                "--ignore-paths",
                str(model / ".trainguard.sig"),
                "--public_key",
                str(pub_file),
                "--signature",
                str(ms_sig),
            ]
        )
    verified = _interleaved(verify_cases, rounds)

    cached = _bench_cached(model, trusted, env, cli, pub_file, rounds, work)
    title = f"{count} files, {total / 1e9:.2f} GB, {os.cpu_count()} cores"
    return [
        *_table(f"Sign: {title}", signed, "raw hashlib, 1 thread per file", total),
        *_table(f"Verify: {title}", verified, "raw hashlib, 1 thread per file", total),
        *_table(
            "Re-verify the unchanged directory (signed cache; goal < 0.1 s)", cached, "full verify", None
        ),
    ]


def _bench_cached(
    model: Path,
    trusted: list[PublicKey],
    env: dict[str, str],
    cli: list[str],
    pub_file: Path,
    rounds: int,
    work: Path,
) -> dict[str, float | None]:
    try:
        from trainguard.gate._cache import VerifyCache
    except ImportError as exc:
        print(f"  cache: unavailable ({exc})", file=sys.stderr)
        return {"full verify": None, "cached verify (library)": None}
    cache = VerifyCache(work / "home")
    verify_path(model, trusted, full=True, digest_cache=cache)
    cases: dict[str, Callable[[], object]] = {
        "full verify": lambda: verify_path(model, trusted, full=True),
        "cached verify (library)": lambda: verify_path(model, trusted, full=False, digest_cache=cache),
        "cached verify (CLI, with interpreter start)": _run(
            [*cli, "verify", str(model), "--trust", str(pub_file), "--no-ledger"], env
        ),
    }
    return _interleaved(cases, max(rounds, 5))


def bench_save(work: Path, size_mb: int, rounds: int) -> list[str]:
    try:
        import torch
    except ImportError:
        return ["### trainguard.save vs torch.save", "", "torch is not installed", ""]
    from trainguard.gate._save import save

    key = PrivateKey.generate("ed25519")
    tensors = 16
    columns = (size_mb << 20) // (tensors * 1024 * 4)
    state = {f"layer{i}.weight": torch.randn(1024, columns) for i in range(tensors)}
    plain, signed, unsynced = work / "plain.pt", work / "signed.pt", work / "unsynced.pt"

    def torch_save_fsync() -> None:
        torch.save(state, plain)
        fd = os.open(plain, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    cases: dict[str, Callable[[], object]] = {
        "torch.save": lambda: torch.save(state, plain),
        "torch.save + fsync": torch_save_fsync,
        "trainguard.save (hash while writing, fsync, sign)": lambda: save(state, signed, key=key),
        "trainguard.save, fsync=False": lambda: save(state, unsynced, key=key, fsync=False),
    }
    results = _interleaved(cases, max(rounds, 5))
    size = signed.stat().st_size
    lines = _table(
        f"Save a {size / 1e6:.0f} MB state dict to {work} (goal: <= 5% over torch.save)",
        results,
        "torch.save",
        size,
    )
    for label, base_name, ours_name in (
        ("with fsync", "torch.save + fsync", "trainguard.save (hash while writing, fsync, sign)"),
        ("without fsync", "torch.save", "trainguard.save, fsync=False"),
    ):
        base, ours = results.get(base_name), results.get(ours_name)
        if base and ours:
            lines.insert(-1, f"trainguard.save vs {base_name}, both {label}: {ours / base:.3f}x  ")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=2048, help="total size of the directory")
    parser.add_argument("--files", type=int, default=8, help="files in the directory")
    parser.add_argument("--save-mb", type=int, default=512, help="size of the state dict to save")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-tree", action="store_true")
    parser.add_argument("--skip-save", action="store_true")
    parser.add_argument(
        "--save-dir", type=Path, help="where the save benchmark writes (e.g. /dev/shm to leave the disk out)"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tg-bench-"))
    lines: list[str] = []
    try:
        if not args.skip_tree:
            lines += bench_tree(work, args.size_mb, args.files, args.rounds)
        if not args.skip_save:
            save_dir = (
                Path(tempfile.mkdtemp(prefix="tg-bench-", dir=args.save_dir)) if args.save_dir else work
            )
            try:
                lines += bench_save(save_dir, args.save_mb, args.rounds)
            finally:
                shutil.rmtree(save_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
