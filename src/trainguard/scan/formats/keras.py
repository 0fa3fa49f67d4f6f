"""Keras v3 archives (``.keras``): the model config that ``keras.models.load_model`` deserialises.

Loading a ``.keras`` file rebuilds every object its ``config.json`` describes. Each description
names a ``module`` that Keras imports and a ``class_name`` (or, for functions, a ``config`` name)
that it looks up there and calls: a module outside Keras is an import of anything (CVE-2025-1550).
A ``Lambda`` layer's function is marshalled Python bytecode (``__lambda__``), run when
``safe_mode=False`` and by Keras releases before safe mode existed. ``TFOpLambda`` calls a
TensorFlow function by name. Each of these is a finding; objects found only through the loader's
own registry (``registered_name`` with no module) run only code the loading program registered.

The archive's ``model.weights.h5`` is read by Keras as datasets only (no config is taken from it);
it is labelled, not analysed. An HDF5 file on its own stays undecided (see `dispatch`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from trainguard.errors import LimitExceeded, UndecidableError
from trainguard.findings import Severity
from trainguard.scan.artifact import Artifact, Scan
from trainguard.scan.denylist import is_critical
from trainguard.scan.policy import Policy

_KERAS_PACKAGES = frozenset({"keras", "keras_hub", "keras_nlp", "keras_cv", "tf_keras"})
# TensorFlow namespaces of TFOpLambda layers that only compute.
_TF_MATH = ("math.", "nn.", "linalg.", "__operators__.", "compat.v1.math.", "image.", "signal.")
# Keras modules whose functions touch files, the network, models or safe mode, and such functions.
_KERAS_UNSAFE_MODULES = frozenset({"config", "utils", "file_utils", "io_utils", "saving", "models", "export"})
_KERAS_UNSAFE_FUNCTIONS = frozenset(
    {"enable_unsafe_deserialization", "get_file", "load_model", "save_model", "load_weights", "save_weights"}
)
_MAX_CONFIG = 64 << 20
_MAX_DEPTH = 200


def is_keras_archive(names: set[str]) -> bool:
    """Keras's loader reads config.json at the archive's root and deserialises it before it looks at
    anything else, so that alone makes a Keras archive."""
    return "config.json" in names


def scan_keras_config(scan: Scan, art: Artifact) -> None:
    if art.size > _MAX_CONFIG:
        raise LimitExceeded(f"{art.location}: a Keras config of {art.size} bytes (limit {_MAX_CONFIG})")
    judge_keras_config(scan, bytes(art.data[art.start : art.end]), art.location)


def judge_keras_config(scan: Scan, raw: bytes, location: str) -> None:
    """Findings for a Keras model config (JSON), from a .keras archive or a legacy HDF5 model."""
    scan.label("keras")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UndecidableError(f"{location}: Keras config that does not parse ({exc})") from None
    seen: set[str] = set()
    for severity, rule, message in _judge(config, scan.policy):
        if message not in seen:
            seen.add(message)
            scan.add(rule, severity, message, location)


def _objects(node: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    if depth > _MAX_DEPTH:
        raise UndecidableError(f"Keras config nested deeper than {_MAX_DEPTH}")
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value, depth + 1)


def _judge(config: Any, policy: Policy) -> Iterator[tuple[Severity, str, str]]:
    for obj in _objects(config):
        class_name = obj.get("class_name")
        module = obj.get("module")
        if class_name == "__lambda__" or (class_name == "Lambda" and _has_bytecode(obj)):
            yield (
                Severity.CRITICAL,
                "keras-lambda",
                "Keras Lambda layer with marshalled Python bytecode: load_model runs it with safe_mode=False"
                " and in Keras releases before safe mode",
            )
        if (
            class_name == "function"
            and isinstance(module, str)
            and _reaches_outside(module, obj.get("config"))
        ):
            yield (
                Severity.CRITICAL,
                "keras-import",
                f"Keras config calls {module}.{obj.get('config')}, a Keras function that loads, saves,"
                " fetches or turns safe mode off (CVE-2025-8747, CVE-2025-9906)",
            )
        if isinstance(module, str) and module.split(".", 1)[0] not in _KERAS_PACKAGES:
            name = str(obj.get("config") if class_name == "function" else class_name)
            if policy.allows(module, name):
                continue
            # As for a pickle's imports: the target decides, never the config's other fields (a
            # registered_name is the attacker's to write too).
            if is_critical(module, name):
                yield (
                    Severity.CRITICAL,
                    "keras-import",
                    f"Keras config imports {module}.{name}: Keras before 3.9 imports any module a config"
                    " names and calls what it finds there",
                )
            else:
                yield (
                    Severity.HIGH,
                    "keras-import",
                    f"Keras config imports {module}.{name}, not on the allowlist (Keras before 3.9 imports"
                    f" it; later ones find only registered objects); if it is yours, allow it with --allow"
                    f" {module}.{name}",
                )
        elif module is not None and not isinstance(module, str):
            yield (
                Severity.HIGH,
                "keras-import",
                f"Keras config names a module that is not a string: {module!r}",
            )
        if class_name == "TFOpLambda":
            function = str((obj.get("config") or {}).get("function", ""))
            if not function.startswith(_TF_MATH):
                yield (
                    Severity.HIGH,
                    "keras-tf-op",
                    f"Keras TFOpLambda layer calls tf.{function}, outside TensorFlow's maths",
                )


def _reaches_outside(module: str, name: object) -> bool:
    """A function of Keras itself that a config must not call: Keras's own file, network and
    safe-mode functions are importable from its modules like any activation."""
    parts = set(module.split("."))
    return bool(parts & _KERAS_UNSAFE_MODULES) or name in _KERAS_UNSAFE_FUNCTIONS


def _has_bytecode(obj: dict[str, Any]) -> bool:
    """A Lambda whose function is serialised code (not a registered function's name)."""
    function = (obj.get("config") or {}).get("function")
    if isinstance(function, dict):
        return function.get("class_name") == "__lambda__" or "code" in (function.get("config") or {})
    return isinstance(function, list | tuple)  # Keras 2: (base64 bytecode, defaults, closure)
