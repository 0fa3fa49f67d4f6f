"""Fuzzing scan_file: whatever the bytes, it returns a FileResult with a verdict and never raises."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainguard.findings import Verdict
from trainguard.scan import FileResult, scan_file

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _torch_seeds(out: Path) -> dict[str, bytes]:
    try:
        import torch
    except ImportError:
        return {}
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    state = {"weight": layer.weight.detach(), "bias": layer.bias.detach().half(), "step": 3}
    torch.save(state, out / "seed.pt")
    torch.save(state, out / "seed-legacy.pt", _use_new_zipfile_serialization=False)
    return {
        "torch-zip": (out / "seed.pt").read_bytes(),
        "torch-legacy": (out / "seed-legacy.pt").read_bytes(),
    }


def _build_seeds(out: Path) -> dict[str, bytes]:
    import joblib  # type: ignore[import-untyped]
    from safetensors.numpy import save_file

    seeds = _torch_seeds(out)
    obj = {"name": "w", "values": [1, 2.5, None, True], "blob": b"\x00\x01" * 8, "nested": {"t": (1, "a")}}
    seeds["pickle-2"] = pickle.dumps(obj, protocol=2)
    seeds["pickle-4"] = pickle.dumps([obj, obj], protocol=4)
    seeds["pickle-0"] = pickle.dumps(obj, protocol=0)
    buf = io.BytesIO()
    np.save(buf, np.arange(12, dtype=np.float32).reshape(3, 4))
    seeds["npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, np.array([1, "x", None], dtype=object), allow_pickle=True)
    seeds["npy-object"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(4), b=np.ones((2, 2)))
    seeds["npz"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez_compressed(buf, a=np.arange(4))
    seeds["npz-compressed"] = buf.getvalue()
    save_file(
        {"w": np.ones((2, 3), dtype=np.float32), "b": np.zeros(2, dtype=np.int64)}, str(out / "seed.st")
    )
    seeds["safetensors"] = (out / "seed.st").read_bytes()
    joblib.dump({"a": np.arange(5), "o": np.array([1, "s"], dtype=object)}, out / "seed.joblib")
    seeds["joblib"] = (out / "seed.joblib").read_bytes()
    joblib.dump({"a": np.arange(5)}, out / "seed.joblib.z", compress=("zlib", 3))
    seeds["joblib-zlib"] = (out / "seed.joblib.z").read_bytes()
    seeds["gzip-pickle"] = gzip.compress(seeds["pickle-2"], mtime=0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("model.pkl", "arr.npy"):
            payload = seeds["pickle-4"] if name == "model.pkl" else seeds["npy"]
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    seeds["tar"] = buf.getvalue()
    return seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _build_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "artifact"


def _internal_errors(result: FileResult) -> list[str]:
    """scan_file turns an unexpected exception into an "Error" problem (undecided): still a scanner bug."""
    return [p.message for p in result.problems if p.kind == "Error"]


@pytest.fixture(scope="module", autouse=True)
def private_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point tempfile at an empty folder of our own, so leftovers of these scans (and only these) show."""
    saved = tempfile.tempdir
    folder = tmp_path_factory.mktemp("spill")
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved


def _leftovers() -> list[str]:
    return sorted(p.name for p in Path(tempfile.gettempdir()).iterdir())


def _check(path: Path, data: bytes) -> FileResult:
    path.write_bytes(data)
    result = scan_file(str(path))
    assert isinstance(result, FileResult)
    assert isinstance(result.verdict, Verdict)
    assert result.path == str(path)
    assert result.size == len(data) or result.verdict is Verdict.SKIPPED
    if result.verdict is Verdict.FINDINGS:
        assert result.findings
    else:
        assert not result.findings
    if result.verdict is Verdict.UNDECIDED:
        assert result.problems
    if result.verdict is Verdict.CLEAN:
        assert not result.problems
    assert not _leftovers(), "scan left temporary files behind"
    assert not _internal_errors(result), result.problems
    return result


def test_every_seed_is_clean(seeds: dict[str, bytes], target: Path) -> None:
    assert len(seeds) >= 12
    for name, data in seeds.items():
        result = _check(target, data)
        assert result.verdict is Verdict.CLEAN, (name, result)


# -- mutations


def _flip(data: bytes, draw: st.DataObject) -> bytes:
    if not data:
        return data
    i = draw.draw(st.integers(0, len(data) - 1), label="flip at")
    bit = draw.draw(st.integers(0, 7), label="bit")
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]


def _set_byte(data: bytes, draw: st.DataObject) -> bytes:
    if not data:
        return data
    i = draw.draw(st.integers(0, len(data) - 1), label="set at")
    value = draw.draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x2E, 0x28, 0x93, 0x95]), label="value")
    return data[:i] + bytes([value]) + data[i + 1 :]


def _truncate(data: bytes, draw: st.DataObject) -> bytes:
    return data[: draw.draw(st.integers(0, len(data)), label="truncate at")]


