"""Training step time with and without `trainguard.watch`, side by side in one job.

    python bench/monitor/run.py [--nproc 2] [--samples 256] [--rounds 4] [--block 10] [--device cpu|cuda]

Runs a data-parallel job under torchrun (gloo on CPU, NCCL on GPU): an MLP of about 11M parameters
(`--hidden 2048 --layers 2`) with AdamW, 256 samples per step over all ranks, one thread per rank.
After a warm-up, blocks of steps without and with the guard alternate round by round, so both see the
same machine; the guard is set up anew for each guarded block and its first three steps (set-up,
the ledger opened in the background) are not counted. `--lean` fingerprints parameters in two turns
and the optimizer state in eight. `--deep 64` trains instead a model of 64 small blocks (262
tensors, 1.2M parameters), where what the guard spends per tensor shows. Prints the median step
time of each mode and their ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args, worker_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-monitor-") as tmp:
        out = Path(tmp) / "times.json"
        env = {**os.environ, "TRAINGUARD_HOME": str(Path(tmp) / "home"), "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            str(WORKER), "--out", str(out), "--device", args.device, *worker_args,
        ]  # fmt: skip
        subprocess.run(command, env=env, check=True)
        report = json.loads(out.read_text())
    times = report["times"]
    without = statistics.median(times["without"])
    guarded = statistics.median(times["with"])
    mean_without = statistics.fmean(times["without"])
    mean_guarded = statistics.fmean(times["with"])
    print(
        f"{report['parameters'] / 1e6:.1f}M parameters in {report['tensors']} tensors, "
        f"{report['world_size']} ranks ({args.device}), "
        f"{report['samples']} samples per step, {len(times['with'])} steps per mode after warm-up\n"
    )
    print("| mode | median step | ratio | mean step | ratio |")
    print("|---|---|---|---|---|")
    print(f"| without the guard | {without * 1000:.1f} ms | 1.00x | {mean_without * 1000:.1f} ms | 1.00x |")
    settings = [
        *(["params_every=2, state_every=8"] if "--lean" in worker_args else []),
        *(["defer=True"] if "--defer" in worker_args else []),
        *[f"skip={value!r}" for flag, value in itertools.pairwise(worker_args) if flag == "--skip"],
    ]
    label = f"`trainguard.watch(..., {', '.join(settings)})`" if settings else "`trainguard.watch`"
    print(
        f"| {label} | {guarded * 1000:.1f} ms | {guarded / without:.3f}x "
        f"| {mean_guarded * 1000:.1f} ms | {mean_guarded / mean_without:.3f}x |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
