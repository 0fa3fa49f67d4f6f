"""TorchScript archives: the code that torch.jit.load compiles, read with `ast` and never run.

A TorchScript archive (``torch.jit.save``) holds pickles and ``code/**/*.py``. torch.jit.load
compiles that code with TorchScript's own compiler, which reaches Python nothing: only operators
registered in the process, the TorchScript classes the archive defines, and custom classes that
native libraries registered. Its pickles are read by a C++ unpickler that resolves only those
classes and a handful of ``torch.jit._pickle`` helpers. Code runs at load time too (a class's
``__setstate__``), so what the code can reach is what matters:

- operators that touch files (``aten::save`` writes any path, ``aten::from_file`` maps any file,
  ``debugprims::load_tensor`` reads one) are findings;
- operators outside the namespaces torch itself defines for tensor maths (custom operators come
  from native libraries; ``c10d`` reaches the network) and custom classes from outside torch are
  findings;
- Python builtins that TorchScript does not have (``eval``, ``open``...) are findings: no compiler
  wrote them.

The classes the code defines are then allowed in the archive's pickles, where they are defined.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable

from trainguard.errors import LimitExceeded, UndecidableError
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan

# Namespaces torch registers for tensor maths; anything else is a library's or reaches outside.
_MATH_NAMESPACES = frozenset(
    {
        "aten",
        "prim",
        "prims",
        "quantized",
        "_quantized",
        "sparse",
        "mkldnn",
        "mkl",
        "onednn",
        "mkldnn_prepacked",
        "quantization",
    }
)
# Operators inside those namespaces that reach the file system.
_FILE_OPERATORS = frozenset({"save", "from_file", "_load", "load"})
# Custom classes torch itself registers (packed weights of quantized and XNNPACK layers).
_TORCH_CLASS_NAMESPACES = frozenset({"quantized", "rnn", "xnnpack", "sparse", "mkldnn", "onednn"})
# Python builtins that TorchScript has no equivalent for: no serializer writes them.
_NOT_TORCHSCRIPT = frozenset(
    {"__import__", "eval", "exec", "compile", "open", "globals", "locals", "vars", "breakpoint", "input"}
)
# Helpers of ScriptModule.save()'s pickles: each returns its argument (torch/jit/_pickle.py).
JIT_PICKLE_HELPERS = {
    f"torch.jit._pickle.{name}": "TorchScript pickle helper; returns its argument unchanged"
    for name in (
        "build_intlist",
        "build_tensorlist",
        "build_doublelist",
        "build_boollist",
        "build_tensor_from_id",
        "restore_type_tag",
    )
}
# Bounds on what is parsed: serialized TorchScript is a few MB even for large models.
MAX_CODE_BYTES = 64 << 20


@dataclasses.dataclass
class ScriptCode:
    """What an archive's code defines: the names its pickles may use."""

    classes: set[str] = dataclasses.field(default_factory=set)

    def allowed(self) -> dict[str, str]:
        allowed = dict(JIT_PICKLE_HELPERS)
        for name in sorted(self.classes):
            allowed[name] = "a TorchScript class defined in this archive's code/"
        for namespace in sorted(_TORCH_CLASS_NAMESPACES):
            # Only torch.jit.load resolves these (Python cannot import __torch__): C++ classes of torch.
            allowed[f"__torch__.torch.classes.{namespace}.*"] = "a custom class torch itself registers"
        return allowed


