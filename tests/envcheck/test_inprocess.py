"""In-process checks: loaded modules come from verified files; monkeypatches of critical code are caught.

The torch tests run in a child interpreter (a fresh torch, so that optimizers are built *after* the
snapshot, and so that no attack leaves a patched torch in this process). The child applies one attack
at a time, records what `changes()` says, undoes it, and prints JSON.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

import trainguard
from trainguard.envcheck._inprocess import CodeSnapshot, verify_loaded

SRC = str(Path(trainguard.__file__).resolve().parents[1])

# ---------------------------------------------------------------------------------------------------
# verify_loaded: a small package in a temp "site" directory, passed through `modules`/`expected`/`roots`


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # never put in sys.modules
    return module


def _digests(*paths: str) -> dict[str, bytes]:
    return {os.path.realpath(p): hashlib.sha256(Path(p).read_bytes()).digest() for p in paths}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site-packages"
    (site / "tgpkg").mkdir(parents=True)
    (site / "tgpkg" / "__init__.py").write_text("def step(w, g, lr=0.1):\n    return w - lr * g\n")
    return site


def _files(module: types.ModuleType) -> list[str]:
    spec = module.__spec__
    assert spec is not None and spec.origin is not None
    return [spec.origin] + ([spec.cached] if spec.cached and Path(spec.cached).exists() else [])


def test_verified_module_is_clean(site: Path) -> None:
    module = _load(site / "tgpkg" / "__init__.py", "tgpkg")
    assert verify_loaded(_digests(*_files(module)), modules={"tgpkg": module}, roots=[str(site)]) == []


def test_modified_module_file(site: Path) -> None:
    source = site / "tgpkg" / "__init__.py"
    module = _load(source, "tgpkg")
    expected = _digests(*_files(module))
    source.write_text("def step(w, g, lr=0.1):\n    return w + lr * g\n")  # the update flipped on disk
    findings = verify_loaded(expected, modules={"tgpkg": module}, roots=[str(site)])
    assert [(f.kind, f.path) for f in findings] == [("loaded-modified", os.path.realpath(source))]
    assert findings[0].severity.value == "critical"


def test_module_loaded_from_temp_dir(site: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rogue.py").write_text("X = 1\n")
    rogue = _load(elsewhere / "rogue.py", "rogue")
    findings = verify_loaded({}, modules={"rogue": rogue}, roots=[str(site)])
    assert {(f.kind, f.path) for f in findings} == {
        ("loaded-outside", os.path.realpath(elsewhere / "rogue.py"))
    }
    assert "rogue" in findings[0].message


def test_unrecorded_file_inside_the_environment(site: Path) -> None:
    (site / "extra.py").write_text("Y = 2\n")
    extra = _load(site / "extra.py", "extra")
    findings = verify_loaded({}, modules={"extra": extra}, roots=[str(site)])
    kinds = {f.kind for f in findings}
    assert "loaded-unrecorded" in kinds
    assert "loaded-modified" not in kinds


def test_module_without_file_or_with_getattr_is_skipped(site: Path) -> None:
    lazy = types.ModuleType("lazy")

    def explode(name: str) -> object:
        raise AssertionError(f"module __getattr__ ran for {name}")

    lazy.__getattr__ = explode  # type: ignore[method-assign]
    assert verify_loaded({}, modules={"lazy": lazy, "sys": sys}, roots=[str(site)]) == []


def test_running_environment_from_record() -> None:
    """Default: RECORD digests of this venv; nothing installed here was modified, and trainguard's own
    editable install (as `make dev` makes it) is one explained finding, not one per module."""
    findings = verify_loaded()
    assert not [f for f in findings if f.kind in ("loaded-modified", "loaded-unrecorded")]
    unverifiable = [f for f in findings if f.kind == "loaded-unverifiable"]
    assert len(unverifiable) <= 1
    source = Path(trainguard.__file__).resolve().parent
    if (source.parent / "trainguard" / "__init__.py").exists() and "site-packages" not in str(source):
        editable = [f for f in findings if f.kind == "loaded-editable"]
        assert [f.distribution for f in editable] == ["trainguard"], findings
        assert "editable install of trainguard" in editable[0].message
        assert not [f for f in findings if f.kind == "loaded-outside" and str(source) in f.path]


# ---------------------------------------------------------------------------------------------------
# CodeSnapshot without torch


def test_snapshot_without_torch_objects_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="torch models and optimizers"):
        CodeSnapshot.take(object())


def test_random_seed_code_swap_in_process() -> None:
    import random

    class Fake(random.Random):
        def seed(self, a: object = None, version: int = 2) -> None:
            super().seed(0)  # every seed becomes 0; `super` gives the code the one free variable needed

    func = random.Random.seed
    original = func.__code__
    snapshot = CodeSnapshot.take()
    assert snapshot.changes() == []
    try:
        func.__code__ = Fake.seed.__code__
        findings = snapshot.changes()
    finally:
        func.__code__ = original
    assert {f.path for f in findings} >= {"random.Random.seed", "random.seed"}
    assert all(f.kind == "patched-function" for f in findings)
    assert "__code__ swapped" in findings[0].message
    assert snapshot.changes() == []


def _layered_objects() -> dict[str, Any]:
    import functools

    value = [1]

    def base(a: int, *, scale: int = 2) -> int:
        return a * scale

    def wrapper(a: int, *, flag: bool = True) -> int:
        return base(a) + value[0]

    wrapper.__wrapped__ = base  # type: ignore[attr-defined]
    part = functools.partial(wrapper, 3, flag=False)
    return {"base": base, "wrapper": wrapper, "part": part, "static": staticmethod(part), "hooks": {}}


def _in_place_changes(o: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Each change the snapshot's layers record, with its undo."""
    wrapper, base, part, static, hooks = o["wrapper"], o["base"], o["part"], o["static"], o["hooks"]
    kw, code, cell = wrapper.__kwdefaults__, base.__code__, wrapper.__closure__[1]
    contents, state = cell.cell_contents, part.__reduce__()[2]

    def other(a: int, *, flag: bool = True) -> int:
        return -a

    return {
        "kwdefault value": (lambda: kw.__setitem__("flag", False), lambda: kw.__setitem__("flag", True)),
        "kwdefaults added": (lambda: kw.__setitem__("x", 1), lambda: kw.pop("x")),
        "kwdefaults object": (
            lambda: setattr(wrapper, "__kwdefaults__", {"flag": True}),
            lambda: setattr(wrapper, "__kwdefaults__", kw),
        ),
        "closure cell": (
            lambda: setattr(cell, "cell_contents", [2]),
            lambda: setattr(cell, "cell_contents", contents),
        ),
        "__wrapped__": (
            lambda: setattr(wrapper, "__wrapped__", other),
            lambda: setattr(wrapper, "__wrapped__", base),
        ),
        "inner code": (
            lambda: setattr(base, "__code__", other.__code__),
            lambda: setattr(base, "__code__", code),
        ),
        "partial state": (lambda: part.__setstate__((other, *state[1:])), lambda: part.__setstate__(state)),
        "partial keyword": (
            lambda: part.keywords.__setitem__("flag", True),
            lambda: part.keywords.__setitem__("flag", False),
        ),
        "staticmethod re-init": (lambda: static.__init__(other), lambda: static.__init__(part)),
        "hook added": (lambda: hooks.__setitem__(7, other), lambda: hooks.pop(7)),
    }


