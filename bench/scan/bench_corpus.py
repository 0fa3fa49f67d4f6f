"""Corpus for the scan benchmark: harmless malicious samples and benign checkpoints made by real libraries.

Malicious samples are assembled opcode by opcode (or pickled from a ``__reduce__`` stand-in, which never
runs the callable) and their payload only echoes ``TRAINGUARD-MARKER``.  Nothing here ever loads or
unpickles a sample; the only pickle parsing is ``pickletools.genops`` to find where to inject a payload.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import pickletools
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import joblib  # type: ignore[import-untyped]
import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from torch import nn

# Bump whenever a generator changes: a corpus built by another version is thrown away and rebuilt.
GENERATOR_VERSION = 2

MARKER_CMD = "echo TRAINGUARD-MARKER"
MARKER_CODE = "print('TRAINGUARD-MARKER')"
LARGE_TENSOR_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Sample:
    """One corpus file and what a scanner should say about it."""

    path: str
    label: str  # "malicious" or "benign"
    kind: str
    note: str


# --------------------------------------------------------------------------- pickle opcode helpers


def _str(text: str) -> bytes:
    """BINUNICODE opcode pushing ``text``."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _short_str(text: str) -> bytes:
    """SHORT_BINUNICODE opcode (protocol 4) pushing ``text``."""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    """GLOBAL opcode pushing ``module.name``."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(func: bytes, *args: bytes) -> bytes:
    """Ops that push ``func(*args)``: func, MARK, args, TUPLE, REDUCE."""
    return func + b"(" + b"".join(args) + b"tR"


def _proto(number: int, body: bytes) -> bytes:
    """A complete pickle: PROTO header, body, STOP."""
    return b"\x80" + bytes([number]) + body + b"."


def _str_list(items: list[str]) -> bytes:
    """Ops that push a list of strings: EMPTY_LIST, MARK, items, APPENDS."""
    return b"](" + b"".join(_str(item) for item in items) + b"e"


def _check_pickle(data: bytes) -> bytes:
    """Disassemble (never execute) so a malformed hand-made pickle fails at build time."""
    pickletools.dis(data, out=io.StringIO())
    return data


class _Reduce:
    """Pickles as ``func(*args)``; pickling only records the reference, nothing is called."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


# --------------------------------------------------------------------------- malicious raw pickles