def _insert(data: bytes, draw: st.DataObject) -> bytes:
    i = draw.draw(st.integers(0, len(data)), label="insert at")
    return data[:i] + draw.draw(st.binary(min_size=1, max_size=64), label="inserted") + data[i:]


def _delete(data: bytes, draw: st.DataObject) -> bytes:
    i = draw.draw(st.integers(0, len(data)), label="delete at")
    n = draw.draw(st.integers(1, 64), label="delete count")
    return data[:i] + data[i + n :]


def _overwrite_int(data: bytes, draw: st.DataObject) -> bytes:
    """Plant a huge or boundary length where a size field might be."""
    if len(data) < 8:
        return data
    i = draw.draw(st.integers(0, len(data) - 8), label="int at")
    width = draw.draw(st.sampled_from([2, 4, 8]), label="width")
    value = draw.draw(
        st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, (1 << 63) - 1, (1 << 64) - 1]),
        label="v",
    )
    raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return data[:i] + raw + data[i + width :]


_MUTATORS: list[Callable[[bytes, st.DataObject], bytes]] = [
    _flip,
    _set_byte,
    _truncate,
    _insert,
    _delete,
    _overwrite_int,
]


@_SETTINGS
@given(draw=st.data())
def test_mutated_seeds_never_raise(seeds: dict[str, bytes], target: Path, draw: st.DataObject) -> None:
    name = draw.draw(st.sampled_from(sorted(seeds)), label="seed")
    data = seeds[name]
    for _ in range(draw.draw(st.integers(1, 4), label="rounds")):
        mutate = draw.draw(st.sampled_from(_MUTATORS), label="mutator")
        data = mutate(data, draw)
    _check(target, data)


@_SETTINGS
@given(draw=st.data())
def test_spliced_seeds_never_raise(seeds: dict[str, bytes], target: Path, draw: st.DataObject) -> None:
    names = sorted(seeds)
    first = seeds[draw.draw(st.sampled_from(names), label="first")]
    second = seeds[draw.draw(st.sampled_from(names), label="second")]
    cut = draw.draw(st.integers(0, len(first)), label="cut")
    begin = draw.draw(st.integers(0, len(second)), label="begin")
    end = draw.draw(st.integers(begin, len(second)), label="end")
    how = draw.draw(st.sampled_from(["replace-tail", "insert", "overwrite", "append"]), label="how")
    if how == "replace-tail":
        data = first[:cut] + second[begin:]
    elif how == "insert":
        data = first[:cut] + second[begin:end] + first[cut:]
    elif how == "overwrite":
        piece = second[begin:end]
        data = first[:cut] + piece + first[cut + len(piece) :]
    else:
        data = first + second[begin:end]
    _check(target, data)


@_SETTINGS
@given(data=st.binary(max_size=4096))
def test_random_bytes_never_raise(target: Path, data: bytes) -> None:
    _check(target, data)


_MAGICS = [
    b"PK\x03\x04",
    b"PK\x05\x06",
    b"\x93NUMPY\x01\x00",
    b"\x93NUMPY\x02\x00",
    b"\x1f\x8b\x08\x00",
    b"BZh9",
    b"\xfd7zXZ\x00",
    b"\x5d\x00\x00",
    b"7z\xbc\xaf\x27\x1c",
    b"ZF0x",
    b"\x78\x9c",
    b"\x80\x02",
    b"\x80\x04\x95",
    b"\x80\x05",
    b"(",
    b"c",
]


@_SETTINGS
@given(magic=st.sampled_from(_MAGICS), rest=st.binary(max_size=2048))
def test_random_bytes_behind_a_format_magic_never_raise(target: Path, magic: bytes, rest: bytes) -> None:
    _check(target, magic + rest)


@_SETTINGS
@given(header=st.binary(max_size=200), size=st.integers(0, 2048))
def test_random_safetensors_headers_never_raise(target: Path, header: bytes, size: int) -> None:
    body = b"{" + header
    _check(target, len(body).to_bytes(8, "little") + body + bytes(size))


# -- internal errors these fuzzers found (fixed in 37fb779)


def _assert_no_internal_error(path: Path, data: bytes) -> FileResult:
    path.write_bytes(data)
    result = scan_file(str(path))
    assert not _internal_errors(result), result.problems
    return result


def test_npy_v2_header_cut_short(target: Path) -> None:
    result = _assert_no_internal_error(target, b"\x93NUMPY\x02\x00\x00\x00")
    assert result.verdict is Verdict.UNDECIDED


def test_joblib_array_with_negative_itemsize(target: Path) -> None:
    import joblib

    buf = io.BytesIO()
    joblib.dump(np.arange(5), buf)
    data = buf.getvalue()
    elsize = b"NNNJ\xff\xff\xff\xff"  # the dtype state: names, fields, subarray, then elsize == -1
    assert data.count(elsize) == 1
    # NumPy ignores the elsize of a non-flexible type, so joblib.load reads this file; the scanner may
    # call it clean or undecided, but must not fail internally
    _assert_no_internal_error(target, data.replace(elsize, b"NNNJ" + struct.pack("<i", -1_000_000)))