def test_quick_check_sees_every_in_place_change_the_full_comparison_sees() -> None:
    # The quick check decides "nothing changed" alone: each change to a recorded layer must fail it.
    from trainguard.envcheck._inprocess import _EMPTY_CELL, _MISSING, _is_wrapped_hook, _record, _registry
    from trainguard.envcheck._quickcheck import QuickCheck

    objects = _layered_objects()
    callables = [_record(name, lambda o=objects[name]: o) for name in ("wrapper", "part", "static")]
    registries = [_registry("hooks", lambda: objects["hooks"])]
    quick = QuickCheck(
        callables, registries, missing=_MISSING, empty_cell=_EMPTY_CELL, is_wrapped_hook=_is_wrapped_hook
    )
    assert quick.usable and quick.unchanged()
    for name, (do, undo) in _in_place_changes(objects).items():
        do()
        try:
            assert not quick.unchanged(), name
        finally:
            undo()
        assert quick.unchanged(), name


# ---------------------------------------------------------------------------------------------------
# torch, in a child interpreter

CHILD = textwrap.dedent(
    """
    import functools, json, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from trainguard.envcheck._inprocess import CodeSnapshot, foreign_code

    def report(findings):
        return [[f.kind, f.path, f.message] for f in findings]

    def train(model, opt_cls, workers):
        data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
        opt = opt_cls(model.parameters(), lr=0.01)
        for x, y in DataLoader(data, batch_size=8, num_workers=workers, shuffle=True):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        return opt

    def benign():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        sgd_step, seed = torch.optim.SGD.__dict__["step"], torch.manual_seed
        snapshot = CodeSnapshot.take(model)  # before any optimizer exists, before torch._dynamo is imported
        out = {}
        for opt_cls in (torch.optim.SGD, torch.optim.AdamW):
            for workers in (0, 2):
                opt = train(model, opt_cls, workers)
                out[f"{opt_cls.__name__}-{workers}"] = report(snapshot.changes())
        later = CodeSnapshot.take(model, opt)
        train(model, torch.optim.AdamW, 0)
        out["later"] = report(later.changes())
        out["torch-rewrapped-step"] = torch.optim.SGD.__dict__["step"] is not sgd_step
        out["torch-rewrapped-seed"] = torch.manual_seed is not seed
        out["foreign"] = report(foreign_code())
        return out

    def attack(name, do, undo, *objects):
        snapshot = CodeSnapshot.take(*objects)
        do()
        found = report(snapshot.changes())
        undo()
        return {"found": found, "after-undo": report(snapshot.changes())}

    def attacks():
        model = nn.Linear(4, 1)
        out = {}
        # Build nothing yet: torch's own step wrapping must not hide the attacker's.
        orig_step = torch.optim.SGD.step

        @functools.wraps(orig_step)
        def flipped(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.neg_()
            return orig_step(self, closure)

        def sgd_do():
            torch.optim.SGD.step = flipped
            train(model, torch.optim.SGD, 0)  # torch wraps the attacker's step in its profile hook

        def sgd_undo():
            torch.optim.SGD.step = orig_step_wrapped

        orig_step_wrapped = torch.optim.SGD.__dict__["step"]
        out["sgd-step-functools-wraps"] = attack("sgd", sgd_do, sgd_undo)

        disguised = torch.optim.Optimizer.profile_hook_step(flipped)
        out["sgd-step-profile-hook-disguise"] = attack(
            "disguise",
            lambda: setattr(torch.optim.SGD, "step", disguised),
            lambda: setattr(torch.optim.SGD, "step", orig_step_wrapped),
        )

        seed_code = torch.random.manual_seed.__code__
        def fake_seed(seed):
            return torch.random.default_generator
        out["manual-seed-code-swap"] = attack(
            "seed",
            lambda: setattr(torch.random.manual_seed, "__code__", fake_seed.__code__),
            lambda: setattr(torch.random.manual_seed, "__code__", seed_code),
        )

        sgd_mod = sys.modules["torch.optim.sgd"]
        single = sgd_mod._single_tensor_sgd
        out["module-dict-replace"] = attack(
            "dict",
            lambda: sgd_mod.__dict__.__setitem__("_single_tensor_sgd", lambda *a, **k: None),
            lambda: sgd_mod.__dict__.__setitem__("_single_tensor_sgd", single),
        )

        use_grad = torch.optim.SGD.__dict__["step"]  # the _use_grad layer around the real step
        cell = use_grad.__closure__[0]
        real = cell.cell_contents
        out["closure-cell-swap"] = attack(
            "cell",
            lambda: setattr(cell, "cell_contents", lambda self, closure=None: None),
            lambda: setattr(cell, "cell_contents", real),
        )

        defaults = sgd_mod.sgd.__defaults__
        out["defaults-replaced"] = attack(
            "defaults",
            lambda: setattr(sgd_mod.sgd, "__defaults__", (True,) + defaults[1:]),
            lambda: setattr(sgd_mod.sgd, "__defaults__", defaults),
        )

        handles = []
        out["global-forward-hook"] = attack(
            "fwd",
            lambda: handles.append(nn.modules.module.register_module_forward_hook(lambda m, i, o: o * 0)),
            lambda: handles.pop().remove(),
        )
        optimizer_mod = sys.modules["torch.optim.optimizer"]
        out["global-optimizer-pre-hook"] = attack(
            "gopt",
            lambda: handles.append(optimizer_mod.register_optimizer_step_pre_hook(lambda o, a, k: None)),
            lambda: handles.pop().remove(),
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out["optimizer-step-pre-hook"] = attack(
            "opt",
            lambda: handles.append(opt.register_step_pre_hook(lambda o, a, k: None)),
            lambda: handles.pop().remove(),
            model, opt,
        )
        out["parameter-grad-hook"] = attack(
            "param",
            lambda: handles.append(model.weight.register_hook(lambda g: g * 0)),
            lambda: handles.pop().remove(),
            model, opt,
        )
        out["instance-step-override"] = attack(
            "inst",
            lambda: setattr(opt, "step", lambda closure=None: None),
            lambda: delattr(opt, "step"),
            model, opt,
        )
        hook = model.register_forward_hook(lambda m, i, o: None)
        out["module-hook-removed"] = attack("rm", hook.remove, lambda: None, model)

        torch.optim.SGD.step = flipped
        out["foreign-before-snapshot"] = report(foreign_code())
        torch.optim.SGD.step = orig_step_wrapped
        return out

    if __name__ == "__main__":
        print(json.dumps(benign() if sys.argv[1] == "benign" else attacks()))
    """
)