def _raw_malicious_pickles() -> dict[str, tuple[bytes, str]]:
    """File name -> (pickle bytes, what it does)."""
    cmd = _str(MARKER_CMD)
    code = _str(MARKER_CODE)
    os_system = _call(_global("os", "system"), cmd)
    memo_stack_global = (
        _short_str("os")
        + b"\x940"
        + _short_str("system")
        + b"\x940"  # memoized as 0 and 1, then popped
        + b"}\x94"
        + _short_str("lr")
        + b"G?\x1a6\xe2\xeb\x1cC-"
        + b"s0"  # unrelated benign work
        + b"h\x00h\x01\x93"
        + b"("
        + _short_str(MARKER_CMD)
        + b"tR"
    )
    pickles = {
        "os_system_p0.pkl": (b"cos\nsystem\n(S'" + MARKER_CMD.encode() + b"'\ntR.", "os.system, protocol 0"),
        "posix_system_p2.pkl": (_proto(2, _call(_global("posix", "system"), cmd)), "posix.system"),
        "os_popen.pkl": (_proto(2, _call(_global("os", "popen"), cmd)), "os.popen"),
        "subprocess_popen.pkl": (
            _proto(2, _call(_global("subprocess", "Popen"), _str_list(["echo", "TRAINGUARD-MARKER"]))),
            "subprocess.Popen with an argv list",
        ),
        "subprocess_check_output.pkl": (
            _proto(2, _call(_global("subprocess", "check_output"), _str_list(["echo", "TRAINGUARD-MARKER"]))),
            "subprocess.check_output",
        ),
        "builtins_exec.pkl": (_proto(2, _call(_global("builtins", "exec"), code)), "builtins.exec"),
        "builtins_eval.pkl": (_proto(2, _call(_global("builtins", "eval"), code)), "builtins.eval"),
        "py2_builtin_eval.pkl": (_proto(2, _call(_global("__builtin__", "eval"), code)), "__builtin__.eval"),
        "getattr_import_os.pkl": (
            _proto(
                2,
                _call(
                    _call(
                        _global("builtins", "getattr"),
                        _call(_global("builtins", "__import__"), _str("os")),
                        _str("system"),
                    ),
                    cmd,
                ),
            ),
            "builtins.getattr(__import__('os'), 'system')",
        ),
        "importlib_attrgetter.pkl": (
            _proto(
                2,
                _call(
                    _call(
                        _call(_global("operator", "attrgetter"), _str("system")),
                        _call(_global("importlib", "import_module"), _str("os")),
                    ),
                    cmd,
                ),
            ),
            "operator.attrgetter('system')(importlib.import_module('os'))",
        ),
        "pkgutil_resolve_name.pkl": (
            _proto(2, _call(_call(_global("pkgutil", "resolve_name"), _str("os:system")), cmd)),
            "pkgutil.resolve_name('os:system')",
        ),
        "runpy_run_code.pkl": (
            _proto(2, _call(_global("runpy", "_run_code"), code, b"}")),
            "runpy._run_code(source, {})",
        ),
        "timeit_timeit.pkl": (
            _proto(
                2,
                _call(
                    _global("timeit", "timeit"), code, _str("pass"), _global("time", "perf_counter"), b"K\x01"
                ),
            ),
            "timeit.timeit(source, 'pass', perf_counter, 1)",
        ),
        "stack_global_memo_p4.pkl": (_proto(4, memo_stack_global), "STACK_GLOBAL whose names come from memo"),
        "nested_in_dict.pkl": (
            _proto(
                2,
                b"}("
                + _str("weight")
                + b"](G?\xf0\x00\x00\x00\x00\x00\x00e"
                + _str("bias")
                + os_system
                + b"u",
            ),
            "os.system hidden as one value of a state-dict-like dict",
        ),
        "reduce_exec_p5.pkl": (
            pickle.dumps(_Reduce(exec, (MARKER_CODE,)), protocol=5),
            "exec via __reduce__, protocol 5 framed",
        ),
    }
    return {name: (_check_pickle(data), note) for name, (data, note) in pickles.items()}


def _payload_ops(module: str, name: str, arg: str) -> bytes:
    """Stack-neutral ops calling ``module.name(arg)`` and discarding the result (for injection)."""
    return _call(_global(module, name), _str(arg)) + b"0"


def _inject_after_proto(data: bytes, payload: bytes) -> bytes:
    """Insert ``payload`` right after a pickle's PROTO opcode so it runs before the real object is built."""
    if data[:1] != b"\x80":
        raise ValueError("pickle has no PROTO header")
    return data[:2] + payload + data[2:]


# --------------------------------------------------------------------------- malicious containers


def _small_state_dict(seed: int = 0, width: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(width, width, generator=gen),
        "fc.bias": torch.randn(width, generator=gen),
    }


def _rewrite_torch_zip(src: Path, dst: Path, transform: Callable[[bytes], bytes]) -> None:
    """Copy a torch zip checkpoint entry by entry, passing ``data.pkl`` through ``transform``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/data.pkl"):
                data = transform(data)
            zout.writestr(info.filename, data)


def _malicious_torch_zip(dst: Path, transform: Callable[[bytes], bytes]) -> None:
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        clean = Path(tmp) / dst.name  # same name, so the archive's inner folder matches the file
        torch.save(_small_state_dict(), clean)
        _rewrite_torch_zip(clean, dst, transform)


def _pickle_spans(data: bytes, count: int) -> list[tuple[int, int]]:
    """Start/end offsets of the first ``count`` pickles stacked in ``data`` (opcodes walked, not run)."""
    spans: list[tuple[int, int]] = []
    stream = io.BytesIO(data)
    for _ in range(count):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        spans.append((start, stream.tell()))
    return spans


def _malicious_torch_legacy(dst: Path) -> None:
    """Legacy (non-zip) torch.save whose object pickle (4th of the stack) gets an os.system call."""
    buf = io.BytesIO()
    torch.save(_small_state_dict(), buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    start, end = _pickle_spans(data, 4)[3]
    obj = _inject_after_proto(data[start:end], _payload_ops("os", "system", MARKER_CMD))
    dst.write_bytes(data[:start] + obj + data[end:])


def _npy_object_bytes(payload: bytes) -> bytes:
    """An .npy file declaring an object array whose pickled body is ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return buf.getvalue() + payload