def module_of(member: str, root: str) -> str | None:
    """``root/code/__torch__/a/b.py`` defines module ``__torch__.a.b``; None for other members."""
    prefix = f"{root}/code/"
    if not member.startswith(prefix) or not member.endswith(".py"):
        return None
    parts = member[len(prefix) : -3].split("/")
    # Always under __torch__: a class it defines must never be allowed under another module's name
    # (a code/os.py defining `system` would otherwise allow os.system in the pickles).
    if parts[0] != "__torch__" or not all(p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def analyse_code(scan: Scan, members: Iterable[tuple[str, Artifact]], root: str) -> ScriptCode:
    """Parse every code member, report what it reaches, and return the classes it defines."""
    code = ScriptCode()
    total = 0
    for name, art in members:
        module = module_of(name, root)
        if module is None:
            raise UndecidableError(f"{art.location}: TorchScript code file with a name torch would not write")
        total += art.size
        if total > MAX_CODE_BYTES:
            raise LimitExceeded(
                f"{art.location}: TorchScript code past {MAX_CODE_BYTES} bytes in one archive"
            )
        raw = bytes(art.data[art.start : art.end])
        try:
            tree = ast.parse(raw.decode("utf-8"), filename=name)
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError, MemoryError) as exc:
            raise UndecidableError(f"{art.location}: TorchScript code that does not parse ({exc})") from None
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                code.classes.add(f"{module}.{node.name}")
        _Reach(scan, art).visit(tree)
    return code


class _Reach(ast.NodeVisitor):
    """Reports the operators, classes and builtins that code refers to and must not."""

    def __init__(self, scan: Scan, art: Artifact) -> None:
        self.scan = scan
        self.art = art
        self.seen: set[str] = set()

    def _report(self, severity: Severity, rule: str, what: str, message: str) -> None:
        if what in self.seen:
            return
        self.seen.add(what)
        self.scan.add(rule, severity, f"TorchScript code {message}", self.art.location)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node)
        if dotted is None:
            self.generic_visit(node)
            return
        self._judge(dotted)
        # The chain's prefixes are judged as one name; only its non-name parts need a visit.

    def visit_Import(self, node: ast.Import) -> None:
        names = ", ".join(a.name for a in node.names)
        self._report(Severity.HIGH, "torchscript-code", f"import {names}", f"imports {names}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._report(Severity.HIGH, "torchscript-code", f"from {node.module}", f"imports from {node.module}")

    def visit_Call(self, node: ast.Call) -> None:
        # Only a call: `input` and `open` are also ordinary parameter names in serialized code.
        if isinstance(node.func, ast.Name) and node.func.id in _NOT_TORCHSCRIPT:
            self._report(Severity.HIGH, "torchscript-code", node.func.id, f"calls Python's {node.func.id}()")
        self.generic_visit(node)

    def _judge(self, dotted: str) -> None:
        parts = dotted.split(".")
        if parts[0] == "__torch__" and parts[1:3] == ["torch", "classes"]:
            parts = parts[1:]
        if parts[0] == "torch" and len(parts) >= 2:
            if any(p in _FILE_OPERATORS for p in parts[1:]):
                self._report(Severity.CRITICAL, "torchscript-file-access", dotted, f"reaches files: {dotted}")
            elif parts[1] == "ops" and len(parts) >= 3:
                self._operator(parts[2], parts[3] if len(parts) >= 4 else "", dotted)
            elif parts[1] == "classes" and len(parts) >= 3 and parts[2] not in _TORCH_CLASS_NAMESPACES:
                self._report(
                    Severity.HIGH,
                    "torchscript-custom-class",
                    dotted,
                    f"uses {dotted}, a class a native library registers (it must be loaded first)",
                )
            elif parts[1] == "distributed":
                self._report(Severity.HIGH, "torchscript-network", dotted, f"reaches the network: {dotted}")
        elif parts[0] == "ops" and len(parts) >= 2:
            self._operator(parts[1], parts[2] if len(parts) >= 3 else "", dotted)

    def _operator(self, namespace: str, name: str, dotted: str) -> None:
        if namespace not in _MATH_NAMESPACES:
            self._report(
                Severity.HIGH,
                "torchscript-custom-operator",
                dotted,
                f"calls {dotted}: operator namespace {namespace!r} is not torch's tensor maths (a native"
                " library's, or one that reaches files, processes or the network)",
            )
        elif name in _FILE_OPERATORS:
            self._report(Severity.CRITICAL, "torchscript-file-access", dotted, f"reaches files: {dotted}")


def _dotted(node: ast.Attribute) -> str | None:
    parts: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        return None
    parts.append(current.id)
    return ".".join(reversed(parts))
