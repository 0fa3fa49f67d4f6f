"""TensorFlow SavedModel (``saved_model.pb``): every operation of every graph and graph function,
read from the protobuf without TensorFlow.

Loading a SavedModel runs its graphs (restore, then whatever a signature calls). Most operations only
compute, but some call back into Python or reach the file system, and a graph can name them as
easily as ``MatMul``:

- ``PyFunc``, ``PyFuncStateless`` and ``EagerPyFunc`` call a Python function of the loading process;
- file operations read or write any path the graph gives them (``ReadFile``, ``WriteFile``,
  ``MatchingFiles``, ``ImmutableConst``, the V1 ``Save``/``Restore`` ops, dataset readers and
  writers, summary writers, debug dumps).

The V2 saver that every SavedModel carries (``SaveV2``, ``RestoreV2``, ``MergeV2Checkpoints``) is
not reported: its paths come from the loader. Where a graph wires a constant path into it instead,
this reading does not see it (see the README's limits).

Layout: SavedModel {1: schema version, 2: MetaGraphDef}; MetaGraphDef {2: GraphDef}; GraphDef
{1: NodeDef, 2: FunctionDefLibrary}; FunctionDefLibrary {1: FunctionDef}; FunctionDef
{3: NodeDef}; NodeDef {1: name, 2: op}.
"""

from __future__ import annotations

from trainguard.errors import LimitExceeded, MalformedArtifact
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.formats.protobuf import Field, Malformed, fields

_PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
_FILE_OPS = frozenset(
    {
        "ReadFile",
        "WriteFile",
        "MatchingFiles",
        "ImmutableConst",
        "Save",
        "SaveSlices",
        "Restore",
        "RestoreSlice",
        "LoadAndRemapMatrix",
        "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2",
        "TFRecordDataset",
        "TFRecordDatasetV2",
        "TextLineDataset",
        "DatasetToTFRecord",
        "ExperimentalDatasetToTFRecord",
        "CreateSummaryFileWriter",
        "CreateSummaryDbWriter",
        "DebugIdentity",
        "DebugIdentityV2",
        "DebugNanCount",
        "DebugNumericSummary",
        "DebugNumericSummaryV2",
        "SnapshotDataset",
        "SaveDataset",
        "LoadDataset",
    }
)
_CHILDREN = {
    ("saved_model", 2): "meta_graph",
    ("meta_graph", 2): "graph",
    ("graph", 1): "node",
    ("graph", 2): "library",
    ("library", 1): "function",
    ("function", 3): "node",
}
_MAX_FIELDS = 50_000_000


def looks_like_savedmodel(art: Artifact, top: list[Field]) -> bool:
    """A protobuf (its top-level fields) whose field 1 (if any) is a varint and whose MetaGraphDef
    (field 2) holds a graph. Unknown fields are tolerated, as TensorFlow's parser keeps them."""
    if any(number in (1, 2) and (number, wire) not in ((1, 0), (2, 2)) for number, wire, _, _ in top):
        return False  # a known field of the wrong kind: TensorFlow refuses the file
    data = memoryview(art.data)[art.start : art.end]
    try:
        return any(
            any((n, w) == (2, 2) for n, w, _, _ in fields(data, a, b))
            for number, _, a, b in top
            if number == 2
        )
    except Malformed:
        return False


def scan_savedmodel(scan: Scan, art: Artifact) -> None:
    scan.label("tf-savedmodel")
    data = memoryview(art.data)[art.start : art.end]
    found: dict[str, set[str]] = {}
    count = 0

    def walk(kind: str, start: int, end: int) -> None:
        nonlocal count
        for number, wire, a, b in fields(data, start, end):
            count += 1
            if count > _MAX_FIELDS:
                raise LimitExceeded(f"{art.location}: more than {_MAX_FIELDS} protobuf fields")
            child = _CHILDREN.get((kind, number))
            if child is not None and wire == 2:
                walk(child, a, b)
            elif kind == "node" and number == 2 and wire == 2:
                op = bytes(data[a:b]).decode("utf-8", "replace")
                if op in _PYTHON_OPS or op in _FILE_OPS:
                    found.setdefault(op, set())

    try:
        walk("saved_model", 0, len(data))
    except Malformed as exc:
        raise MalformedArtifact(f"{art.location}: SavedModel protobuf is malformed ({exc})") from None
    for op in sorted(found):
        if op in _PYTHON_OPS:
            scan.add(
                "tf-python-op",
                Severity.CRITICAL,
                f"TensorFlow graph calls {op}: a Python function of the loading process",
                art.location,
            )
        else:
            scan.add(
                "tf-file-op",
                Severity.HIGH,
                f"TensorFlow graph uses {op}, which reads or writes files at paths the graph chooses",
                art.location,
            )