def _container_malicious(root: Path) -> Iterator[Sample]:
    """Malicious samples wrapped in real model containers."""
    system_pickle = _proto(2, _call(_global("posix", "system"), _str(MARKER_CMD)))
    zips: list[tuple[str, Callable[[bytes], bytes], str]] = [
        ("torch_zip_replaced.pt", lambda _d: system_pickle, "torch zip, data.pkl replaced by posix.system"),
        (
            "torch_zip_injected_exec.pt",
            lambda d: _inject_after_proto(d, _payload_ops("builtins", "exec", MARKER_CODE)),
            "torch zip, exec injected before the real state dict",
        ),
        (
            "pytorch_model.bin",
            lambda d: _inject_after_proto(d, _payload_ops("subprocess", "getoutput", MARKER_CMD)),
            "HF-style torch zip .bin, subprocess.getoutput injected",
        ),
        (
            "torch_zip_injected_eval.pth",
            lambda d: _inject_after_proto(d, _payload_ops("builtins", "eval", MARKER_CODE)),
            "torch zip .pth, eval injected",
        ),
        (
            "torch_zip_runpy.ckpt",
            lambda d: _inject_after_proto(d, _payload_ops("runpy", "run_module", "this")),
            "torch zip .ckpt, runpy.run_module injected",
        ),
    ]
    for name, transform, note in zips:
        _malicious_torch_zip(root / name, transform)
        yield Sample(name, "malicious", "torch-zip", note)
    _malicious_torch_legacy(root / "torch_legacy_injected.pt")
    yield Sample(
        "torch_legacy_injected.pt", "malicious", "torch-legacy", "legacy torch.save, os.system injected"
    )

    (root / "numpy_object.npy").write_bytes(_npy_object_bytes(system_pickle))
    yield Sample("numpy_object.npy", "malicious", "npy", "object-dtype .npy whose pickle calls posix.system")
    with zipfile.ZipFile(root / "numpy_object.npz", "w") as npz:
        npz.writestr("weights.npy", _npy_bytes(np.zeros(4, dtype=np.float32)))
        npz.writestr("arr_0.npy", _npy_object_bytes(system_pickle))
    yield Sample("numpy_object.npz", "malicious", "npz", ".npz holding an object .npy with posix.system")

    payload = {"weights": np.arange(8, dtype=np.float32), "hook": _Reduce(os.system, (MARKER_CMD,))}
    joblib.dump(payload, root / "payload.joblib")
    yield Sample("payload.joblib", "malicious", "joblib", "joblib dump with os.system next to an array")
    joblib.dump(payload, root / "payload_compressed.joblib", compress=3)
    yield Sample("payload_compressed.joblib", "malicious", "joblib", "zlib-compressed joblib with os.system")

    (root / "gzip_pickle.pkl.gz").write_bytes(gzip.compress(system_pickle))
    yield Sample("gzip_pickle.pkl.gz", "malicious", "gzip-pickle", "gzip-compressed posix.system pickle")
    (root / "weights.bin").write_bytes(
        _proto(2, _call(_global("subprocess", "Popen"), _str_list(["echo", "TRAINGUARD-MARKER"])))
    )
    yield Sample("weights.bin", "malicious", "pickle", "raw subprocess.Popen pickle with a .bin extension")
    (root / "raw_pickle_as.pt").write_bytes(_proto(2, _call(_global("builtins", "eval"), _str(MARKER_CODE))))
    yield Sample("raw_pickle_as.pt", "malicious", "pickle", "raw eval pickle with a .pt extension")
    yield from _format_malicious(root)