def _child(tmp_path: Path, mode: str) -> dict[str, Any]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(script), mode], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def attacks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("torch")
    return _child(tmp_path_factory.mktemp("attacks"), "attacks")


@pytest.mark.torch
def test_real_training_loop_is_not_a_finding(tmp_path: Path) -> None:
    """SGD and AdamW built after the snapshot, DataLoader with and without workers, autocast, clipping:
    torch rewraps SGD.step and torch.manual_seed on its own, and none of it is reported."""
    pytest.importorskip("torch")
    result = _child(tmp_path, "benign")
    assert result.pop("torch-rewrapped-step") is True  # the test really exercised torch's own rewrite
    assert result.pop("torch-rewrapped-seed") is True
    assert result == {
        "SGD-0": [],
        "SGD-2": [],
        "AdamW-0": [],
        "AdamW-2": [],
        "later": [],
        "foreign": [],
    }


ATTACKS = {
    # name: (kind, path the finding names)
    "sgd-step-functools-wraps": ("patched-function", "torch.optim.sgd.SGD.step"),
    "sgd-step-profile-hook-disguise": ("patched-function", "torch.optim.sgd.SGD.step"),
    "manual-seed-code-swap": ("patched-function", "torch.random.manual_seed"),
    "module-dict-replace": ("patched-function", "torch.optim.sgd._single_tensor_sgd"),
    "closure-cell-swap": ("patched-function", "torch.optim.sgd.SGD.step"),
    "defaults-replaced": ("patched-function", "torch.optim.sgd.sgd"),
    "global-forward-hook": ("hook-added", "torch.nn.modules.module._global_forward_hooks"),
    "global-optimizer-pre-hook": ("hook-added", "torch.optim.optimizer._global_optimizer_pre_hooks"),
    "optimizer-step-pre-hook": ("hook-added", "SGD._optimizer_step_pre_hooks"),
    "parameter-grad-hook": ("hook-added", "Linear.weight._backward_hooks"),
    "instance-step-override": ("patched-function", "SGD.step"),
    "module-hook-removed": ("hook-removed", "Linear._forward_hooks"),
}


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_caught_and_named(attacks: dict[str, Any], name: str) -> None:
    kind, path = ATTACKS[name]
    result = attacks[name]
    assert [kind, path] in [finding[:2] for finding in result["found"]], result
    if name != "module-hook-removed":  # a removed hook cannot be put back under its old handle
        assert result["after-undo"] == []  # the finding is the attack, not noise around it


@pytest.mark.torch
def test_patch_before_snapshot_is_foreign_code(attacks: dict[str, Any]) -> None:
    found = attacks["foreign-before-snapshot"]
    assert ["patched-function", "torch.optim.sgd.SGD.step"] in [f[:2] for f in found]
    assert "child.py" in next(f[2] for f in found if f[1] == "torch.optim.sgd.SGD.step")


@pytest.mark.torch
def test_a_method_bound_back_to_its_own_module_is_no_override() -> None:
    # Lightning runs training_step through forward and then sets `module.forward = module.forward`.
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    other = torch.nn.Linear(2, 2)
    snapshot = CodeSnapshot.take(model)
    model[0].forward = model[0].forward
    assert snapshot.changes() == []
    # The same code bound to another module computes with that module's weights: an override.
    model[0].forward = other.forward
    assert [(f.kind, f.path) for f in snapshot.changes()] == [("patched-function", "Sequential.0.forward")]
