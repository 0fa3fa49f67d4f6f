"""Seeded generation of hostile model files, by mutating genuine ones that the real libraries write.

Genuine carriers (plain pickles of every protocol, ``torch.save`` archives old and new, ``.npy`` and
``.npz`` object arrays, ``joblib`` files plain and compressed) are written by torch, NumPy and joblib.
Each sample takes one carrier and changes one of its pickle streams in a way an attacker who reads
the scanner would: a value replaced by an import-and-call written one of many ways, a call slipped
in and popped, a pickle appended after the end, a limit reached first, frames made to lie, bytes
flipped. The stream is then put back where it came from (re-zipped, re-compressed, behind its
header), so the file is as close as possible to one a loader accepts.

Nothing here loads anything: streams are parsed with ``pickletools.genops`` only. Payloads only echo
a marker.
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import datetime
import gzip
import io
import lzma
import pickle
import pickletools
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from tests.attacks._payloads import (
    CMD,
    PY_PAYLOAD,
    binstring,
    binunicode,
    binunicode8,
    short_binstring,
    u,
    unicode0,
)

# What a hostile stream imports: never on the allowlist, each reaching code, files or a process.
_TARGETS: list[tuple[str, str, str]] = [
    ("os", "system", CMD),
    ("posix", "system", CMD),
    ("subprocess", "check_output", CMD),
    ("builtins", "eval", PY_PAYLOAD),
    ("builtins", "exec", PY_PAYLOAD),
    ("builtins", "getattr", "system"),
    ("runpy", "_run_code", PY_PAYLOAD),
    ("pydoc", "locate", "os.system"),
    ("importlib", "import_module", "os"),
    ("pickle", "loads", "x"),
    ("torch", "load", "x"),
    ("torch.serialization", "load", "x"),
    ("numpy", "load", "x"),
    ("functools", "partial", "x"),
    ("joblib", "load", "x"),
    ("collections", "OrderedDict.fromkeys", "x"),  # a dotted name reached from an allowed class
    ("torch", "Tensor.register_hook", "x"),
    ("numpy", "ndarray.tofile", "x"),
]

# Opcodes that take nothing from the stack and push one value: each can be swapped for a gadget.
_PUSHES_ONE = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT", "EMPTY_LIST",
    "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET", "NONE", "NEWTRUE", "NEWFALSE", "GET", "BINGET",
    "LONG_BINGET",
}  # fmt: skip


def _string0(s: str) -> bytes:
    """Protocol 0 STRING quoted as repr() quotes it: unlike `_payloads.string0`, any quotes inside."""
    return b"S" + repr(s).encode() + b"\n"


_STRINGS: list[Callable[[str], bytes]] = [
    u,
    binunicode,
    binunicode8,
    unicode0,
    _string0,
    binstring,
    short_binstring,
]


def _push_global(rng: random.Random, module: str, name: str) -> bytes:
    """The callable ``module.name`` on the stack, written one of the ways both unpicklers accept."""
    form = rng.randrange(4)
    if form == 0:
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    push = rng.choice(_STRINGS)
    if form == 1:
        return push(module) + push(name) + b"\x93"
    # Through the memo, at slots far above any a carrier uses (no MEMOIZE: it would shift theirs).
    slot = rng.randrange(60_000, 1 << 20)
    if form == 2:
        index = struct.pack("<I", slot)
        return push(module) + b"r" + index + b"0j" + index + push(name) + b"\x93"
    return push(name) + b"p%d\n0" % slot + push(module) + b"g%d\n\x93" % slot


def gadget(rng: random.Random) -> bytes:
    """Opcodes that resolve a non-allowlisted callable (and mostly call it), leaving one value."""
    module, name, argument = rng.choice(_TARGETS)
    arg = rng.choice(_STRINGS[:4])(argument)
    form = rng.randrange(7)
    if form == 0:  # INST: import and call in one opcode
        return b"(" + arg + b"i" + module.encode() + b"\n" + name.encode() + b"\n"
    if form == 1:  # OBJ
        return b"(" + _push_global(rng, module, name) + arg + b"o"
    pushed = _push_global(rng, module, name)
    if form == 2:
        return pushed  # imported, not called: the import alone runs module code
    if form == 3:
        return pushed + arg + b"\x85R"  # TUPLE1 REDUCE
    if form == 4:
        return pushed + b"(" + arg + b"tR"  # MARK ... TUPLE REDUCE
    if form == 5:
        return pushed + b")\x81"  # EMPTY_TUPLE NEWOBJ
    inner = b"\x80\x04" + _push_global(rng, module, name) + arg + b"\x85R."
    outer = _push_global(rng, "pickle", "loads")
    return outer + b"C" + bytes([len(inner)]) + inner + b"\x85R"  # a pickle inside a pickle


def hostile_pickle(rng: random.Random) -> bytes:
    return b"\x80" + bytes([rng.randrange(2, 6)]) + gadget(rng) + b"."


# --- parsing ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    start: int
    end: int


def _ops(stream: bytes) -> list[_Op]:
    """The opcodes that parse, each with its byte range; parsing stops at the first that does not."""
    found: list[_Op] = []
    reader = io.BytesIO(stream)
    try:
        for op, _arg, pos in pickletools.genops(reader):
            # genops has read the opcode and its argument when it yields: tell() is where it ends.
            found.append(_Op(op.name, pos if pos is not None else 0, reader.tell()))
            if op.name == "STOP":
                break
    except Exception:  # a carrier's stream may end in raw array bytes
        pass
    return found


def _end_of_pickle(data: bytes, start: int) -> int:
    """Where the pickle that starts at ``start`` ends (after its STOP), or -1 when it does not parse."""
    reader = io.BytesIO(data)
    reader.seek(start)
    try:
        for op, _arg, _pos in pickletools.genops(reader):
            if op.name == "STOP":
                return reader.tell()
    except Exception:  # not a pickle from here on
        return -1
    return -1


def _reframed(stream: bytes) -> bytes:
    """The stream without its FRAME opcodes, and (protocol 4+) one honest frame around all of it."""
    ops = _ops(stream)
    parts: list[bytes] = []
    last = 0
    for op in ops:
        if op.name == "FRAME":
            parts.append(stream[last : op.start])
            last = op.end
    parts.append(stream[last:])
    body = b"".join(parts)
    if body[:1] == b"\x80" and body[1:2] >= b"\x04":
        return body[:2] + b"\x95" + struct.pack("<Q", len(body) - 2) + body[2:]
    return body


def _splice(stream: bytes, start: int, end: int, new: bytes) -> bytes:
    """``stream[start:end]`` replaced by ``new``, the covering frame (see `_reframed`) kept honest."""
    out = stream[:start] + new + stream[end:]
    if stream[2:3] == b"\x95" and start >= 11:
        declared = struct.unpack("<Q", stream[3:11])[0] + len(new) - (end - start)
        out = out[:3] + struct.pack("<Q", declared) + out[11:]
    return out


def _boundary(rng: random.Random, stream: bytes) -> int:
    """The start of a random opcode after the header (PROTO and the covering frame)."""
    ops = [op for op in _ops(stream) if op.name not in ("PROTO", "FRAME")]
    return rng.choice(ops).start if ops else len(stream)


# --- mutations of one stream ----------------------------------------------------------------


def _replace_value(rng: random.Random, stream: bytes) -> bytes:
    candidates = [op for op in _ops(stream) if op.name in _PUSHES_ONE]
    if not candidates:
        return _insert_popped(rng, stream)
    op = rng.choice(candidates)
    return _splice(stream, op.start, op.end, gadget(rng))


def _insert_popped(rng: random.Random, stream: bytes) -> bytes:
    at = _boundary(rng, stream)
    return _splice(stream, at, at, gadget(rng) + b"0")


def _limit_first(rng: random.Random, stream: bytes) -> bytes:
    """A gadget placed after something that makes a scanner give up or fall behind."""
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.choice([1_000, 100_001])
        lead = b"(" * n + b"1" * n  # MARK ... POP_MARK, many at once
    elif kind == 1:
        lead = b"S'" + b"a" * rng.choice([1 << 19, (1 << 20) + 1]) + b"'\n0"  # a very long line
    elif kind == 2:
        n = rng.choice([1_000, 100_001])
        lead = b"]" * n + b"a" * (n - 1) + b"0"  # deep nesting
    else:
        n = rng.choice([1_000, 1_000_001])
        lead = b"N" * n + b"0" * n  # a deep stack
    at = _boundary(rng, stream)
    return _splice(stream, at, at, lead + gadget(rng) + b"0")


def _lying_frame(rng: random.Random, stream: bytes) -> bytes:
    """A gadget inside the stream, with frame lengths that no longer match what they cover."""
    mutated = _insert_popped(rng, stream)
    frames = [op for op in _ops(mutated) if op.name == "FRAME"]
    if not frames:
        return b"\x80\x04\x95" + struct.pack("<Q", rng.randrange(1, 64)) + mutated
    op = rng.choice(frames)
    declared = struct.unpack("<Q", mutated[op.start + 1 : op.end])[0]
    new = max(0, declared + rng.choice([-40, -9, -1, 1, 9, 1 << 20]))
    return mutated[: op.start + 1] + struct.pack("<Q", new) + mutated[op.end :]


def _noise(rng: random.Random, stream: bytes) -> bytes:
    data = bytearray(_insert_popped(rng, stream))
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(data)) if data else 0
        action = rng.randrange(3)
        if action == 0 and data:
            data[at] = rng.randrange(256)
        elif action == 1 and data:
            del data[at]
        else:
            data[at:at] = bytes([rng.randrange(256)])
    return bytes(data)


def _benign(rng: random.Random, stream: bytes) -> bytes:
    return stream


# (operator, whether it plants a gadget, weight)
_MUTATIONS: list[tuple[Callable[[random.Random, bytes], bytes], bool, int]] = [
    (_replace_value, True, 5),
    (_insert_popped, True, 4),
    (_limit_first, True, 2),
    (_lying_frame, True, 2),
    (_noise, True, 2),
    (_benign, False, 1),
]


# --- carriers: genuine files and where their pickle streams lie -------------------------------


@dataclasses.dataclass(frozen=True)
class Carrier:
    """A genuine file, split as ``before + stream + after`` around the pickle stream to mutate."""

    name: str
    suffix: str
    before: bytes
    stream: bytes
    after: bytes
    repack: Callable[[bytes], bytes]  # whole raw file -> the file as written (zipped, compressed)


def _metadata() -> dict[str, object]:
    return {
        "step": 1000,
        "lr": 3e-4,
        "name": "run-7",
        "tags": ("base", "ft"),
        "ids": list(range(6)),
        "blob": b"\x00\x01\x02",
        "nested": collections.OrderedDict(a=1, b=[1.5, None, True]),
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
    }


def _identity(data: bytes) -> bytes:
    return data


def _split_first_pickle(name: str, suffix: str, data: bytes, start: int = 0) -> Carrier:
    end = _end_of_pickle(data, start)
    if end < 0:  # the stream runs into raw bytes (joblib arrays): mutate what parses before them
        ops = _ops(data[start:])
        end = start + (ops[-1].end if ops else 0)
    # One honest frame around the whole stream: mutations can then keep it honest (see `_splice`).
    return Carrier(name, suffix, data[:start], _reframed(data[start:end]), data[end:], _identity)


def _zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def _zip_carrier(name: str, suffix: str, data: bytes, member_suffix: str) -> Carrier:
    members = _zip_members(data)
    index = next(i for i, (m, _) in enumerate(members) if m.endswith(member_suffix))
    member = members[index][1]
    start = 0
    if member.startswith(b"\x93NUMPY"):
        start = 10 + struct.unpack("<H", member[8:10])[0]

    def repack(raw: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for i, (m, content) in enumerate(members):
                zf.writestr(m, raw if i == index else content)
        return out.getvalue()

    inner = _split_first_pickle(name, suffix, member, start)
    return dataclasses.replace(inner, repack=repack)


def _compressed_carrier(name: str, compress: Callable[[bytes], bytes], raw: bytes) -> Carrier:
    inner = _split_first_pickle(name, ".joblib", raw)
    return dataclasses.replace(inner, repack=compress)


def carriers(work: Path) -> list[Carrier]:
    """Genuine files written by the real libraries, each split around a pickle stream."""
    import joblib
    import numpy as np
    import torch

    work.mkdir(parents=True, exist_ok=True)
    found: list[Carrier] = []
    meta = _metadata()
    arrays = {"w": np.arange(6.0).reshape(2, 3), "o": np.array([1, "a", None], dtype=object)}
    for protocol in range(6):
        obj: dict[str, object] = dict(meta)
        if protocol >= 2:
            obj["arrays"] = arrays
        if protocol < 3:
            obj.pop("blob")
        found.append(_split_first_pickle(f"pickle-p{protocol}", ".pkl", pickle.dumps(obj, protocol=protocol)))

    state = {"layer.weight": torch.ones(2, 3), "layer.bias": torch.zeros(2), "meta": meta}
    path = work / "new.pt"
    torch.save(state, path)
    found.append(_zip_carrier("torch-zip", ".pt", path.read_bytes(), "data.pkl"))
    path = work / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    legacy = path.read_bytes()
    start = 0
    for index in range(4):  # magic number, protocol, sys info, then the state itself
        found.append(_split_first_pickle(f"torch-legacy-{index}", ".pt", legacy, start))
        start = _end_of_pickle(legacy, start)

    path = work / "obj.npy"
    np.save(path, arrays["o"], allow_pickle=True)
    npy = path.read_bytes()
    found.append(_split_first_pickle("npy-object", ".npy", npy, 10 + struct.unpack("<H", npy[8:10])[0]))
    path = work / "obj.npz"
    np.savez(path, o=arrays["o"], w=arrays["w"])
    found.append(_zip_carrier("npz-object", ".npz", path.read_bytes(), "o.npy"))

    path = work / "plain.joblib"
    joblib.dump({"arrays": arrays, "meta": meta}, path)
    found.append(_split_first_pickle("joblib", ".joblib", path.read_bytes()))
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "zlib": zlib.compress,
        "gzip": gzip.compress,
        "bz2": bz2.compress,
        "xz": lambda b: lzma.compress(b, format=lzma.FORMAT_XZ),
    }
    decompress: dict[str, Callable[[bytes], bytes]] = {
        "zlib": zlib.decompress,
        "gzip": gzip.decompress,
        "bz2": bz2.decompress,
        "xz": lzma.decompress,
    }
    for method, compress in compressors.items():
        path = work / f"packed-{method}.joblib"
        joblib.dump({"arrays": arrays, "meta": meta}, path, compress=(method, 3))
        packed = path.read_bytes()
        found.append(_compressed_carrier(f"joblib-{method}", compress, decompress[method](packed)))
    return found


@dataclasses.dataclass(frozen=True)
class Sample:
    path: Path
    carrier: str
    mutation: str
    hostile: bool  # a gadget was planted (it may still have been broken by later noise)


def generate(work: Path, count: int, seed: int) -> list[Sample]:
    """``count`` samples written under ``work``; the same seed writes the same bytes."""
    rng = random.Random(seed)
    bases = carriers(work / "carriers")
    weights = [w for _, _, w in _MUTATIONS]
    samples: list[Sample] = []
    out = work / "samples"
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        carrier = rng.choice(bases)
        mutate, hostile, _ = rng.choices(_MUTATIONS, weights)[0]
        stream = mutate(rng, carrier.stream)
        after = carrier.after
        if rng.random() < 0.1:  # another pickle after the end, as a second reader would meet it
            after += hostile_pickle(rng)
            hostile = True
        data = carrier.repack(carrier.before + stream + after)
        path = out / f"{index:05d}-{carrier.name}-{mutate.__name__.strip('_')}{carrier.suffix}"
        path.write_bytes(data)
        samples.append(Sample(path, carrier.name, mutate.__name__.strip("_"), hostile))
    return samples
