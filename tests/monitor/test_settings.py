"""Hyper-parameters that change only through a scheduler, sampler settings, and the namespaces of the
code a step runs through: one process, real torch objects."""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from trainguard.envcheck._namespaces import NamespaceSnapshot  # noqa: E402
from trainguard.monitor._hyper import HyperParameters  # noqa: E402
from trainguard.monitor._sampler import SamplerWatch  # noqa: E402

pytestmark = pytest.mark.torch


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1, weight_decay=0.01)


def test_scheduler_steps_are_accepted_and_recorded() -> None:
    optimizer = _optimizer()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    hyper = HyperParameters(optimizer)
    assert hyper.schedulers == ("StepLR",)
    optimizer.step()
    scheduler.step()
    changes, refusal = hyper.observe()
    assert refusal is None
    assert changes == [(0, "lr", 0.1, 0.05)]
    assert hyper.observe() == ([], None)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("lr", 0.05, "without a learning-rate scheduler's step()"),
        ("weight_decay", 50.0, "no scheduler sets weight_decay"),
        ("eps", 1.0, "no scheduler sets eps"),
    ],
)
def test_changes_outside_a_scheduler_are_refused(key: str, value: float, why: str) -> None:
    optimizer = _optimizer()
    hyper = HyperParameters(optimizer, schedulers=[object()])
    optimizer.param_groups[0][key] = value
    _, refusal = hyper.observe()
    assert refusal is not None and why in refusal


def test_a_scheduler_step_does_not_excuse_another_learning_rate() -> None:
    optimizer = _optimizer()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    hyper = HyperParameters(optimizer)
    optimizer.step()
    scheduler.step()
    optimizer.param_groups[0]["lr"] = 0.01
    _, refusal = hyper.observe()
    assert refusal == "lr of parameter group 0 is 0.01, but its scheduler computed 0.05"


def test_a_scheduler_made_after_watch_is_found_when_it_first_sets_the_rate() -> None:
    optimizer = _optimizer()
    hyper = HyperParameters(optimizer)
    assert hyper.schedulers == ()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    changes, refusal = hyper.observe()
    assert refusal is None and (0, "lr", 0.1, 0.05) in changes
    assert hyper.schedulers == (type(scheduler).__name__,)


def test_sampler_seed_and_place_are_checked() -> None:
    data = list(range(100))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, seed=3)
    watch = SamplerWatch([sampler], rank=1, world=2)
    digest, problem = watch.observe()
    assert problem is None
    sampler.set_epoch(1)
    moved, problem = watch.observe()
    assert problem is None and moved != digest  # the epoch is compared across ranks, not refused
    sampler.seed = 7
    assert "seed of a DistributedSampler changed from 3 to 7" in str(watch.observe()[1])
    wrong = SamplerWatch([torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0)], rank=1, world=2)
    assert "reads as rank 0 of 2" in str(wrong.observe()[1])


def test_namespace_snapshot_sees_a_patch_anywhere_and_accepts_torchs_own_wrapping() -> None:
    import torch.nn.functional as F

    snapshot = NamespaceSnapshot.take(turns=1)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adagrad(model.parameters())  # first instance: torch wraps Adagrad.step
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert snapshot.check() == []
    assert_gelu_patch_is_found(snapshot)
    assert snapshot.check() == []
    code = F.silu.__code__
    try:
        F.silu.__code__ = F.mish.__code__
        assert "torch.nn.functional.silu was changed in place" in snapshot.check()[0].message
    finally:
        F.silu.__code__ = code
    try:
        torch.Tensor.addcmul_ = lambda *a, **k: None  # type: ignore[method-assign]
        assert "torch.Tensor.addcmul_ was added" in snapshot.check()[0].message
    finally:
        del torch.Tensor.addcmul_
    assert snapshot.check() == []


def test_legacy_tensor_types_are_left_out_but_their_names_and_tensor_methods_are_not() -> None:
    # torch.FloatTensor and its siblings hold a copy of every Tensor method that no step runs.
    snapshot = NamespaceSnapshot.take(turns=1)
    labels = {binding[0] for part in snapshot._slices for binding in part.bindings}
    assert "torch.Tensor.__deepcopy__" in labels
    assert "torch.FloatTensor" in labels
    assert not any(label.startswith("torch.FloatTensor.") for label in labels)
    with pytest.raises(TypeError):
        torch.FloatTensor.add_ = lambda *a, **k: None  # type: ignore[method-assign]
    original = torch.FloatTensor
    try:
        torch.FloatTensor = torch.DoubleTensor  # type: ignore[misc]
        (finding,) = snapshot.check()
        assert "torch.FloatTensor was replaced" in finding.message
    finally:
        torch.FloatTensor = original  # type: ignore[misc]
    assert snapshot.check() == []


_SLOW_MODULE = """
import builtins, time
def first():
    return 1
builtins._trainguard_test_started.set()
time.sleep(0.5)
def second():
    return 2
"""


def test_a_module_half_imported_by_another_thread_is_recorded_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The snapshot waits on the module's import lock: what the module binds after the snapshot
    # began is recorded, not reported as added, and a later patch of it is seen.
    import builtins

    (tmp_path / "trainguard_slow_module.py").write_text(_SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    started = threading.Event()
    monkeypatch.setattr(builtins, "_trainguard_test_started", started, raising=False)
    importer = threading.Thread(target=importlib.import_module, args=("trainguard_slow_module",))
    importer.start()
    try:
        assert started.wait(10)
        module = sys.modules["trainguard_slow_module"]
        assert not hasattr(module, "second")  # half-imported right now
        snapshot = NamespaceSnapshot.take(turns=1, modules=["trainguard_slow_module"])
    finally:
        importer.join()
    assert snapshot.check() == []
    module.second = lambda: 3
    (finding,) = snapshot.check()
    assert "trainguard_slow_module.second was replaced" in finding.message
    monkeypatch.delitem(sys.modules, "trainguard_slow_module")


def test_an_import_flag_set_by_hand_hides_no_patch() -> None:
    # `__spec__._initializing` set by an attacker makes the snapshot wait for nothing, not skip.
    import torch.nn.functional as F

    spec = F.__spec__
    assert spec is not None
    spec._initializing = True  # type: ignore[attr-defined]
    try:
        snapshot = NamespaceSnapshot.take(turns=1, modules=["torch.nn.functional"])
    finally:
        spec._initializing = False  # type: ignore[attr-defined]
    assert_gelu_patch_is_found(snapshot)


def assert_gelu_patch_is_found(snapshot: NamespaceSnapshot) -> None:
    """F.gelu replaced by a wrapper: the snapshot names it, and it is put back."""
    import torch.nn.functional as F

    original = F.gelu
    try:
        F.gelu = lambda *a, **k: original(*a, **k)
        (finding,) = snapshot.check()
        assert "torch.nn.functional.gelu was replaced" in finding.message
    finally:
        F.gelu = original
