"""ONNX models: genuine ones built with the real `onnx` package are clean (control flow, local
functions, ONNX Runtime's own operators and external data beside the model included); operators
from outside ONNX and ONNX Runtime, and external data that leaves the model's folder, are findings,
in subgraphs and functions too; a protobuf that breaks off is undecided. ONNX has no magic bytes:
a model is recognised by parsing, whatever order its fields come in."""

from __future__ import annotations

import pickletools
from pathlib import Path
from typing import Any

import pytest

from trainguard.findings import Verdict
from trainguard.scan import ScanOptions, scan_path

onnx = pytest.importorskip("onnx")
np = pytest.importorskip("numpy")
helper, numpy_helper, TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto


def _result(path: Path) -> tuple[Verdict, str]:
    (result,) = scan_path(path, ScanOptions(jobs=1)).results
    said = " | ".join(
        [*(f"{f.rule}: {f.message}" for f in result.findings), *(p.message for p in result.problems)]
    )
    return result.verdict, said


def _mlp_nodes(extra: list[Any] | None = None) -> list[Any]:
    return [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
        *(extra or []),
    ]


def _model(nodes: list[Any], *, functions: list[Any] | None = None, opsets: list[Any] | None = None) -> Any:
    weights = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(3, dtype=np.float32), "b")
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [weights, bias],
    )
    imports = opsets or [helper.make_opsetid("", 17)]
    return helper.make_model(graph, opset_imports=imports, functions=functions or [], producer_name="tests")


def _if_node(branch_node: Any) -> Any:
    def branch(name: str, node: Any) -> Any:
        return helper.make_graph(
            [node], name, [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3])]
        )

    return helper.make_node(
        "If",
        ["cond"],
        ["out"],
        then_branch=branch("then", branch_node),
        else_branch=branch("else", helper.make_node("Identity", ["y"], ["z"])),
    )


def _true(name: str) -> Any:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(True)))


def _save(model: Any, path: Path, **kwargs: Any) -> Path:
    if kwargs:
        onnx.save_model(model, str(path), **kwargs)
    else:  # the bytes as they are: save_model would follow (and refuse) hostile external data itself
        path.write_bytes(model.SerializeToString())
    return path


def _local_function() -> Any:
    return helper.make_function(
        "my.functions",
        "Swish",
        ["t"],
        ["u"],
        [helper.make_node("Sigmoid", ["t"], ["s"]), helper.make_node("Mul", ["t", "s"], ["u"])],
        [helper.make_opsetid("", 17)],
    )


# --- genuine ---------------------------------------------------------------------------------

GENUINE = {
    "mlp": lambda: _model(_mlp_nodes()),
    "control-flow": lambda: _model(
        _mlp_nodes([_true("cond"), _if_node(helper.make_node("Sigmoid", ["y"], ["z"]))])
    ),
    "onnxruntime-contrib-op": lambda: _model(
        _mlp_nodes([helper.make_node("Gelu", ["y"], ["g"], domain="com.microsoft")]),
        opsets=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    ),
    "local-function": lambda: _model(
        _mlp_nodes([helper.make_node("Swish", ["y"], ["sw"], domain="my.functions")]),
        functions=[_local_function()],
        opsets=[helper.make_opsetid("", 17), helper.make_opsetid("my.functions", 1)],
    ),
}


@pytest.mark.parametrize("name", list(GENUINE))
def test_a_genuine_onnx_model_is_clean(tmp_path: Path, name: str) -> None:
    model = GENUINE[name]()
    onnx.checker.check_model(model)
    path = _save(model, tmp_path / f"{name}.onnx")
    assert _result(path) == (Verdict.CLEAN, "")


def test_external_data_beside_the_model_is_clean(tmp_path: Path) -> None:
    path = _save(
        _model(_mlp_nodes()),
        tmp_path / "external.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (tmp_path / "weights.bin").exists()
    assert _result(path) == (Verdict.CLEAN, "")


def test_a_model_is_recognised_whatever_the_order_of_its_fields(tmp_path: Path) -> None:
    model = _model(_mlp_nodes([helper.make_node("Evil", ["y"], ["e"], domain="evil.ops")]))
    data = model.SerializeToString()
    graph = model.graph.SerializeToString()
    # The graph first (field 7), then the rest: onnx.load reads it the same.
    tag = bytes([7 << 3 | 2])
    length = _varint(len(graph))
    reordered = tag + length + graph + data.replace(tag + length + graph, b"")
    assert onnx.load_model_from_string(reordered).graph.node[-1].op_type == "Evil"
    path = tmp_path / "reordered.bin"
    path.write_bytes(reordered)
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "evil.ops" in said


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --- hostile ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["graph", "subgraph", "function"],
)
def test_an_operator_from_outside_onnx_is_a_finding_wherever_it_is(tmp_path: Path, where: str) -> None:
    evil = helper.make_node("PyOp", ["y"], ["z"], domain="ai.onnx.contrib")
    if where == "graph":
        model = _model(_mlp_nodes([evil]))
    elif where == "subgraph":
        model = _model(_mlp_nodes([_if_node(evil)]))
    else:
        function = helper.make_function(
            "my.functions", "Swish", ["t"], ["u"], [evil], [helper.make_opsetid("", 17)]
        )
        model = _model(
            _mlp_nodes([helper.make_node("Swish", ["y"], ["sw"], domain="my.functions")]),
            functions=[function],
        )
    verdict, said = _result(_save(model, tmp_path / "model.onnx"))
    assert verdict == Verdict.FINDINGS, said
    assert "onnx-custom-operator" in said and "ai.onnx.contrib" in said


