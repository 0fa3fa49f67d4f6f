"""Real, benign artifacts from PyTorch, NumPy, safetensors, joblib and Hugging Face-style training runs.

Every one of them must scan clean; a scanner that cries wolf on genuine checkpoints gets switched off.
Pickled classes outside the allowlist (a whole nn.Module, a scikit-learn model) must be reported, and
must pass once exactly the reported names are allowed.
"""

from __future__ import annotations

import functools
import json
import pickle
import random
import re
from pathlib import Path
from types import ModuleType

import pytest

from trainguard.findings import Verdict
from trainguard.scan import ScanOptions, scan_path
from trainguard.scan.allowlist import BUILTIN_ALLOWLIST
from trainguard.scan.result import ScanReport

np = pytest.importorskip("numpy")

_UNKNOWN = re.compile(r"unknown import (\S+?):")


def _scan(path: Path, allow: tuple[str, ...] = ()) -> ScanReport:
    return scan_path(path, ScanOptions(allow=allow, jobs=1))


def _explain(report: ScanReport) -> str:
    lines = []
    for result in report.results:
        lines.append(f"{result.path}: {result.verdict.value} {result.formats}")
        lines.extend(f"  finding {f.rule}: {f.message}" for f in result.findings)
        lines.extend(f"  problem {p.kind}: {p.message}" for p in result.problems)
    return "\n".join(lines)


def assert_clean(path: Path) -> ScanReport:
    report = _scan(path)
    assert report.exit_code == 0, _explain(report)
    assert report.results
    assert all(r.verdict in (Verdict.CLEAN, Verdict.SKIPPED) for r in report.results), _explain(report)
    return report


def _torch() -> ModuleType:
    torch: ModuleType = pytest.importorskip("torch")
    return torch


# -- PyTorch


@pytest.mark.torch
@pytest.mark.parametrize(
    "dtype", ["float32", "bfloat16", "float16", "int8", "float64", "int64", "bool", "uint8"]
)
def test_state_dict_in_each_dtype(tmp_path: Path, dtype: str) -> None:
    torch = _torch()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    state = {k: v.to(getattr(torch, dtype)) for k, v in model.state_dict().items()}
    path = tmp_path / f"model-{dtype}.pt"
    torch.save(state, path)
    report = assert_clean(path)
    assert report.results[0].formats[:2] == ("zip", "pytorch")
    assert report.results[0].verdict is Verdict.CLEAN


@pytest.mark.torch
def test_quantized_tensors(tmp_path: Path) -> None:
    torch = _torch()
    torch.manual_seed(0)
    per_tensor = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 3, torch.qint8)
    per_channel = torch.quantize_per_channel(
        torch.randn(4, 4), torch.rand(4) + 0.1, torch.zeros(4, dtype=torch.long), 0, torch.qint8
    )
    unsigned = torch.quantize_per_tensor(torch.rand(3), 0.05, 0, torch.quint8)
    path = tmp_path / "quantized.pt"
    torch.save({"q": per_tensor, "qc": per_channel, "qu": unsigned}, path)
    assert_clean(path)


@pytest.mark.torch
def test_dynamically_quantized_model_state_dict(tmp_path: Path) -> None:
    torch = _torch()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    try:
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    except (RuntimeError, AttributeError) as exc:  # no quantized engine on this build
        pytest.skip(f"dynamic quantization unavailable: {exc}")
    state = quantized.state_dict()
    path = tmp_path / "qmodel.pt"
    torch.save(state, path)
    report = _scan(path)
    # packed params pickle their own classes; anything reported must be a plain unknown import
    for result in report.results:
        assert all(f.rule == "unknown-import" for f in result.findings), _explain(report)
        assert not result.problems, _explain(report)


def _stepped_optimizer(torch: ModuleType, name: str) -> object:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizers = {
        "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
    }
    optimizer = optimizers[name](model.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 6)).pow(2).sum().backward()
        optimizer.step()
    return optimizer


@pytest.mark.torch
@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "adamw"])
def test_optimizer_state_after_a_step(tmp_path: Path, name: str) -> None:
    torch = _torch()
    optimizer = _stepped_optimizer(torch, name)
    state = optimizer.state_dict()  # type: ignore[attr-defined]
    assert state["state"], "the optimizer must hold per-parameter state after a step"
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    assert_clean(path)


@pytest.mark.torch
def test_legacy_serialization(tmp_path: Path) -> None:
    torch = _torch()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    report = assert_clean(path)
    assert "pytorch-legacy" in report.results[0].formats


