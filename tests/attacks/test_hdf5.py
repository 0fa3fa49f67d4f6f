"""HDF5 files, read from the bytes: a legacy Keras model (`model.save("x.h5")`) is judged by its
`model_config` like a `.keras` archive (a Lambda's bytecode, a module outside Keras), whatever HDF5
layout h5py chose (old or new object headers, a user block in front); anything this reader does not
follow, and HDF5 files that are not Keras models, are undecided. Files are written by the real Keras
and h5py."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from trainguard.findings import Verdict
from trainguard.scan import ScanOptions, scan_path

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")
np = pytest.importorskip("numpy")

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _result(path: Path) -> tuple[Verdict, str]:
    (result,) = scan_path(path, ScanOptions(jobs=1)).results
    said = " | ".join(
        [
            *(f"{f.rule}: {f.message} ({f.location})" for f in result.findings),
            *(p.message for p in result.problems),
        ]
    )
    return result.verdict, said


def _model(*layers: Any) -> Any:
    return keras.Sequential([keras.Input((4,)), *layers, keras.layers.Dense(2)])


def _legacy(path: Path, model: Any) -> Path:
    model.save(path)  # the .h5 suffix picks the legacy HDF5 format
    return path


def test_a_genuine_legacy_keras_model_is_clean(tmp_path: Path) -> None:
    path = _legacy(tmp_path / "model.h5", _model(keras.layers.Dense(3, activation="relu")))
    verdict, said = _result(path)
    assert verdict == Verdict.CLEAN, said


def test_a_lambda_layer_in_a_legacy_model_is_critical(tmp_path: Path) -> None:
    path = _legacy(tmp_path / "model.h5", _model(keras.layers.Lambda(lambda x: x + 1)))
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "keras-lambda" in said and "@model_config" in said


def _rewrite_config(path: Path, edit: Any, **file_options: Any) -> Path:
    with h5py.File(path, "r") as f:
        attributes = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    attributes["model_config"] = json.dumps(edit(json.loads(attributes["model_config"])))
    out = path.with_name("rewritten.h5")
    with h5py.File(out, "w", **file_options) as f:
        for key, value in attributes.items():
            f.attrs[key] = value
        f["model_weights/dense/kernel"] = np.ones((4, 2), dtype=np.float32)
    return out


def _os_system(config: Any) -> Any:
    dense = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")
    dense["config"]["activation"] = {"module": "os", "class_name": "function", "config": "system"}
    return config


@pytest.mark.parametrize(
    "layout",
    [{}, {"libver": "latest"}, {"userblock_size": 512}, {"userblock_size": 4096, "libver": "latest"}],
    ids=["earliest", "latest", "user-block", "user-block-latest"],
)
def test_every_layout_h5py_writes_is_followed(tmp_path: Path, layout: dict[str, Any]) -> None:
    genuine = _legacy(tmp_path / "model.h5", _model(keras.layers.Dense(3)))
    benign = _rewrite_config(genuine, lambda c: c, **layout)
    assert _result(benign)[0] == Verdict.CLEAN
    hostile = _rewrite_config(genuine, _os_system, **layout)
    verdict, said = _result(hostile)
    assert verdict == Verdict.FINDINGS and "keras-import: Keras config imports os.system" in said


def test_a_pickle_in_the_user_block_is_found(tmp_path: Path) -> None:
    # pickle.load reads a file from its first byte: a user block can be a whole pickle.
    genuine = _legacy(tmp_path / "model.h5", _model(keras.layers.Dense(3)))
    path = _rewrite_config(genuine, lambda c: c, userblock_size=512)
    data = bytearray(path.read_bytes())
    payload = b"cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR."
    data[: len(payload)] = payload
    path.write_bytes(bytes(data))
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "os.system" in said


@pytest.mark.parametrize(
    ("name", "write", "says"),
    [
        ("plain-data", lambda f: f.create_dataset("x", data=np.arange(3)), "not a Keras model"),
        (
            "dense-attributes",
            lambda f: (
                [f.attrs.__setitem__(f"a{i}", "x" * 100) for i in range(20)]
                + [f.attrs.__setitem__("keras_version", "2.15.0")]
            ),
            "dense storage",
        ),
        ("config-not-a-string", lambda f: f.attrs.__setitem__("model_config", np.arange(3)), "not a string"),
    ],
)
def test_what_the_reader_does_not_follow_is_undecided(
    tmp_path: Path, name: str, write: Any, says: str
) -> None:
    path = tmp_path / f"{name}.h5"
    with h5py.File(path, "w", libver="latest") as f:
        write(f)
    verdict, said = _result(path)
    assert verdict == Verdict.UNDECIDED, said
    assert says in said


def test_damaged_files_never_crash_the_scan_or_hide_the_lambda(tmp_path: Path) -> None:
    original = _legacy(tmp_path / "model.h5", _model(keras.layers.Lambda(lambda x: x + 1))).read_bytes()
    rng = random.Random(20261206)
    for trial in range(60):
        data = bytearray(original)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(min(len(data), 4096))] = rng.randrange(256)
        path = tmp_path / f"damaged-{trial}.h5"
        path.write_bytes(bytes(data))
        verdict, said = _result(path)
        assert "analysis failed" not in said, said
        # Damage may make the model unreadable (undecided), never the Lambda silently gone (clean),
        # unless it removed the model config itself, which Keras then cannot load either.
        if verdict == Verdict.CLEAN:
            assert b"model_config" not in bytes(data) or b"Lambda" not in bytes(data), trial


def test_a_second_model_config_attribute_is_read_too(tmp_path: Path) -> None:
    # Two attributes of one name (h5py never writes that; the bytes can say it): whichever copy a
    # reader takes, both are judged.
    genuine = _legacy(tmp_path / "model.h5", _model(keras.layers.Dense(3)))
    with h5py.File(genuine, "r") as f:
        benign = f.attrs["model_config"]
    benign = benign.decode() if isinstance(benign, bytes) else str(benign)
    hostile = json.dumps(_os_system(json.loads(benign)))
    path = tmp_path / "twice.h5"
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["model_config"] = benign
        f.attrs["model_confiX"] = hostile
    raw = path.read_bytes()
    assert raw.count(b"model_confiX") == 1
    path.write_bytes(raw.replace(b"model_confiX", b"model_config"))
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "os.system" in said
