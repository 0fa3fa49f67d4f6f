"""TensorFlow SavedModel: a saved_model.pb with the operations a genuine TF2 export holds (its V2
saver included) is clean; Python-calling and file operations are findings, in the graph and in its
library functions; a protobuf that breaks off is not clean. TensorFlow is not installed here (its
wheel is larger than everything else together), so the protobufs are written field by field with
the same numbering TensorFlow uses (saved_model.proto, meta_graph.proto, graph.proto, function.proto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainguard.findings import Verdict
from trainguard.scan import ScanOptions, scan_path


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _node(name: str, op: str) -> bytes:
    return _field(1, name.encode()) + _field(2, op.encode()) + _field(4, b"/device:CPU:0")


def _function(name: str, ops: list[str]) -> bytes:
    signature = _field(1, name.encode())
    return _field(1, signature) + b"".join(_field(3, _node(f"{op}_{i}", op)) for i, op in enumerate(ops))


GRAPH_OPS = ["Placeholder", "VarHandleOp", "ReadVariableOp", "StatefulPartitionedCall", "Const", "NoOp"]
SERVING_OPS = ["ReadVariableOp", "MatMul", "BiasAdd", "Relu", "Identity"]
SAVER_OPS = ["StringJoin", "ShardedFilename", "SaveV2", "MergeV2Checkpoints", "RestoreV2", "AssignVariableOp"]
SAVER_OPS += ["StaticRegexFullMatch", "Select", "Pack", "Identity"]


def _saved_model(graph_ops: list[str], functions: dict[str, list[str]]) -> bytes:
    library = b"".join(_field(1, _function(name, ops)) for name, ops in functions.items())
    graph = b"".join(_field(1, _node(f"n{i}", op)) for i, op in enumerate(graph_ops)) + _field(2, library)
    meta_info = _field(1, b"serve") + _field(4, b"2.16.1")
    meta_graph = _field(1, meta_info) + _field(2, graph)
    return _field(1, 1) + _field(2, meta_graph)


GENUINE = {"__inference_serving_1": SERVING_OPS, "__inference_save_2": SAVER_OPS}


def _result(path: Path) -> tuple[Verdict, str]:
    (result,) = scan_path(path, ScanOptions(jobs=1)).results
    said = " | ".join(
        [*(f"{f.rule}: {f.message}" for f in result.findings), *(p.message for p in result.problems)]
    )
    return result.verdict, said


def _write(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / "export"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(data)
    return folder / "saved_model.pb"


def test_a_genuine_savedmodel_is_clean(tmp_path: Path) -> None:
    path = _write(tmp_path, _saved_model(GRAPH_OPS, GENUINE))
    (result,) = scan_path(path, ScanOptions(jobs=1)).results
    assert result.verdict == Verdict.CLEAN, result
    assert "tf-savedmodel" in result.formats


@pytest.mark.parametrize(
    ("op", "rule"),
    [
        ("PyFunc", "tf-python-op"),
        ("EagerPyFunc", "tf-python-op"),
        ("ReadFile", "tf-file-op"),
        ("WriteFile", "tf-file-op"),
        ("ImmutableConst", "tf-file-op"),
        ("TextLineDataset", "tf-file-op"),
    ],
)
@pytest.mark.parametrize("where", ["graph", "function"])
def test_python_and_file_operations_are_findings(tmp_path: Path, op: str, rule: str, where: str) -> None:
    if where == "graph":
        data = _saved_model([*GRAPH_OPS, op], GENUINE)
    else:
        data = _saved_model(GRAPH_OPS, {**GENUINE, "__inference_evil_3": ["Const", op, "Identity"]})
    verdict, said = _result(_write(tmp_path, data))
    assert verdict == Verdict.FINDINGS, said
    assert rule in said and op in said


def test_a_savedmodel_cut_short_is_no_model_for_the_scanner_or_a_loader(tmp_path: Path) -> None:
    # A field that runs past the end: protobuf parsers refuse the whole message, so TensorFlow loads
    # nothing from it, and the scanner does not take it for a model either.
    data = _saved_model([*GRAPH_OPS, "PyFunc"], GENUINE)
    assert _result(_write(tmp_path, data[:-7]))[0] == Verdict.SKIPPED


def test_another_protobuf_is_not_taken_for_a_savedmodel(tmp_path: Path) -> None:
    # fingerprint.pb sits next to saved_model.pb: five varint fields, no graph.
    path = tmp_path / "fingerprint.pb"
    path.write_bytes(b"".join(_field(n, 12345 + n) for n in range(1, 6)))
    (result,) = scan_path(path, ScanOptions(jobs=1)).results
    assert result.verdict == Verdict.SKIPPED, result


def test_unknown_fields_do_not_hide_a_savedmodel(tmp_path: Path) -> None:
    # TensorFlow's parser keeps unknown fields and loads the rest; so must the recognition.
    group = _varint(99 << 3 | 3) + b"\x08\x01" + _varint(99 << 3 | 4)
    data = _field(9, b"tags") + group + _saved_model([*GRAPH_OPS, "PyFunc"], GENUINE)
    verdict, said = _result(_write(tmp_path, data))
    assert verdict == Verdict.FINDINGS and "PyFunc" in said


def test_an_onnx_graph_field_does_not_hide_a_savedmodel(tmp_path: Path) -> None:
    # Field 7 is ONNX's graph; to TensorFlow it is an unknown field. Read as both, neither hides the other.
    empty_graph = _field(2, b"g")  # a GraphProto with only a name
    data = _field(7, empty_graph) + _saved_model([*GRAPH_OPS, "PyFunc"], GENUINE)
    (result,) = scan_path(_write(tmp_path, data), ScanOptions(jobs=1)).results
    assert result.verdict == Verdict.FINDINGS, result
    assert {"onnx", "tf-savedmodel"} <= set(result.formats)