@pytest.mark.torch
def test_legacy_serialization_of_an_optimizer(tmp_path: Path) -> None:
    torch = _torch()
    optimizer = _stepped_optimizer(torch, "adam")
    path = tmp_path / "legacy-optimizer.pt"
    torch.save(optimizer.state_dict(), path, _use_new_zipfile_serialization=False)  # type: ignore[attr-defined]
    assert_clean(path)


@pytest.mark.torch
def test_nested_containers_and_metadata(tmp_path: Path) -> None:
    torch = _torch()
    checkpoint = {
        "epoch": 3,
        "best": 0.25,
        "names": ["a", "b"],
        "shape": torch.Size([2, 3]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "views": [torch.arange(10)[2:5], torch.arange(10)],  # two views of different storages
        "shared": (lambda t: [t, t[1:]])(torch.ones(4)),  # one storage, two tensors
        "param": torch.nn.Parameter(torch.zeros(2)),
        "empty": torch.empty(0),
        "scalar": torch.tensor(1.5),
        "noncontig": torch.randn(3, 4).t(),
        "bytes": b"metadata",
        "set": {1, 2},
    }
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    assert_clean(path)


def _hf_checkpoint(torch: ModuleType, folder: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vocab, width = 32, 16

    class TinyEncoder(torch.nn.Module):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            layer = torch.nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, ids: object) -> object:
            return self.head(self.encoder(self.embed(ids)))

    model = TinyEncoder()
    folder.mkdir()
    state = model.state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["TinyEncoder"],
                "hidden_size": width,
                "num_hidden_layers": 2,
                "vocab_size": vocab,
                "torch_dtype": "float32",
            }
        )
    )
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8, "do_sample": False}))
    (folder / "tokenizer.json").write_text(
        json.dumps(
            {
                "version": "1.0",
                "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(vocab)}},
            }
        )
    )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def linear_warmup(step: int, warmup: int) -> float:
        return min(1.0, (step + 1) / warmup)

    # transformers' get_linear_schedule_with_warmup passes a functools.partial to LambdaLR
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(linear_warmup, warmup=4))
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randint(0, vocab, (2, 5))).logsumexp(-1).mean().backward()
        optimizer.step()
        scheduler.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
        folder / "rng_state.pth",
    )


@pytest.mark.torch
def test_hugging_face_style_checkpoint_folder(tmp_path: Path) -> None:
    torch = _torch()
    folder = tmp_path / "checkpoint-2"
    _hf_checkpoint(torch, folder)
    report = assert_clean(folder)
    verdicts = {Path(r.path).name: r.verdict for r in report.results}
    for name in ("pytorch_model.bin", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert verdicts[name] is Verdict.CLEAN, (name, _explain(report))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "trainer_state.json"):
        assert verdicts[name] is Verdict.SKIPPED, (name, _explain(report))


@pytest.mark.torch
def test_hugging_face_style_checkpoint_folder_in_parallel(tmp_path: Path) -> None:
    torch = _torch()
    folder = tmp_path / "checkpoint-2"
    _hf_checkpoint(torch, folder)
    for index in range(4):  # enough files for the process pool
        (folder / f"extra-{index}.pt").write_bytes((folder / "scheduler.pt").read_bytes())
    report = scan_path(folder, ScanOptions(jobs=2))
    assert report.exit_code == 0, _explain(report)
    assert len(report.results) == 13


@pytest.mark.torch
def test_rng_state_alone(tmp_path: Path) -> None:
    torch = _torch()
    path = tmp_path / "rng_state.pth"
    generator = np.random.default_rng(0)
    torch.save(
        {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
            "generator": torch.Generator().manual_seed(1).get_state(),
            "numpy_legacy_dict": np.random.RandomState(3).get_state(legacy=False),
            "bit_generator": generator.bit_generator.state,
        },
        path,
    )
    assert_clean(path)


# -- NumPy, safetensors, joblib, plain pickles


def test_npy(tmp_path: Path) -> None:
    for name, array in {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fortran": np.asfortranarray(np.ones((3, 5))),
        "bool": np.array([True, False]),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), dtype=np.int16),
        "u": np.array(["ab", "cde"]),
        "structured": np.zeros(3, dtype=[("x", "<f4"), ("y", "<i8", (2,))]),
        "c128": np.ones(2, dtype=np.complex128),
    }.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, array)
        report = assert_clean(path)
        assert report.results[0].verdict is Verdict.CLEAN, name


