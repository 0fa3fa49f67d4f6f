"""ONNX models: the protobuf read field by field (no onnx package), for what a runtime would reach.

An ONNX model holds no Python, but two things in it reach outside the file when it is loaded:

- operators in a domain that neither ONNX nor ONNX Runtime defines run code from a native library
  the loading program registers (custom-op libraries, ``org.pytorch.aten`` fallbacks, the Python
  operators of onnxruntime-extensions);
- a tensor stored as external data names a file that ``onnx.load`` reads next to the model; an
  absolute path or one with ``..`` reads any file the loader can (CVE-2024-27318, CVE-2024-27319),
  which then travels with the model's outputs.

Every graph is walked, subgraphs of control-flow operators (``If``, ``Loop``, ``Scan``) and the
model's local functions included. An operator a local function defines is allowed in that model.

A file is ONNX when its bytes parse completely as a protobuf whose top-level fields hold a graph
(field 7); protobuf fields may come in any order, so no fixed header is assumed.
"""

from __future__ import annotations

from trainguard.errors import LimitExceeded, MalformedArtifact
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.formats.protobuf import Field, Malformed, fields

# Domains ONNX and ONNX Runtime define (the empty string is ai.onnx).
_STANDARD_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.training",
        "ai.onnx.preview.training",
        "com.microsoft",
        "com.microsoft.nchwc",
        "com.microsoft.experimental",
        "com.ms.internal.nhwc",
    }
)
_MAX_DEPTH = 64
_MAX_FIELDS = 50_000_000  # protobuf fields walked in one model

# Which fields hold which messages: (message, field number) -> message.
_CHILDREN: dict[tuple[str, int], str] = {
    ("model", 7): "graph",
    ("model", 20): "training",
    ("model", 25): "function",
    ("training", 1): "graph",
    ("training", 2): "graph",
    ("graph", 1): "node",
    ("graph", 5): "tensor",
    ("graph", 15): "sparse",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor",
    ("attribute", 6): "graph",
    ("attribute", 10): "tensor",
    ("attribute", 11): "graph",
    ("attribute", 22): "sparse",
    ("attribute", 23): "sparse",
    ("sparse", 1): "tensor",
    ("sparse", 2): "tensor",
    ("tensor", 13): "entry",
    ("function", 7): "node",
}
_STRINGS = {
    ("node", 4): "op_type",
    ("node", 7): "domain",
    ("function", 1): "name",
    ("function", 10): "domain",
    ("entry", 1): "key",
    ("entry", 2): "value",
}


def looks_like_onnx(top: list[Field]) -> bool:
    """A protobuf (its top-level fields) with a graph (field 7) among them."""
    graph = [wire for number, wire, _, _ in top if number == 7]
    return bool(graph) and all(wire == 2 for wire in graph)


class _Walk:
    def __init__(self, scan: Scan, art: Artifact) -> None:
        self.scan = scan
        self.art = art
        self.data = memoryview(art.data)[art.start : art.end]
        self.fields = 0
        self.local_functions: set[tuple[str, str]] = set()
        self.custom: set[tuple[str, str]] = set()  # (domain, operator) outside the standard domains
        self.outside: list[str] = []

    def message(self, kind: str, start: int, end: int, depth: int) -> dict[str, str]:
        if depth > _MAX_DEPTH:
            raise LimitExceeded(f"{self.art.location}: ONNX graphs nested deeper than {_MAX_DEPTH}")
        strings: dict[str, str] = {}
        entries: list[dict[str, str]] = []
        location_is_external = False
        for number, wire, a, b in fields(self.data, start, end):
            self.fields += 1
            if self.fields > _MAX_FIELDS:
                raise LimitExceeded(f"{self.art.location}: more than {_MAX_FIELDS} protobuf fields")
            child = _CHILDREN.get((kind, number))
            if child is not None and wire == 2:
                found = self.message(child, a, b, depth + 1)
                if child == "entry":
                    entries.append(found)
            elif (kind, number) in _STRINGS and wire == 2:
                strings[_STRINGS[kind, number]] = bytes(self.data[a:b]).decode("utf-8", "replace")
            elif kind == "tensor" and number == 14 and wire == 0:
                location_is_external = a == 1
        if kind == "node" and strings.get("domain", "") not in _STANDARD_DOMAINS:
            self.custom.add((strings.get("domain", ""), strings.get("op_type", "")))
        elif kind == "function":
            self.local_functions.add((strings.get("domain", ""), strings.get("name", "")))
        elif kind == "tensor" and (entries or location_is_external):
            self._external(entries)
        return strings

    def _external(self, entries: list[dict[str, str]]) -> None:
        locations = [e.get("value", "") for e in entries if e.get("key") == "location"]
        if not locations:
            self.outside.append("(external data with no location)")
        for location in locations:
            parts = location.replace("\\", "/").split("/")
            if not location or location.startswith(("/", "\\")) or ".." in parts or "\0" in location:
                self.outside.append(location)
            elif len(location) > 1 and location[1] == ":":
                self.outside.append(location)  # a Windows drive


def scan_onnx(scan: Scan, art: Artifact) -> None:
    scan.label("onnx")
    walk = _Walk(scan, art)
    try:
        walk.message("model", 0, len(walk.data), 0)
    except Malformed as exc:
        raise MalformedArtifact(f"{art.location}: ONNX protobuf is malformed ({exc})") from None
    # An operator that one of the model's own functions defines runs that function's nodes, which
    # were judged themselves.
    for domain, op_type in sorted(walk.custom - walk.local_functions):
        scan.add(
            "onnx-custom-operator",
            Severity.HIGH,
            f"ONNX operator {op_type!r} in domain {domain!r}: neither ONNX nor ONNX Runtime defines it; it"
            " runs code from a native library the loading program registers",
            art.location,
        )
    for location in sorted(set(walk.outside)):
        scan.add(
            "onnx-external-data",
            Severity.CRITICAL,
            f"ONNX tensor stored as external data at {location!r}: outside the model's folder, so loading"
            " reads any file the loader can (CVE-2024-27318)",
            art.location,
        )