class _WritesAtLoad(nn.Module):
    """TorchScript whose __setstate__ (run by torch.jit.load) writes a file; scanners never load it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.ones(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> list[torch.Tensor]:
        return [self.w]

    @torch.jit.export
    def __setstate__(self, state: list[torch.Tensor]) -> None:
        self.w = state[0]
        torch.save(self.w, "/tmp/TRAINGUARD-MARKER")


SSTI_TEMPLATE = "{{ cycler.__init__.__globals__.os.popen('" + MARKER_CMD + "').read() }}"


def _format_malicious(root: Path) -> Iterator[Sample]:
    """Model formats other than pickle: TorchScript, GGUF, Keras and ONNX, each with a known attack."""
    torch.jit.save(torch.jit.script(_WritesAtLoad()), str(root / "torchscript_writes_at_load.pt"))
    yield Sample(
        "torchscript_writes_at_load.pt",
        "malicious",
        "torchscript",
        "TorchScript __setstate__ calls torch.save",
    )
    _gguf(root / "chat_template_ssti.gguf", SSTI_TEMPLATE, 16)
    yield Sample(
        "chat_template_ssti.gguf",
        "malicious",
        "gguf",
        "GGUF chat template reaching os.popen (CVE-2024-34359)",
    )
    keras = _keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x + 1), keras.layers.Dense(2)])
    model.save(root / "keras_lambda.keras")
    yield Sample("keras_lambda.keras", "malicious", "keras", "Keras Lambda layer with marshalled bytecode")
    _keras_with_activation(root / "keras_os_system.keras", "os", "system")
    yield Sample(
        "keras_os_system.keras", "malicious", "keras", "Keras config naming os.system (CVE-2025-1550)"
    )
    _onnx_file(root / "onnx_external_traversal.onnx", 8, external="../../../../etc/passwd")
    yield Sample(
        "onnx_external_traversal.onnx", "malicious", "onnx", "ONNX external data at ../../../../etc/passwd"
    )
    _onnx_file(root / "onnx_custom_op.onnx", 8, custom_domain="ai.onnx.contrib")
    yield Sample("onnx_custom_op.onnx", "malicious", "onnx", "ONNX operator PyOp from onnxruntime-extensions")


def _npy_bytes(array: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def build_malicious(root: Path) -> list[Sample]:
    """Write every malicious sample under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    for name, (data, note) in _raw_malicious_pickles().items():
        (root / name).write_bytes(data)
        samples.append(Sample(name, "malicious", "pickle", note))
    samples.extend(_container_malicious(root))
    return samples


# --------------------------------------------------------------------------- benign generators

BenignGen = Callable[[Path, int, int], Path]  # (path without suffix, seed, size) -> written file


def _mlp(seed: int, size: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(size, size * 2), nn.ReLU(), nn.Linear(size * 2, size))


def _convnet(seed: int, size: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, size, 3), nn.BatchNorm2d(size), nn.ReLU(), nn.Conv2d(size, size, 3))


class _TinyTransformer(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        d_model = max(8, size // 8 * 8)
        self.embed = nn.Embedding(100, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=d_model * 2, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 100)


def _stepped_optimizer(kind: str, seed: int, size: int) -> dict[str, Any]:
    model = _mlp(seed, size)
    opt: torch.optim.Optimizer
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    elif kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, size)).sum().backward()
    opt.step()
    return opt.state_dict()


def _save(obj: Any, base: Path, suffix: str, **kwargs: Any) -> Path:
    path = base.with_suffix(suffix)
    torch.save(obj, path, **kwargs)
    return path


def _gen_torch_fp32(base: Path, seed: int, size: int) -> Path:
    return _save(_mlp(seed, size).state_dict(), base, ".pt")


def _gen_torch_bf16(base: Path, seed: int, size: int) -> Path:
    return _save({k: v.to(torch.bfloat16) for k, v in _mlp(seed, size).state_dict().items()}, base, ".pt")


def _gen_torch_fp16(base: Path, seed: int, size: int) -> Path:
    return _save(_mlp(seed, size).half().state_dict(), base, ".pth")


