"""What each of the guard's per-step checks costs, one process, on the benchmark's 11M-parameter model.

    python bench/monitor/components.py [--repeat 30] [--deep 64]

Times, interleaved round by round (medians), one training step without the guard and each piece of
work the guard adds to a step: the parameter fingerprint, one turn of the optimizer-state fingerprint,
the gradient norm, the update re-computation (before and after a step), the code snapshot and namespaces
check, packing one report and drawing a verdict from two, and one derivative probe (which runs at one
step in `derivative_every`, 32 by default: its share per step is printed amortised).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import build, build_deep

from trainguard.envcheck import CodeSnapshot
from trainguard.monitor._code import CodeWatch
from trainguard.monitor._derivative import DerivativeProbe
from trainguard.monitor._fingerprint import Fingerprinter
from trainguard.monitor._hyper import HyperParameters
from trainguard.monitor._recompute import UpdateCheck
from trainguard.monitor._sampler import SamplerWatch
from trainguard.monitor._verdict import RankReport, decide

_PROBE = "derivative probe (when it runs)"
_UPDATE = "update re-computation (4 fixed elements of every tensor + 2 tensors x 32)"
# Cases that time their own share of what they run.
_OWN_TIMES = (_UPDATE, _PROBE)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--samples", type=int, default=128, help="per rank (the 2-rank benchmark's share)")
    parser.add_argument("--deep", type=int, default=0, help="instead, this many small blocks of 4 tensors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_deep(args.deep) if args.deep else build(2048, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(args.samples, 1024), torch.randint(0, 10, (args.samples,))
    params = list(model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    fingerprinter = Fingerprinter(Fingerprinter.new_seed())
    update = UpdateCheck(optimizer, names, seed=1, tensors_per_step=2, elements_per_tensor=32)
    snapshot = CodeSnapshot.take(model, optimizer)
    code = CodeWatch(turns=8)
    # As in a job: the third step is profiled, and what it ran is compared at every step from then on.
    assert code.check(1) is None and code.check(2) is None
    step()
    assert code.check(3) is None
    hyper = HyperParameters(optimizer)
    samplers = SamplerWatch(rank=0, world=1)
    turn = [3]

    def code_turn() -> None:
        turn[0] += 1
        assert code.check(turn[0]) is None

    def settings() -> None:
        assert hyper.observe()[1] is None
        samplers.observe()

    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    share = state[: max(1, len(state) // 4)]
    slots = [f"slot{i}" for i in range(2 * len(params))]

    def update_check() -> float:
        # Around a real optimizer step, which is not counted.
        update.forget()  # the other cases step the optimizer too: no between-steps comparison here
        start = time.perf_counter()
        update.before()
        middle = time.perf_counter()
        optimizer.step()
        resumed = time.perf_counter()
        mismatches = update.after()
        assert not mismatches, mismatches
        return (middle - start) + (time.perf_counter() - resumed)

    def gradient_norm() -> float:
        norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    def verdict() -> None:
        report = RankReport(step=1, fingerprints=tuple(range(len(slots))))
        words = report.pack()
        decide(
            [RankReport.unpack(words), RankReport.unpack(words)], replica_groups=[[0, 1]], slot_names=slots
        )

    local: dict[int, torch.Tensor] = {}
    probe = DerivativeProbe(
        model, params, [names[id(p)] for p in params], lambda: local, schedule_seed=1, element_seed=2, every=1
    )

    def derivative_probe() -> float:
        # A real step's forward and backward pass under the probe's hooks, which are not counted;
        # the probe's own work is: its reads of the gradient and its two re-runs of the forward pass.
        probe.arm()
        probe.before_forward((x,), {})
        output = model(x)
        probe.after_forward(output)
        optimizer.zero_grad()
        nn.functional.cross_entropy(output, y).backward()
        start = time.perf_counter()
        for param in params:
            if (index := probe.index_of(param)) is not None and param.grad is not None:
                local[id(param)] = torch.take(param.grad, index)
        assert probe.verdict() is None and probe.unjudged == 0
        return time.perf_counter() - start

    cases: dict[str, Callable[[], object]] = {
        "training step (no guard)": step,
        "parameter fingerprint (all)": lambda: fingerprinter.of(params).tolist(),
        "optimizer-state fingerprint (one turn of 4)": lambda: fingerprinter.of(share).tolist(),
        "gradient norm": gradient_norm,
        _UPDATE: update_check,
        "code snapshot check": snapshot.changes,
        "code: namespaces (what a step runs, and one turn of 8 of the rest), modes, kernels": code_turn,
        "hyper-parameters and samplers": settings,
        "report pack + verdict (2 ranks)": verdict,
        _PROBE: derivative_probe,
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, case in cases.items():
            start = time.perf_counter()
            own = case()
            elapsed = time.perf_counter() - start
            times[name].append(own if isinstance(own, float) and name in _OWN_TIMES else elapsed)
    base = statistics.median(times["training step (no guard)"])
    total = 0.0
    size = sum(p.numel() for p in params) / 1e6
    print(f"{size:.1f}M parameters in {len(params)} tensors, {args.samples} samples, 1 thread\n")
    print("| work | median | share of a step |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        if name == _PROBE:
            print(f"| {name} | {median * 1000:.2f} ms | {median / base * 100:.1f}% |")
            median /= 32
            name = "derivative probe, amortised at 1 step in 32"
        if name != "training step (no guard)":
            total += median
        print(f"| {name} | {median * 1000:.2f} ms | {median / base * 100:.1f}% |")
    print(f"| **sum of the guard's work** | {total * 1000:.2f} ms | {total / base * 100:.1f}% |")


if __name__ == "__main__":
    main()