def test_npz_plain_and_compressed(tmp_path: Path) -> None:
    arrays = {"a": np.arange(100), "b": np.ones((4, 4), dtype=np.float16), "c": np.array(["x", "yz"])}
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    for name in ("plain.npz", "compressed.npz"):
        report = assert_clean(tmp_path / name)
        assert report.results[0].verdict is Verdict.CLEAN
        assert "npy" in report.results[0].formats


@pytest.mark.torch
def test_safetensors_from_torch(tmp_path: Path) -> None:
    torch = _torch()
    from safetensors.torch import save_file

    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i8": torch.randint(-5, 5, (7,), dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.0),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    report = assert_clean(path)
    assert report.results[0].formats == ("safetensors",)


def test_safetensors_from_numpy(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "arrays.safetensors"
    save_file(
        {
            "w": np.ones((3, 3), dtype=np.float32),
            "i": np.arange(5, dtype=np.int64),
            "u8": np.zeros(3, dtype=np.uint8),
        },
        str(path),
    )
    report = assert_clean(path)
    assert report.results[0].verdict is Verdict.CLEAN


_JOBLIB_OBJECT = {
    "weights": np.arange(20, dtype=np.float64).reshape(4, 5),
    "ints": np.array([1, 2, 3], dtype=object),
    "strings": np.array(["alpha", "beta", ""], dtype=object),
    "mixed": np.array([1, "two", 3.0, None], dtype=object),
    "plain": [1, "a", {"b": (2.5, None)}],
    "big": np.ones(100_000, dtype=np.float32),
}


@pytest.mark.parametrize(
    "compress",
    [0, 3, ("zlib", 3), ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)],
    ids=["plain", "default", "zlib", "gzip", "bz2", "xz", "lzma"],
)
def test_joblib(tmp_path: Path, compress: object) -> None:
    joblib = pytest.importorskip("joblib")
    path = tmp_path / "object.joblib"
    joblib.dump(_JOBLIB_OBJECT, path, compress=compress)
    report = assert_clean(path)
    assert report.results[0].verdict is Verdict.CLEAN
    assert "joblib" in report.results[0].formats


def test_joblib_single_values(tmp_path: Path) -> None:
    joblib = pytest.importorskip("joblib")
    for index, value in enumerate([np.arange(7), np.float32(2.5), [np.ones(3), np.zeros(2)], "text"]):
        path = tmp_path / f"value-{index}.joblib"
        joblib.dump(value, path)
        assert_clean(path)


@pytest.mark.parametrize(
    "shape",
    [
        "alone",
        "in-list",
        "in-dict",
        "alone-strings",
    ],
)
def test_joblib_object_array_near_the_top(tmp_path: Path, shape: str) -> None:
    joblib = pytest.importorskip("joblib")
    array = np.array(["s", "t"] if shape == "alone-strings" else [1, 2, 3], dtype=object)
    value = {"alone": array, "in-list": [array], "in-dict": {"x": array}, "alone-strings": array}[shape]
    path = tmp_path / f"{shape}.joblib"
    joblib.dump(value, path)
    assert_clean(path)


_PLAIN = {
    "int": 1,
    "big": 1 << 100,
    "neg": -(1 << 70),
    "float": 2.5,
    "nan": float("nan"),
    "text": "héllo",
    "bytes": b"\x00\x01raw",
    "none": None,
    "bools": [True, False],
    "tuple": (1, (2, 3)),
    "list": [[], [1]],
    "nested": {"a": {"b": {"c": [1.0]}}},
    "set": {1, 2},
    "frozenset": frozenset({"x"}),
    "bytearray": bytearray(b"xy"),
    "complex": 1 + 2j,
    "shared": [[1, 2]] * 3,
}