def test_a_function_name_does_not_cover_other_operators_of_its_domain(tmp_path: Path) -> None:
    model = _model(
        _mlp_nodes([helper.make_node("Other", ["y"], ["o"], domain="my.functions")]),
        functions=[_local_function()],
    )
    verdict, said = _result(_save(model, tmp_path / "model.onnx"))
    assert verdict == Verdict.FINDINGS and "'Other'" in said


def _external(model: Any, location: str) -> Any:
    tensor = model.graph.initializer[0]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return model


@pytest.mark.parametrize(
    "location", ["../../etc/passwd", "/etc/passwd", "sub/../../secret", "C:/Windows/win.ini", ""]
)
def test_external_data_outside_the_models_folder_is_critical(tmp_path: Path, location: str) -> None:
    verdict, said = _result(_save(_external(_model(_mlp_nodes()), location), tmp_path / "model.onnx"))
    assert verdict == Verdict.FINDINGS, said
    assert "onnx-external-data" in said


def test_external_data_in_a_subgraph_tensor_is_checked(tmp_path: Path) -> None:
    constant = helper.make_node(
        "Constant", [], ["z"], value=numpy_helper.from_array(np.ones(3, dtype=np.float32))
    )
    model = _model(_mlp_nodes([_if_node(constant)]))
    (then,) = [a for a in model.graph.node[-1].attribute if a.name == "then_branch"]
    tensor = then.g.node[0].attribute[0].t
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../etc/shadow"
    verdict, said = _result(_save(model, tmp_path / "model.onnx"))
    assert verdict == Verdict.FINDINGS and "etc/shadow" in said


def test_a_model_cut_short_is_no_model_for_the_scanner_or_onnx(tmp_path: Path) -> None:
    data = _model(_mlp_nodes([helper.make_node("PyOp", ["y"], ["z"], domain="evil")])).SerializeToString()
    cut = data[: len(data) - 5]
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError, whatever module it lives in
        onnx.load_model_from_string(cut)
    path = tmp_path / "cut.onnx"
    path.write_bytes(cut)
    assert _result(path)[0] == Verdict.SKIPPED


def test_a_pickle_that_is_also_a_whole_onnx_model_is_analysed_as_both(tmp_path: Path) -> None:
    # A benign pickle that protobuf reads as two unknown fields (32, a varint; 9, eight fixed bytes that
    # hold the pickle's end), then an ONNX model with a foreign operator: pickle.load sees 1, ONNX
    # runtimes see the model.
    model = _model(_mlp_nodes([helper.make_node("PyOp", ["y"], ["z"], domain="ai.onnx.contrib")]))
    data = b"\x80\x02NI1\n." + bytes(5) + model.SerializeToString()
    assert [op.name for op, _, _ in pickletools.genops(data)] == ["PROTO", "NONE", "INT", "STOP"]
    assert onnx.load_model_from_string(data).graph.node[-1].op_type == "PyOp"
    path = tmp_path / "both.pkl"
    path.write_bytes(data)
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "onnx-custom-operator" in said


def test_an_unknown_group_field_does_not_hide_the_model(tmp_path: Path) -> None:
    # Protobuf parsers keep a group (wire types 3 and 4) as an unknown field and load the rest.
    model = _model(_mlp_nodes([helper.make_node("PyOp", ["y"], ["z"], domain="ai.onnx.contrib")]))
    group = _varint(99 << 3 | 3) + b"\x08\x01" + _varint(99 << 3 | 4)  # field 99: a group holding 1=1
    data = group + model.SerializeToString()
    assert onnx.load_model_from_string(data).graph.node[-1].op_type == "PyOp"
    path = tmp_path / "grouped.onnx"
    path.write_bytes(data)
    verdict, said = _result(path)
    assert verdict == Verdict.FINDINGS and "onnx-custom-operator" in said