def _gen_torch_int8(base: Path, seed: int, size: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    sd = {
        "w_int8": torch.randint(-128, 127, (size, size), dtype=torch.int8, generator=gen),
        "scale": torch.rand(size, generator=gen),
        "zero_point": torch.zeros(size, dtype=torch.int32),
    }
    return _save(sd, base, ".pt")


def _gen_torch_convnet(base: Path, seed: int, size: int) -> Path:
    return _save(_convnet(seed, size).state_dict(), base, ".pth")


def _gen_torch_transformer(base: Path, seed: int, size: int) -> Path:
    torch.manual_seed(seed)
    return _save(_TinyTransformer(size).state_dict(), base, ".pt")


def _gen_torch_hf_bin(base: Path, seed: int, size: int) -> Path:
    path = base.with_name(base.name + "_pytorch_model").with_suffix(".bin")
    torch.save(_mlp(seed, size).state_dict(), path)
    return path


def _gen_torch_checkpoint(base: Path, seed: int, size: int) -> Path:
    model = _mlp(seed, size)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    ckpt = {
        "epoch": seed,
        "step": seed * 100,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "loss": 0.5 + seed,
        "rng": torch.get_rng_state(),
    }
    return _save(ckpt, base, ".ckpt")


def _gen_torch_sgd(base: Path, seed: int, size: int) -> Path:
    return _save(_stepped_optimizer("sgd", seed, size), base, ".pt")


def _gen_torch_adam(base: Path, seed: int, size: int) -> Path:
    return _save(_stepped_optimizer("adam", seed, size), base, ".pt")


def _gen_torch_adamw(base: Path, seed: int, size: int) -> Path:
    return _save(_stepped_optimizer("adamw", seed, size), base, ".pt")


def _gen_torch_tensor(base: Path, seed: int, size: int) -> Path:
    return _save(torch.randn(size, size, generator=torch.Generator().manual_seed(seed)), base, ".pt")


def _gen_torch_legacy(base: Path, seed: int, size: int) -> Path:
    return _save(_mlp(seed, size).state_dict(), base, ".pt", _use_new_zipfile_serialization=False)


def _gen_torch_legacy_optim(base: Path, seed: int, size: int) -> Path:
    return _save(_stepped_optimizer("adam", seed, size), base, ".pth", _use_new_zipfile_serialization=False)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _gen_npy_float(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".npy")
    np.save(path, _rng(seed).standard_normal((size, size), dtype=np.float32))
    return path


def _gen_npy_int(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".npy")
    np.save(path, _rng(seed).integers(0, 1000, size=(size, 3, 4), dtype=np.int64))
    return path


def _gen_npy_structured(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".npy")
    arr = np.zeros(size, dtype=[("id", "<i4"), ("score", "<f8"), ("ok", "?")])
    arr["score"] = _rng(seed).random(size)
    np.save(path, arr)
    return path


def _gen_npz(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".npz")
    rng = _rng(seed)
    np.savez(path, w=rng.standard_normal((size, size)), b=rng.standard_normal(size))
    return path


def _gen_npz_compressed(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".npz")
    rng = _rng(seed)
    np.savez_compressed(path, w=rng.standard_normal((size, size)).astype(np.float16), idx=np.arange(size))
    return path


def _gen_safetensors_torch(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".safetensors")
    safetensors.torch.save_file(_mlp(seed, size).state_dict(), str(path), metadata={"format": "pt"})
    return path


def _gen_safetensors_bf16(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".safetensors")
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in _TinyTransformer(size).state_dict().items()}
    safetensors.torch.save_file(sd, str(path))
    return path


def _gen_safetensors_numpy(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".safetensors")
    rng = _rng(seed)
    safetensors.numpy.save_file(
        {"w": rng.standard_normal((size, size)).astype(np.float32), "ids": np.arange(size, dtype=np.int64)},
        str(path),
    )
    return path


def _joblib(obj: Any, base: Path, compress: Any = 0) -> Path:
    path = base.with_suffix(".joblib")
    joblib.dump(obj, path, compress=compress)
    return path