@pytest.mark.parametrize("protocol", range(6))
def test_plain_dict_pickles(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / f"plain-{protocol}.pkl"
    path.write_bytes(pickle.dumps(_PLAIN, protocol=protocol))
    report = assert_clean(path)
    assert report.results[0].verdict is Verdict.CLEAN


@pytest.mark.parametrize("protocol", range(6))
def test_numpy_arrays_and_datetime_metadata_in_every_protocol(tmp_path: Path, protocol: int) -> None:
    # Protocol 5 pickles an array through numpy's _frombuffer (numpy._core under NumPy 2); run
    # metadata holds timestamps, dates and durations.
    import datetime

    when = datetime.datetime(2026, 12, 6, 18, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=1), "CET"))
    value = {
        "weights": np.arange(12, dtype=np.float32).reshape(3, 4),
        "mask": np.ones(3, dtype=bool),
        "saved_at": when,
        "naive": datetime.datetime(2026, 12, 6),
        "day": datetime.date(2026, 12, 6),
        "at": datetime.time(18, 30, tzinfo=datetime.timezone.utc),
        "took": datetime.timedelta(hours=3, seconds=5),
    }
    path = tmp_path / f"arrays-{protocol}.pkl"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    report = assert_clean(path)
    assert report.results[0].verdict is Verdict.CLEAN


@pytest.mark.torch
def test_torch_checkpoint_with_datetime_metadata(tmp_path: Path) -> None:
    import datetime

    torch = pytest.importorskip("torch")
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {"model": {"w": torch.zeros(2)}, "saved_at": datetime.datetime.now(datetime.timezone.utc)}, path
    )
    assert_clean(path)


@pytest.mark.parametrize("protocol", range(6))
def test_several_pickles_in_one_file(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / f"stream-{protocol}.pkl"
    path.write_bytes(
        b"".join(pickle.dumps({"step": i, "loss": 1.0 / (i + 1)}, protocol=protocol) for i in range(5))
    )
    assert_clean(path)


@pytest.mark.parametrize("protocol", range(6))
def test_plain_dict_with_empty_bytes(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / f"empty-bytes-{protocol}.pkl"
    path.write_bytes(pickle.dumps({"key": b""}, protocol=protocol))
    assert_clean(path)


# -- pickled classes: reported, then allowed


def _unknown_imports(report: ScanReport) -> set[str]:
    names: set[str] = set()
    for result in report.results:
        for finding in result.findings:
            assert finding.rule == "unknown-import", _explain(report)
            match = _UNKNOWN.search(finding.message)
            assert match, finding.message
            names.add(match.group(1))
    return names


def _assert_reported_then_allowed(path: Path, expected: str) -> None:
    report = _scan(path)
    assert report.exit_code == 1, _explain(report)
    assert report.results[0].verdict is Verdict.FINDINGS
    assert any(expected in f.message for f in report.results[0].findings), _explain(report)
    names = _unknown_imports(report)
    assert expected in names
    assert not names & set(BUILTIN_ALLOWLIST)
    allowed = _scan(path, allow=tuple(sorted(names)))
    assert allowed.exit_code == 0, _explain(allowed)
    # allowing only part of what was reported is not enough
    if len(names) > 1:
        partial = _scan(path, allow=tuple(sorted(names - {expected})))
        assert partial.exit_code == 1, _explain(partial)
    else:
        assert _scan(path, allow=("some.other.Name",)).exit_code == 1


def test_sklearn_logistic_regression_is_reported_then_allowed(tmp_path: Path) -> None:
    joblib = pytest.importorskip("joblib")
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 3))
    model = linear_model.LogisticRegression().fit(features, (features[:, 0] > 0).astype(int))
    path = tmp_path / "model.joblib"
    joblib.dump(model, path)
    _assert_reported_then_allowed(path, "sklearn.linear_model._logistic.LogisticRegression")


@pytest.mark.torch
def test_whole_pickled_torch_module_is_reported_then_allowed(tmp_path: Path) -> None:
    torch = _torch()
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(4, 2), path)
    _assert_reported_then_allowed(path, "torch.nn.modules.linear.Linear")


@pytest.mark.torch
def test_whole_pickled_torch_sequential_is_reported_then_allowed(tmp_path: Path) -> None:
    torch = _torch()
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()), path)
    _assert_reported_then_allowed(path, "torch.nn.modules.container.Sequential")


# -- never looser than torch.load(weights_only=True)


def _torch_allowed() -> set[str]:
    _torch()
    unpickler = pytest.importorskip("torch._weights_only_unpickler")
    return set(unpickler._get_allowed_globals())


@pytest.mark.torch
def test_torch_allowlist_entries_are_allowed_by_torch_weights_only() -> None:
    torch_allowed = _torch_allowed()
    ours = {name for name in BUILTIN_ALLOWLIST if name.startswith("torch.")}
    assert len(ours) > 50
    looser = ours - torch_allowed
    assert not looser, f"allowed here but refused by torch.load(weights_only=True): {sorted(looser)}"
