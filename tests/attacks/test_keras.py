"""Keras v3 archives: genuine models written by the real Keras are clean, custom layers found through
the loader's own registry included; a config that makes load_model import a module outside Keras, a
Lambda layer's marshalled bytecode and a TFOpLambda outside TensorFlow's maths are findings; a config
that cannot be read is undecided. One test proves with the real load_model that a Lambda runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from trainguard.findings import Verdict
from trainguard.scan import ScanOptions, scan_path

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

pytestmark = pytest.mark.torch


@keras.saving.register_keras_serializable(package="tests")
class _Double(keras.layers.Layer):  # type: ignore[misc]
    def call(self, x: Any) -> Any:
        return x * 2


def _result(path: Path) -> tuple[Verdict, str]:
    (result,) = scan_path(path, ScanOptions(jobs=1)).results
    said = " | ".join(
        [*(f"{f.rule}: {f.message}" for f in result.findings), *(p.message for p in result.problems)]
    )
    return result.verdict, said


def _sequential(*layers: Any) -> Any:
    return keras.Sequential([keras.Input((4,)), *layers])


GENUINE = {
    "dense": lambda: _sequential(
        keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.1), keras.layers.Dense(2)
    ),
    "norm-and-conv": lambda: keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(2, 3),
            keras.layers.LayerNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    ),
}


@pytest.mark.parametrize("name", list(GENUINE))
def test_a_genuine_keras_model_is_clean(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.keras"
    GENUINE[name]().save(path)
    assert _result(path) == (Verdict.CLEAN, "")


def test_a_registered_custom_layer_is_a_finding_until_allowed(tmp_path: Path) -> None:
    path = tmp_path / "custom.keras"
    _sequential(_Double(), keras.layers.Dense(2)).save(path)
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "keras-import" in said and "--allow" in said and "._Double" in said
    (result,) = scan_path(path, ScanOptions(jobs=1, allow=(f"{__name__}._Double",))).results
    assert result.verdict == Verdict.CLEAN, result


def test_a_functional_model_compiled_with_its_optimizer_is_clean(tmp_path: Path) -> None:
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(3, activation="gelu")(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    path = tmp_path / "functional.keras"
    model.save(path)
    assert _result(path) == (Verdict.CLEAN, "")


def test_a_lambda_layer_is_critical_and_the_real_load_model_runs_it(tmp_path: Path) -> None:
    witness = tmp_path / "ran"
    path = tmp_path / "lambda.keras"
    # The bytecode only writes a marker file in tmp_path when the layer is built or called.
    _sequential(keras.layers.Lambda(eval(f"lambda x: (open({str(witness)!r}, 'w').close(), x)[1]"))).save(
        path
    )
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "keras-lambda" in said
    loaded = subprocess.run(
        [sys.executable, "-c", f"import keras; keras.models.load_model({str(path)!r}, safe_mode=False)"],
        env=dict(os.environ, KERAS_BACKEND="torch"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert witness.exists(), (
        f"load_model did not run the Lambda: the sample proves nothing\\n{loaded.stderr[-2000:]}"
    )


def _with_config(tmp_path: Path, edit: Any, name: str = "edited.keras") -> Path:
    genuine = tmp_path / "genuine.keras"
    GENUINE["dense"]().save(genuine)
    target = tmp_path / name
    with zipfile.ZipFile(genuine) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "config.json":
                data = edit(data)
            zout.writestr(info.filename, data)
    return target


def _activation(module: str, function: str) -> Any:
    def edit(data: bytes) -> bytes:
        config = json.loads(data)
        (dense,) = [layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense"][:1]
        dense["config"]["activation"] = {
            "module": module,
            "class_name": "function",
            "config": function,
            "registered_name": "function",
        }
        return json.dumps(config).encode()

    return edit


@pytest.mark.parametrize(
    ("module", "function"), [("os", "system"), ("builtins", "eval"), ("subprocess", "run")]
)
def test_a_config_that_imports_outside_keras_is_critical(tmp_path: Path, module: str, function: str) -> None:
    verdict, said = _result(_with_config(tmp_path, _activation(module, function)))
    assert verdict == Verdict.FINDINGS, said
    assert "keras-import" in said and f"{module}.{function}" in said


def test_a_layer_class_from_outside_keras_is_critical(tmp_path: Path) -> None:
    def edit(data: bytes) -> bytes:
        config = json.loads(data)
        (dropout,) = [layer for layer in config["config"]["layers"] if layer["class_name"] == "Dropout"]
        dropout["module"] = "evil_package.layers"
        return json.dumps(config).encode()

    verdict, said = _result(_with_config(tmp_path, edit))
    assert verdict == Verdict.FINDINGS and "evil_package.layers.Dropout, not on the allowlist" in said


def test_a_tf_op_lambda_outside_maths_is_a_finding(tmp_path: Path) -> None:
    def edit(data: bytes) -> bytes:
        config = json.loads(data)
        layer = {
            "module": "keras.layers",
            "class_name": "TFOpLambda",
            "config": {"function": "io.write_file"},
        }
        config["config"]["layers"].append(layer)
        return json.dumps(config).encode()

    verdict, said = _result(_with_config(tmp_path, edit))
    assert verdict == Verdict.FINDINGS and "tf.io.write_file" in said


@pytest.mark.parametrize(
    ("name", "config", "says"),
    [
        ("broken", b'{"class_name": ', "does not parse"),
        ("deep", b"[" * 300 + b"]" * 300, "nested deeper"),
    ],
)
def test_a_config_that_cannot_be_read_is_undecided(
    tmp_path: Path, name: str, config: bytes, says: str
) -> None:
    verdict, said = _result(_with_config(tmp_path, lambda _: config, f"{name}.keras"))
    assert verdict == Verdict.UNDECIDED, said
    assert says in said


def test_a_config_alone_is_read_as_keras(tmp_path: Path) -> None:
    # load_model deserialises config.json before it looks for metadata or weights.
    path = tmp_path / "bare.keras"
    config = {"module": "keras.layers", "class_name": "Dense", "config": {}}
    config["config"]["activation"] = {"module": "os", "class_name": "function", "config": "system"}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "os.system" in said