def _gen_joblib_array(base: Path, seed: int, size: int) -> Path:
    return _joblib(_rng(seed).standard_normal((size, size)), base)


def _gen_joblib_array_zlib(base: Path, seed: int, size: int) -> Path:
    return _joblib(_rng(seed).standard_normal((size, size)), base, compress=3)


def _gen_joblib_dict(base: Path, seed: int, size: int) -> Path:
    rng = _rng(seed)
    return _joblib(
        {
            "coef": rng.standard_normal(size),
            "intercept": float(seed),
            "classes": list(range(3)),
            "name": f"model-{seed}",
        },
        base,
    )


def _gen_joblib_dict_gzip(base: Path, seed: int, size: int) -> Path:
    rng = _rng(seed)
    return _joblib(
        {"mean": rng.random(size), "scale": rng.random(size), "n": size}, base, compress=("gzip", 3)
    )


def _gen_joblib_lzma(base: Path, seed: int, size: int) -> Path:
    return _joblib([_rng(seed).random(size), {"k": seed}], base, compress=("xz", 1))


def _pickle_file(obj: Any, base: Path, protocol: int) -> Path:
    path = base.with_suffix(".pkl")
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _numbers(seed: int, size: int) -> dict[str, Any]:
    rng = _rng(seed)
    return {
        "lr": 1e-3,
        "epochs": seed,
        "losses": rng.random(size).tolist(),
        "ids": list(range(size)),
        "meta": {"name": f"run-{seed}", "ok": True, "shape": (size, size)},
    }


def _gen_pickle_p0(base: Path, seed: int, size: int) -> Path:
    return _pickle_file(_numbers(seed, size), base, 0)


def _gen_pickle_p2(base: Path, seed: int, size: int) -> Path:
    return _pickle_file(_numbers(seed, size), base, 2)


def _gen_pickle_p4(base: Path, seed: int, size: int) -> Path:
    return _pickle_file(_numbers(seed, size), base, 4)


def _gen_pickle_p5_list(base: Path, seed: int, size: int) -> Path:
    return _pickle_file([[float(i * seed) for i in range(size)] for _ in range(4)], base, 5)


# Order matters only for the folder mix; names are stable sample names.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _gguf(path: Path, template: str, size: int) -> Path:
    import gguf  # type: ignore[import-untyped]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(size)])
    writer.add_chat_template(template)
    writer.add_tensor("token_embd.weight", np.ones((size, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    return keras


def _keras_with_activation(path: Path, module: str, function: str) -> None:
    keras = _keras()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    with zipfile.ZipFile(path) as zin:
        members = [(info.filename, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w") as zout:
        for name, data in members:
            if name == "config.json":
                config = json.loads(data)
                dense = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")
                dense["config"]["activation"] = {
                    "module": module,
                    "class_name": "function",
                    "config": function,
                }
                data = json.dumps(config).encode()
            zout.writestr(name, data)


def _onnx_file(path: Path, size: int, *, external: str = "", custom_domain: str = "") -> Path:
    import onnx  # type: ignore[import-untyped]
    from onnx import helper, numpy_helper

    weights = numpy_helper.from_array(_rng(size).standard_normal((size, size)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    if custom_domain:
        nodes.append(helper.make_node("PyOp", ["y"], ["z"], domain=custom_domain))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, size])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        tensor = model.graph.initializer[0]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", external
    path.write_bytes(model.SerializeToString())
    return path


def _gen_torchscript(base: Path, seed: int, size: int) -> Path:
    path = base.with_suffix(".pt")
    torch.jit.save(torch.jit.trace(_mlp(seed, size), torch.ones(1, size)), str(path))
    return path


def _gen_gguf(base: Path, seed: int, size: int) -> Path:
    return _gguf(base.with_suffix(".gguf"), CHATML_TEMPLATE, size)


def _gen_keras(base: Path, seed: int, size: int) -> Path:
    keras = _keras()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((size,)), keras.layers.Dense(size, activation="relu"), keras.layers.Dense(2)]
    )
    path = base.with_suffix(".keras")
    model.save(path)
    return path


def _gen_onnx(base: Path, seed: int, size: int) -> Path:
    return _onnx_file(base.with_suffix(".onnx"), size)


BENIGN_GENERATORS: dict[str, tuple[str, BenignGen]] = {
    "torch_fp32": ("torch-zip", _gen_torch_fp32),
    "torch_bf16": ("torch-zip", _gen_torch_bf16),
    "torch_fp16": ("torch-zip", _gen_torch_fp16),
    "torch_int8": ("torch-zip", _gen_torch_int8),
    "torch_convnet_bn": ("torch-zip", _gen_torch_convnet),
    "torch_transformer": ("torch-zip", _gen_torch_transformer),
    "torch_hf": ("torch-zip", _gen_torch_hf_bin),
    "torch_train_checkpoint": ("torch-zip", _gen_torch_checkpoint),
    "torch_optim_sgd": ("torch-zip", _gen_torch_sgd),
    "torch_optim_adam": ("torch-zip", _gen_torch_adam),
    "torch_optim_adamw": ("torch-zip", _gen_torch_adamw),
    "torch_tensor": ("torch-zip", _gen_torch_tensor),
    "torch_legacy": ("torch-legacy", _gen_torch_legacy),
    "torch_legacy_optim": ("torch-legacy", _gen_torch_legacy_optim),
    "npy_float": ("npy", _gen_npy_float),
    "npy_int": ("npy", _gen_npy_int),
    "npy_structured": ("npy", _gen_npy_structured),
    "npz": ("npz", _gen_npz),
    "npz_compressed": ("npz", _gen_npz_compressed),
    "safetensors_torch": ("safetensors", _gen_safetensors_torch),
    "safetensors_bf16": ("safetensors", _gen_safetensors_bf16),
    "safetensors_numpy": ("safetensors", _gen_safetensors_numpy),
    "joblib_array": ("joblib", _gen_joblib_array),
    "joblib_array_zlib": ("joblib", _gen_joblib_array_zlib),
    "joblib_dict": ("joblib", _gen_joblib_dict),
    "joblib_dict_gzip": ("joblib", _gen_joblib_dict_gzip),
    "joblib_lzma": ("joblib", _gen_joblib_lzma),
    "pickle_p0": ("pickle", _gen_pickle_p0),
    "pickle_p2": ("pickle", _gen_pickle_p2),
    "pickle_p4": ("pickle", _gen_pickle_p4),
    "pickle_p5_list": ("pickle", _gen_pickle_p5_list),
    "torchscript_traced": ("torchscript", _gen_torchscript),
    "gguf_chatml": ("gguf", _gen_gguf),
    "keras_dense": ("keras", _gen_keras),
    "onnx_mlp": ("onnx", _gen_onnx),
}

# (seed, size) variants written for the per-file benign set.
BENIGN_VARIANTS = ((0, 32), (1, 64))


def build_benign(root: Path) -> list[Sample]:
    """Write every benign generator in a couple of shapes under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    for name, (kind, gen) in BENIGN_GENERATORS.items():
        for seed, size in BENIGN_VARIANTS[: 2 if kind.startswith("torch") else 1]:
            path = gen(root / f"{name}_{size}", seed, size)
            samples.append(Sample(path.name, "benign", kind, f"{name}, seed {seed}, size {size}"))
    return samples


def build_folder(root: Path, count: int) -> int:
    """Write ``count`` benign checkpoints cycling through the generators; returns total bytes."""
    root.mkdir(parents=True, exist_ok=True)
    gens = list(BENIGN_GENERATORS.items())
    for i in range(count):
        name, (_kind, gen) = gens[i % len(gens)]
        size = 8 + (i * 7) % 57
        gen(root / f"{i:05d}_{name}", i, size)
    return sum(p.stat().st_size for p in root.iterdir())


# --------------------------------------------------------------------------- large checkpoints


def _scratch_tensor_file(path: Path, nbytes: int) -> None:
    """A file of pseudo-random bytes (written in 16 MiB chunks) to memory-map tensors from."""
    chunk = np.random.default_rng(0).standard_normal(4 * 1024 * 1024, dtype=np.float32).tobytes()
    with path.open("wb") as out:
        for _ in range(nbytes // len(chunk)):
            out.write(chunk)


def build_large(path: Path, gib: int) -> int:
    """torch.save a state dict of ``gib`` GiB made of 256 MiB tensors memory-mapped from a scratch file.

    The tensors share one page-cache-backed scratch file, so resident memory stays around 256 MiB.
    """
    scratch = path.with_name(path.name + ".scratch")
    _scratch_tensor_file(scratch, LARGE_TENSOR_BYTES)
    numel = LARGE_TENSOR_BYTES // 4
    count = gib * 1024 * 1024 * 1024 // LARGE_TENSOR_BYTES
    state = {
        f"layers.{i}.weight": torch.from_file(str(scratch), shared=False, size=numel, dtype=torch.float32)
        for i in range(count)
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    del state
    tmp.replace(path)
    scratch.unlink()
    return path.stat().st_size


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """What has been built under the corpus directory; saved as manifest.json."""

    generator_version: int
    samples: list[Sample]
    folders: dict[str, dict[str, Any]]  # str(count) -> {"path", "bytes"}
    large: dict[str, dict[str, Any]]  # str(GiB) -> {"path", "bytes"}


def _manifest_path(root: Path) -> Path:
    return root / "manifest.json"


def load_manifest(root: Path) -> Manifest | None:
    """The saved manifest, or None when missing or built by another generator version."""
    path = _manifest_path(root)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    if raw.get("generator_version") != GENERATOR_VERSION:
        return None
    return Manifest(GENERATOR_VERSION, [Sample(**s) for s in raw["samples"]], raw["folders"], raw["large"])


def save_manifest(root: Path, manifest: Manifest) -> None:
    data = {
        "generator_version": manifest.generator_version,
        "samples": [asdict(s) for s in manifest.samples],
        "folders": manifest.folders,
        "large": manifest.large,
    }
    _manifest_path(root).write_text(json.dumps(data, indent=2))


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def ensure_corpus(
    root: Path, folder_count: int, large_gib: list[int], log: Callable[[str], None]
) -> Manifest:
    """Build (or reuse) the per-file samples, the ``folder_count`` folder and the large files."""
    manifest = load_manifest(root)
    if manifest is None:
        if root.exists():
            log(f"corpus at {root} is missing or from another generator version: rebuilding")
            shutil.rmtree(root)
        root.mkdir(parents=True)
        log("building malicious and benign samples")
        samples = build_malicious(root / "malicious") + build_benign(root / "benign")
        manifest = Manifest(GENERATOR_VERSION, samples, {}, {})
        save_manifest(root, manifest)
    key = str(folder_count)
    if key not in manifest.folders:
        folder = root / f"folder-{folder_count}"
        if folder.exists():
            shutil.rmtree(folder)
        log(f"building folder of {folder_count} benign checkpoints")
        size = build_folder(folder, folder_count)
        manifest.folders[key] = {"path": folder.name, "bytes": size}
        save_manifest(root, manifest)
    for gib in large_gib:
        if str(gib) in manifest.large:
            continue
        need = gib * 1024**3 + LARGE_TENSOR_BYTES + 512 * 1024**2
        if _free_bytes(root) < need:
            raise RuntimeError(f"not enough free disk under {root} for the {gib} GiB checkpoint")
        log(f"building {gib} GiB checkpoint")
        path = root / f"large-{gib}gib.pt"
        size = build_large(path, gib)
        manifest.large[str(gib)] = {"path": path.name, "bytes": size}
        save_manifest(root, manifest)
    return manifest


def sample_path(root: Path, sample: Sample) -> Path:
    sub = "malicious" if sample.label == "malicious" else "benign"
    return root / sub / sample.path


def warm_page_cache(path: Path) -> None:
    """Read a file once so every tool sees it in the page cache (timings are warm-cache)."""
    with path.open("rb") as src:
        while src.read(64 * 1024 * 1024):
            pass
