"""Every public bypass of pickle scanners we know of, rebuilt byte by byte and fed to trainguard.

Sources: security advisories and issues of picklescan, modelscan, fickling, modelaudit and
PyTorch's ``weights_only`` loader. Each test builds its own sample in ``tmp_path``; nothing is
ever unpickled, and every payload would only echo or print ``TRAINGUARD-MARKER``.

A test here encodes a requirement, not the current behaviour: when one fails, the scanner has
to change, never the test.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import marshal
import os
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trainguard.scan import ScanOptions, scan_path

from ._payloads import (
    BUILD,
    CMD,
    EMPTY_DICT,
    EMPTY_TUPLE,
    MARK,
    MARKER,
    MEMOIZE,
    NEWOBJ,
    NEWOBJ_EX,
    NONE,
    POP,
    PY_PAYLOAD,
    REDUCE,
    SETITEM,
    STACK_GLOBAL,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    assert_wellformed,
    benign_pickle,
    binget,
    binint,
    binput,
    binstring,
    binunicode,
    binunicode8,
    call,
    ext1,
    ext2,
    ext4,
    frame,
    frame_header,
    get0,
    glob,
    long_binget,
    long_binput,
    npy_object_header,
    os_system_pickle,
    proto,
    put0,
    reduce_pickle,
    sglob,
    short_binstring,
    string0,
    torch_zip_members,
    u,
    unicode0,
    value,
    wrap,
    write,
    zip_bytes,
)

# --- helpers -----------------------------------------------------------------------------


def _messages(report: Any) -> list[str]:
    return [f.message for r in report.results for f in r.findings]


def _describe(report: Any) -> str:
    lines = [f"exit_code={report.exit_code}"]
    for r in report.results:
        lines.append(f"  {r.path}: {r.verdict.value}")
        lines.extend(f"    [{f.rule}/{f.severity.value}] {f.message}" for f in r.findings)
        lines.extend(f"    problem: {p}" for p in getattr(r, "problems", ()) or ())
    return "\n".join(lines)


def _assert_flagged(report: Any, *needles: str | tuple[str, ...]) -> None:
    """exit code 1, and for each needle (or tuple of alternatives) some finding message names it."""
    assert report.exit_code == 1, _describe(report)
    msgs = _messages(report)
    for needle in needles:
        options = (needle,) if isinstance(needle, str) else needle
        assert any(o in m for m in msgs for o in options), f"no finding names {options}\n{_describe(report)}"


def _assert_not_clean(report: Any) -> None:
    """Structural attacks: a finding (1) or fail closed (3); never clean."""
    assert report.exit_code in (1, 3), _describe(report)


def _scan_bytes(tmp_path: Path, name: str, data: bytes, *, wellformed: bool = True) -> Any:
    if wellformed:
        assert_wellformed(data)
    return scan_path([write(tmp_path / name, data)])


class _EvilReduce:
    """Pickles as ``os.system(CMD)``; only ever *dumped* (by torch.save / joblib.dump), never loaded."""

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (CMD,)


# =========================================================================================
# 1. Opcode variants of "import a callable, call it"
# =========================================================================================


# Protocol 0 text pickle, the textbook payload.
# https://sensepost.com/cms/resources/conferences/2011/sour_pickles/BH_US_11_Slaviero_Sour_Pickles.pdf
def test_protocol0_global_reduce(tmp_path: Path) -> None:
    data = b"cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR."
    _assert_flagged(_scan_bytes(tmp_path, "p0.pkl", data), "system")


# pickle.dumps(os.system) on Linux writes 'posix system' (picklescan test malicious2):
# https://github.com/mmaitre314/picklescan/blob/main/tests/test_scanner.py
def test_posix_system_module_alias(tmp_path: Path) -> None:
    data = proto(2) + glob("posix", "system") + binput(0) + binunicode(CMD) + binput(1) + TUPLE1
    data += REDUCE + binput(2) + STOP
    _assert_flagged(_scan_bytes(tmp_path, "posix.pkl", data), "system")


# ... and 'nt system' on Windows (modelaudit adds posix/nt for CVE-2025-10155):
# https://github.com/promptfoo/modelaudit/pull/605
def test_nt_system_module_alias(tmp_path: Path) -> None:
    data = reduce_pickle("nt", "system", CMD, protocol=2)
    _assert_flagged(_scan_bytes(tmp_path, "nt.pkl", data), "system")


# Every protocol: 0-3 use GLOBAL, 4-5 STACK_GLOBAL inside a FRAME (picklescan tests v0/v3/v4):
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_protocol_builtins_eval(tmp_path: Path, protocol: int) -> None:
    module = "__builtin__" if protocol < 3 else "builtins"
    data = reduce_pickle(module, "eval", PY_PAYLOAD, protocol=protocol)
    _assert_flagged(_scan_bytes(tmp_path, f"eval_v{protocol}.pkl", data), "eval")


# STACK_GLOBAL operands pushed with STRING/BINSTRING/... instead of SHORT_BINUNICODE
# (GHSA-9gvj-pp9x-gcfr; picklescan only tracked *UNICODE operands):
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-9gvj-pp9x-gcfr
# https://github.com/protectai/modelscan/pull/313
@pytest.mark.parametrize(
    "push",
    [
        pytest.param(string0, id="STRING"),
        pytest.param(binstring, id="BINSTRING"),
        pytest.param(short_binstring, id="SHORT_BINSTRING"),
        pytest.param(unicode0, id="UNICODE"),
        pytest.param(binunicode, id="BINUNICODE"),
        pytest.param(binunicode8, id="BINUNICODE8"),
    ],
)
def test_stack_global_with_string_opcodes(tmp_path: Path, push: Callable[[str], bytes]) -> None:
    data = push("os") + push("system") + STACK_GLOBAL + push(CMD) + TUPLE1 + REDUCE + STOP
    _assert_flagged(_scan_bytes(tmp_path, "strings.pkl", data), "system")


# imaginaryctf "Safe Pickle": PUT indices != GET indices, so a scanner that replays the last
# pushed strings sees torch.LongStorage while the VM imports os.system.
# https://github.com/mmaitre314/picklescan/issues/22
def test_stack_global_memo_index_confusion(tmp_path: Path) -> None:
    data = b"".join(
        [
            unicode0("os"), put0(2), POP,
            unicode0("system"), put0(3), POP,
            unicode0("torch"), put0(0), POP,
            unicode0("LongStorage"), put0(1), POP,
            get0(2), get0(3), STACK_GLOBAL,
            MARK, unicode0(CMD), TUPLE, REDUCE, STOP,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "ctf.pkl", data), "system")


# Same trick with a trailing junk suffix after STOP (picklescan malicious-invalid-bytes.pkl).
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
def test_trailing_bytes_after_stop(tmp_path: Path) -> None:
    data = b"".join(
        [
            unicode0("os"), put0(2), POP, unicode0("system"), put0(3), POP,
            get0(2), get0(3), STACK_GLOBAL, MARK, unicode0(CMD), TUPLE, REDUCE, STOP,
            b"\n\n\t\t",
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "suffix.pkl", data, wellformed=False), "system")


# MEMOIZE'd operands replayed with BINGET after padding literals, so "the last N strings before
# STACK_GLOBAL" heuristics see torch.FloatStorage (agent-bom memo evasion).
# https://github.com/msaad00/agent-bom/pull/3326
def test_stack_global_memoize_binget_after_padding(tmp_path: Path) -> None:
    body = b"".join(
        [
            u("os"), MEMOIZE, POP,
            u("system"), MEMOIZE, POP,
            u("torch"), u("FloatStorage"), POP, POP,
            binget(0), binget(1), STACK_GLOBAL,
            u(CMD), TUPLE1, REDUCE,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "memoize.pkl", wrap(body, 4)), "system")


# Memo slot overwritten: first PUT holds a safe name, a later PUT to the same index holds the
# dangerous one; only the last write counts at load time.
# https://github.com/promptfoo/modelaudit/pull/493
def test_memo_put_overwrite(tmp_path: Path) -> None:
    body = b"".join(
        [
            u("torch"), binput(0), POP,
            u("FloatStorage"), binput(1), POP,
            u("os"), binput(0), POP,
            u("system"), binput(1), POP,
            binget(0), binget(1), STACK_GLOBAL,
            u(CMD), TUPLE1, REDUCE,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "overwrite.pkl", wrap(body, 4)), "system")


# LONG_BINPUT / LONG_BINGET with a 4-byte memo index.
# https://github.com/promptfoo/modelaudit/pull/493
def test_long_binput_long_binget(tmp_path: Path) -> None:
    body = b"".join(
        [
            u("os"), long_binput(0x10000), POP,
            u("system"), long_binput(0x7FFFFFF0), POP,
            long_binget(0x10000), long_binget(0x7FFFFFF0), STACK_GLOBAL,
            u(CMD), TUPLE1, REDUCE,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "longmemo.pkl", wrap(body, 4)), "system")


# Text PUT/GET indices are parsed with int(): "02", "+2", "0_2", " 2" all name memo slot 2. A
# scanner keying the memo by the raw text keeps "torch"/"FloatStorage" in slots 2/3 while the VM
# overwrote them with "os"/"system" (a memo-confusion variant of picklescan #22).
# https://github.com/mmaitre314/picklescan/issues/22
@pytest.mark.parametrize(
    "alias",
    ["0{}", "+{}", "0_{}", " {}", "{} "],
    ids=["zero", "plus", "underscore", "lead-space", "trail-space"],
)
def test_memo_text_index_aliases(tmp_path: Path, alias: str) -> None:
    def put(i: str) -> bytes:
        return b"p" + i.encode() + b"\n"

    data = b"".join(
        [
            unicode0("torch"), put("2"), POP,
            unicode0("FloatStorage"), put("3"), POP,
            unicode0("os"), put(alias.format(2)), POP,
            unicode0("system"), put(alias.format(3)), POP,
            get0(2), get0(3), STACK_GLOBAL,
            unicode0(CMD), TUPLE1, REDUCE, STOP,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "memo_alias.pkl", data), "system")


# The C unpickler parses INT ('I') with strtol(base 0), so "010" is octal 8; int("010", 0) raises.
# A scanner whose parser rejects a prefix the real VM accepts must fail closed - if it instead
# decides "not a pickle", everything after the prefix (here os.system) goes unscanned.
# https://arxiv.org/html/2508.19774v1 (parser differentials between scanners and the unpickler)
@pytest.mark.parametrize("literal", ["010", "-010", " 010", "0010"])
def test_int_opcode_octal_literal_parser_differential(tmp_path: Path, literal: str) -> None:
    data = b"I" + literal.encode() + b"\n" + POP + b"cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR."
    _assert_flagged(_scan_bytes(tmp_path, "octal.pkl", data), "system")


# MEMOIZE stores at len(memo) - the number of filled slots - not at "number of MEMOIZE ops so far"
# nor "highest index + 1". After one BINPUT 9, a counter-based model is off by one and reads
# torch.FloatStorage where the VM reads os.system.
# https://github.com/promptfoo/modelaudit/pull/330 (memo tracking for STACK_GLOBAL)
def test_memoize_index_counts_filled_slots(tmp_path: Path) -> None:
    body = b"".join(
        [
            u("pad"), binput(9), POP,
            u("os"), MEMOIZE, POP,  # VM slot 1 (counter model: 0)
            u("torch"), MEMOIZE, POP,  # VM slot 2 (counter model: 1)
            u("system"), MEMOIZE, POP,  # VM slot 3 (counter model: 2)
            u("FloatStorage"), MEMOIZE, POP,  # VM slot 4 (counter model: 3)
            binget(1), binget(3), STACK_GLOBAL,
            u(CMD), TUPLE1, REDUCE,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "memoize_index.pkl", wrap(body, 4)), "system")


# Stack-model differentials: POP removes a MARK when the mark is on top; POP_MARK drops everything
# above the mark; DUP copies. A wrong model shifts which strings STACK_GLOBAL consumes.
# https://github.com/protectai/modelscan/issues/85 ("storing the previous opcode's argument")
@pytest.mark.parametrize(
    "ops",
    [
        pytest.param(u("torch") + u("os") + MARK + POP + u("system"), id="pop-removes-mark"),
        pytest.param(u("os") + MARK + u("torch") + u("FloatStorage") + b"1" + u("system"), id="pop-mark"),
        pytest.param(u("torch") + u("os") + b"2" + POP + u("system"), id="dup-pop"),
        pytest.param(u("os") + b"2" + u("system") + u("FloatStorage") + POP, id="dup"),
    ],
)
def test_stack_model_differentials(tmp_path: Path, ops: bytes) -> None:
    body = ops + STACK_GLOBAL + u(CMD) + TUPLE1 + REDUCE
    _assert_flagged(_scan_bytes(tmp_path, "stack.pkl", wrap(body, 4)), "system")


# STRING operands are escape-decoded ('o\x73' is "os"), UNICODE ones raw-unicode-escape decoded
# ('o\u0073'); a scanner that keeps the literal text reports a name that is not the one imported.
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-9gvj-pp9x-gcfr
@pytest.mark.parametrize(
    ("module", "name"),
    [(b"S'o\\x73'\n", b"S's\\x79stem'\n"), (b"Vo\\u0073\n", b"Vs\\u0079stem\n")],
    ids=["STRING-escapes", "UNICODE-escapes"],
)
def test_escaped_stack_global_operands(tmp_path: Path, module: bytes, name: bytes) -> None:
    data = module + name + STACK_GLOBAL + string0(CMD) + TUPLE1 + REDUCE + STOP
    _assert_flagged(_scan_bytes(tmp_path, "escapes.pkl", data), ("os.system", "posix.system"))


# GET of a memo key that was never PUT made modelscan abort *after* the payload already ran
# (picklescan keyerror-exploit.pkl; modelscan #348).
# https://github.com/protectai/modelscan/pull/348
# https://github.com/protectai/modelscan/issues/338
def test_memo_missing_key_crashes_scanner(tmp_path: Path) -> None:
    data = b"".join(
        [
            proto(4), glob("os", "system"), unicode0(CMD), TUPLE1, REDUCE, POP,
            u("os"), MEMOIZE, binget(3), binget(0), STACK_GLOBAL, binint(0x42), STOP,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "keyerror.pkl", data), "system")


# STACK_GLOBAL fed a memoised int: a type confusion that crashed scanners after the payload
# (picklescan type-confusion-exploit.pkl).
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
def test_memo_type_confusion(tmp_path: Path) -> None:
    data = b"".join(
        [
            proto(4), glob("os", "system"), unicode0(CMD), TUPLE1, REDUCE, POP,
            b"J" + struct.pack("<i", 42), MEMOIZE, u("os"), MEMOIZE,
            binget(0), binget(1), STACK_GLOBAL, binint(0x42), STOP,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "typeconfusion.pkl", data), "system")


# INST imports *and calls* in one opcode; picklescan only looked at GLOBAL/STACK_GLOBAL.
# https://github.com/mmaitre314/picklescan/issues/13
# https://github.com/protectai/modelscan/pull/52
def test_inst_opcode(tmp_path: Path) -> None:
    data = b"(S'echo TRAINGUARD-MARKER'\nios\nsystem\n."
    _assert_flagged(_scan_bytes(tmp_path, "inst.pkl", data), "system")


# OBJ call whose result is discarded with POP vanished from fickling's AST (GHSA-mxhj-88fx-4pcv).
# https://github.com/advisories/GHSA-mxhj-88fx-4pcv
def test_obj_opcode_result_popped(tmp_path: Path) -> None:
    data = b"(cos\nsystem\nS'echo TRAINGUARD-MARKER'\no0N."
    _assert_flagged(_scan_bytes(tmp_path, "obj.pkl", data), "system")


# pty.spawn through OBJ, the fickling test payload that left no unused variable.
# https://github.com/trailofbits/fickling/pull/108
# https://github.com/trailofbits/fickling/security/advisories/GHSA-r7v6-mfhq-g3m2
def test_obj_opcode_pty_spawn(tmp_path: Path) -> None:
    data = b'(cpty\nspawn\nS"echo"\no.'
    _assert_flagged(_scan_bytes(tmp_path, "pty.pkl", data), "spawn")


# NEWOBJ instantiates a class without REDUCE: a dangerous class, or an unknown __main__ class
# (0xnu/mnist-ocr on Hugging Face, flagged only by modelaudit).
# https://github.com/promptfoo/modelaudit (blog "Open-Sourcing ModelAudit", NEWOBJ example)
@pytest.mark.parametrize(
    ("module", "name"), [("subprocess", "Popen"), ("__main__", "ImageTokenizer")], ids=["Popen", "main"]
)
def test_newobj(tmp_path: Path, module: str, name: str) -> None:
    data = proto(2) + glob(module, name) + value((["echo", MARKER],), 2) + NEWOBJ + STOP
    _assert_flagged(_scan_bytes(tmp_path, "newobj.pkl", data), name)


# NEWOBJ_EX (protocol 4) with keyword arguments; modelaudit keeps a NEWOBJ_EX malicious control.
# https://github.com/promptfoo/modelaudit/pull/1636
def test_newobj_ex(tmp_path: Path) -> None:
    body = sglob("subprocess", "Popen") + value((["echo", MARKER],)) + value({"shell": False}) + NEWOBJ_EX
    _assert_flagged(_scan_bytes(tmp_path, "newobj_ex.pkl", wrap(body, 4)), "Popen")


# PROTO opcode in the *middle* of a stream switches the VM to protocol 4 semantics, where GLOBAL
# resolves dotted names; a scanner that reads the protocol from the header only misses it.
# Technique: https://github.com/trailofbits/fickling/pull/287 (dotted names need protocol >= 4)
def test_proto_opcode_mid_stream_enables_dotted_global(tmp_path: Path) -> None:
    data = proto(2) + NONE + POP + proto(4) + glob("pathlib", "os.system")
    data += MARK + binunicode(CMD) + TUPLE + REDUCE + STOP
    _assert_flagged(_scan_bytes(tmp_path, "midproto.pkl", data), "system")


# Importing a module runs its top-level code even if the attribute lookup then fails:
# find_class("antigravity", ...) opens a web browser before anything is called.
# https://github.com/promptfoo/modelaudit/pull/1061 ("import side effects")
def test_import_side_effect_module(tmp_path: Path) -> None:
    data = proto(2) + glob("antigravity", "geohash") + POP + NONE + STOP
    _assert_flagged(_scan_bytes(tmp_path, "antigravity.pkl", data), "antigravity")


# =========================================================================================
# 2. Names with dots: pickle protocol 4 resolves "a.b.c" attribute chains in find_class
# =========================================================================================


# STACK_GLOBAL "pathlib" "os.system" reaches os.system through any module that imports os
# (fickling GHSA-5j3x-jp52-966f); the same works from allowlisted prefixes such as torch/numpy.
# https://github.com/trailofbits/fickling/pull/287
@pytest.mark.parametrize(
    ("module", "name", "needle"),
    [
        ("pathlib", "os.system", "system"),
        ("os.path", "os.system", "system"),
        ("torch.serialization", "os.system", "system"),
        ("torch", "serialization.os.system", "system"),
        ("collections", "_sys.modules", "modules"),
        ("numpy", "testing._private.utils.runstring", "runstring"),
    ],
)
def test_dotted_name_attribute_chain(tmp_path: Path, module: str, name: str, needle: str) -> None:
    data = wrap(call(sglob(module, name), CMD), 4)
    _assert_flagged(_scan_bytes(tmp_path, "dotted.pkl", data), needle)


# Dotted names with the GLOBAL opcode under PROTO 4 (the unpickler's proto, not the opcode, decides).
# https://github.com/trailofbits/fickling/pull/287
def test_dotted_name_global_opcode_protocol4(tmp_path: Path) -> None:
    data = proto(4) + glob("pathlib", "os.system") + MARK + u(CMD) + TUPLE + REDUCE + STOP
    _assert_flagged(_scan_bytes(tmp_path, "dotted_global.pkl", data), "system")


# An allowlisted *class* is not an allowlisted attribute chain: "Cls.fit.__globals__" walks from
# the allowed class into its module globals (the dotted-name trick of GHSA-5j3x-jp52-966f, aimed at
# a user allowlist; CVE-2025-10157 was the prefix-matching mirror image of this bug).
# https://github.com/trailofbits/fickling/pull/287
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-q77w-mwjj-7mqx
def test_dotted_name_escapes_user_allowlist(tmp_path: Path) -> None:
    allowed = "sklearn.linear_model._logistic.LogisticRegression"
    body = call(sglob("sklearn.linear_model._logistic", "LogisticRegression.fit.__globals__"), CMD)
    path = write(tmp_path / "allow.pkl", wrap(body, 4))
    report = scan_path([path], ScanOptions(allow=(allowed,)))
    _assert_flagged(report, "__globals__")


# =========================================================================================
# 3. BUILD: attribute writes on globals and __setstate__ injection
# =========================================================================================


# BUILD with slot-state on the *function* numpy.prod writes attributes prod.a="os", prod.b="system";
# GLOBAL "numpy" "prod.a" then yields non-constant STACK_GLOBAL operands.
# https://github.com/protectai/modelscan/issues/85
def test_build_attribute_injection_on_numpy_global(tmp_path: Path) -> None:
    data = b"".join(
        [
            proto(5), glob("numpy", "prod"),
            NONE, MARK, unicode0("a"), unicode0("os"), b"d", TUPLE2, BUILD,
            NONE, MARK, unicode0("b"), unicode0("system"), b"d", TUPLE2, BUILD,
            POP,
            glob("numpy", "prod.a"), put0(0), glob("numpy", "prod.b"), put0(1), POP, POP,
            get0(0), get0(1), STACK_GLOBAL,
            unicode0(CMD), TUPLE1, REDUCE, STOP,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "numpy_prod.pkl", data))


# BUILD on an allowlisted class object writes class attributes for every later user of the class.
# https://github.com/protectai/modelscan/issues/85 (BUILD as arbitrary setattr on a global)
def test_build_on_allowlisted_global(tmp_path: Path) -> None:
    allowed = "sklearn.linear_model._logistic.LogisticRegression"
    state = NONE + value({"__reduce__": "pwned", "__module__": MARKER}) + TUPLE2
    body = sglob("sklearn.linear_model._logistic", "LogisticRegression") + state + BUILD
    path = write(tmp_path / "build_allowed.pkl", wrap(body, 4))
    report = scan_path([path], ScanOptions(allow=(allowed,)))
    assert report.exit_code == 1, _describe(report)


# BUILD on an allowlisted torch function rewrites its __defaults__ for the whole process: no import
# is dangerous, but every later torch.load in the process is silently altered (sabotage).
# https://github.com/protectai/modelscan/issues/85 (BUILD as arbitrary setattr on a global)
def test_build_rewrites_defaults_of_allowlisted_torch_function(tmp_path: Path) -> None:
    state = NONE + value({"__defaults__": (MARKER,)}) + TUPLE2
    body = sglob("torch._utils", "_rebuild_tensor_v2") + state + BUILD + POP + value({"ok": 1})
    report = _scan_bytes(tmp_path, "defaults.pt", wrap(body, 4))
    assert report.exit_code == 1, _describe(report)


# BUILD sets numpy.size.shape = numpy.__builtins__, then numpy.size(numpy.size, "eval") returns eval.
# https://github.com/protectai/modelscan/issues/330
def test_numpy_builtins_build_injection(tmp_path: Path) -> None:
    body = b"".join(
        [
            sglob("numpy", "size"), MEMOIZE, MEMOIZE,
            sglob("numpy", "__builtins__"), MEMOIZE, MEMOIZE,
            binget(1), EMPTY_DICT, EMPTY_DICT, u("shape"), binget(3), SETITEM, TUPLE2, BUILD,
            binget(1), binget(1), u("eval"), TUPLE2, REDUCE,
            u(PY_PAYLOAD), TUPLE1, REDUCE,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "numpy_size.pkl", wrap(body, 4)), ("__builtins__", "eval"))


# BUILD with {"__setstate__": os.system} on an object from a "safe" constructor, then a second
# BUILD calls the injected __setstate__ (fickling GHSA-mhc9-48gj-9gp3).
# https://github.com/advisories/GHSA-mhc9-48gj-9gp3
def test_build_setstate_injection(tmp_path: Path) -> None:
    data = b"".join(
        [
            proto(2), glob("collections", "OrderedDict"), EMPTY_TUPLE, REDUCE,
            NONE, EMPTY_DICT, binunicode("__setstate__"), glob("os", "system"), SETITEM, TUPLE2, BUILD,
            binunicode(CMD), BUILD, STOP,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "setstate.pkl", data), "system")


# _interpreters.run_string routed through BUILD/__setstate__ to dodge fickling's unused-variable
# check (GHSA-6ggj-6f2q-f7mx).
# https://github.com/trailofbits/fickling/pull/302
@pytest.mark.parametrize("module", ["_interpreters", "_xxsubinterpreters"])
def test_subinterpreter_run_string_via_build(tmp_path: Path, module: str) -> None:
    body = b"".join(
        [
            sglob("collections", "OrderedDict"), EMPTY_TUPLE, REDUCE,
            NONE, EMPTY_DICT, u("__setstate__"), sglob(module, "run_string"), SETITEM, TUPLE2, BUILD,
            u(PY_PAYLOAD), BUILD,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "interp.pkl", wrap(body, 4)), "run_string")


# =========================================================================================
# 4. Indirection: callables that fetch other callables by name
# =========================================================================================


# pkgutil.resolve_name("os:system"): one unblocked function reaches every blocked one (CVSS 10).
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-vvpj-8cmc-gx39
def test_pkgutil_resolve_name(tmp_path: Path) -> None:
    body = call(call(sglob("pkgutil", "resolve_name"), "os:system"), CMD)
    _assert_flagged(_scan_bytes(tmp_path, "resolve_name.pkl", wrap(body, 4)), "resolve_name")


# importlib.import_module("os") + builtins.getattr(mod, "system").
# https://github.com/mmaitre314/picklescan/pull/74
# https://github.com/mmaitre314/picklescan/issues/66
def test_importlib_import_module(tmp_path: Path) -> None:
    module = call(sglob("importlib", "import_module"), "os")
    fn = sglob("builtins", "getattr") + MARK + module + u("system") + TUPLE + REDUCE
    body = fn + MARK + u(CMD) + TUPLE + REDUCE
    _assert_flagged(_scan_bytes(tmp_path, "import_module.pkl", wrap(body, 4)), "import_module")


# STACK_GLOBAL whose operands are *computed* at load time ("".join(["o", "s"])), via
# importlib + getattr; modelscan reported nothing.
# https://github.com/protectai/modelscan/issues/331
def test_stack_global_operands_built_at_runtime(tmp_path: Path) -> None:
    def joined(chars: list[str]) -> bytes:
        # getattr(getattr(import_module("builtins"), "str"), "join")("", chars)
        str_type = binget(2) + MARK + binget(1) + u("str") + TUPLE + REDUCE
        join = binget(2) + MARK + str_type + u("join") + TUPLE + REDUCE
        return join + MARK + u("") + value(chars) + TUPLE + REDUCE

    body = b"".join(
        [
            sglob("importlib", "import_module"), MEMOIZE, POP,  # memo 0
            binget(0), MARK, u("builtins"), TUPLE, REDUCE, MEMOIZE, POP,  # memo 1: builtins module
            sglob("builtins", "getattr"), MEMOIZE, POP,  # memo 2
            joined(["o", "s"]), joined(["s", "y", "s", "t", "e", "m"]), STACK_GLOBAL,
            u(CMD), TUPLE1, REDUCE,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "computed.pkl", wrap(body, 4)), ("import_module", "getattr"))


# operator.attrgetter("system")(builtins.__import__("os"))(cmd), picklescan malicious12.
# https://github.com/mmaitre314/picklescan/pull/25
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
def test_operator_attrgetter_chain(tmp_path: Path) -> None:
    getter = sglob("operator", "attrgetter") + MEMOIZE + u("system") + TUPLE1 + REDUCE + MEMOIZE
    module = sglob("builtins", "__import__") + MEMOIZE + u("os") + TUPLE1 + REDUCE + MEMOIZE
    body = getter + module + TUPLE1 + REDUCE + MEMOIZE + u(CMD) + TUPLE1 + REDUCE + MEMOIZE
    _assert_flagged(_scan_bytes(tmp_path, "attrgetter.pkl", wrap(body, 4)), "attrgetter")


# operator.methodcaller("system", cmd)(pydoc.locate("os")).
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-84r2-jw7c-4r5q
def test_operator_methodcaller_pydoc_locate(tmp_path: Path) -> None:
    caller = call(sglob("operator", "methodcaller"), "system", CMD)
    body = caller + MARK + call(sglob("pydoc", "locate"), "os") + TUPLE + REDUCE
    _assert_flagged(_scan_bytes(tmp_path, "methodcaller.pkl", wrap(body, 4)), "methodcaller", "locate")


# The C accelerator module _operator exposes the same gadgets under another module name.
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-955r-x9j8-7rhh
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-46h3-79wf-xr6c
@pytest.mark.parametrize("gadget", ["methodcaller", "attrgetter"])
def test_private_operator_module(tmp_path: Path, gadget: str) -> None:
    args = ("system", CMD) if gadget == "methodcaller" else ("system",)
    fn = call(sglob("_operator", gadget), *args)
    module = call(sglob("builtins", "__import__"), "os")
    body = fn + MARK + module + TUPLE + REDUCE
    if gadget == "attrgetter":
        body += MARK + u(CMD) + TUPLE + REDUCE
    _assert_flagged(_scan_bytes(tmp_path, "_operator.pkl", wrap(body, 4)), gadget)


# functools.partial(torch.load, path, weights_only=False)() wraps a dangerous call; kwargs are
# restored by BUILD -> partial.__setstate__ (picklescan Malicious19; fickling #210).
# https://github.com/trailofbits/fickling/pull/210
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
def test_functools_partial_torch_load(tmp_path: Path) -> None:
    body = b"".join(
        [
            sglob("functools", "partial"), sglob("torch.serialization", "load"), MEMOIZE, TUPLE1, REDUCE,
            MARK, binget(0), value(("other_model.bin",)),
            value({"pickle_file": "config.json", "weights_only": False}), NONE, TUPLE, BUILD,
            EMPTY_TUPLE, REDUCE,
        ]
    )  # fmt: skip
    _assert_flagged(_scan_bytes(tmp_path, "partial.pkl", wrap(body, 4)), "load")


# The Black Hat 2011 chain: globals() + compile + eval + getattr(dict, "get") + apply.
# https://sensepost.com/cms/resources/conferences/2011/sour_pickles/BH_US_11_Slaviero_Sour_Pickles.pdf
def test_sour_pickles_chain(tmp_path: Path) -> None:
    data = (
        b"c__builtin__\nglobals\n(tRp100\n0c__builtin__\ncompile\n"
        b"(S'print(\"TRAINGUARD-MARKER\")'\nS''\nS'exec'\ntRp101\n"
        b"0c__builtin__\neval\n(g101\ng100\ntRp102\n0c__builtin__\ngetattr\n(c__builtin__\n"
        b"dict\nS'get'\ntRp103\n0c__builtin__\napply\n(g103\n(g100\nS'picklesmashed'\nltRp104\n0g104\n."
    )
    _assert_flagged(_scan_bytes(tmp_path, "sour.pkl", data), "compile", "eval", "getattr")


# marshal.loads(code bytes) + types.FunctionType(code, {})() runs arbitrary bytecode.
# https://github.com/mmaitre314/picklescan/pull/74
def test_marshal_loads_function_type(tmp_path: Path) -> None:
    code_bytes = marshal.dumps(compile(PY_PAYLOAD, "<trainguard>", "exec"))
    fn = sglob("types", "FunctionType") + MARK + call(sglob("marshal", "loads"), code_bytes)
    fn += EMPTY_DICT + TUPLE + REDUCE
    body = fn + EMPTY_TUPLE + REDUCE
    _assert_flagged(_scan_bytes(tmp_path, "marshal.pkl", wrap(body, 4)), ("marshal", "FunctionType"))


# Nested pickle: pickle.loads(<malicious bytes>) (picklescan #24/#25, modelaudit nested detection).
# https://github.com/mmaitre314/picklescan/pull/25
# https://github.com/promptfoo/modelaudit/pull/153
@pytest.mark.parametrize("module", ["pickle", "_pickle"])
def test_nested_pickle_loads(tmp_path: Path, module: str) -> None:
    body = call(sglob(module, "loads"), os_system_pickle(4))
    _assert_flagged(_scan_bytes(tmp_path, "nested.pkl", wrap(body, 4)), "loads")


# The protocol 0 form python writes for bytes: pickle.loads(_codecs.encode(text, "latin1")).
# https://github.com/mmaitre314/picklescan/pull/25
def test_nested_pickle_loads_protocol0_codecs(tmp_path: Path) -> None:
    inner = "cos\nsystem\n(S'echo TRAINGUARD-MARKER'\ntR."
    encoded = b"c_codecs\nencode\n(V" + inner.encode("raw-unicode-escape").replace(b"\n", b"\\u000a")
    encoded += b"\nVlatin1\ntR"
    data = b"cpickle\nloads\n(" + encoded + b"tR."
    _assert_flagged(_scan_bytes(tmp_path, "nested0.pkl", data), "loads")


# torch.storage._load_from_bytes(b) is torch.load(BytesIO(b)) with weights_only=False.
# https://github.com/protectai/modelscan/pull/313
def test_torch_storage_load_from_bytes(tmp_path: Path) -> None:
    body = call(sglob("torch.storage", "_load_from_bytes"), os_system_pickle(2))
    _assert_flagged(_scan_bytes(tmp_path, "load_from_bytes.pkl", wrap(body, 4)), "_load_from_bytes")


# numpy.load(path, None, allow_pickle=True) on a second attacker file.
# https://github.com/trailofbits/fickling/pull/108 (numpy.load with allow_pickle in fickling tests)
def test_numpy_load_allow_pickle(tmp_path: Path) -> None:
    body = call(sglob("numpy", "load"), "payload.npy", None, True)
    _assert_flagged(_scan_bytes(tmp_path, "npload.pkl", wrap(body, 4)), "load")


# copyreg extension registry: EXT1/EXT2/EXT4 name a callable by integer code, no module string.
# https://github.com/promptfoo/modelaudit/pull/623
# https://github.com/trailofbits/fickling/pull/172
@pytest.mark.parametrize(
    "ext", [pytest.param(ext1(0x42), id="EXT1"), pytest.param(ext2(0x1234), id="EXT2"),
            pytest.param(ext4(0x12345678), id="EXT4")]
)  # fmt: skip
def test_extension_code_opcodes(tmp_path: Path, ext: bytes) -> None:
    data = proto(2) + ext + MARK + binunicode(CMD) + TUPLE + REDUCE + STOP
    _assert_flagged(_scan_bytes(tmp_path, "ext.pkl", data))


# Register the extension from inside the pickle (copyreg.add_extension), then EXT1 it.
# https://github.com/promptfoo/modelaudit/pull/623
def test_extension_registered_in_same_pickle(tmp_path: Path) -> None:
    data = proto(2) + call(glob("copyreg", "add_extension"), "os", "system", 0xF0, protocol=2) + POP
    data += ext1(0xF0) + MARK + binunicode(CMD) + TUPLE + REDUCE + STOP
    _assert_flagged(_scan_bytes(tmp_path, "ext_reg.pkl", data), "add_extension")


# Python 2 module names are remapped by fix_imports for protocol < 3: "commands" -> subprocess,
# "__builtin__" -> builtins, "cPickle" -> pickle, "httplib" -> http.client (picklescan malicious3).
# https://github.com/mmaitre314/picklescan/blob/main/tests/test_scanner.py
@pytest.mark.parametrize(
    ("module", "name"),
    [("commands", "getoutput"), ("__builtin__", "exec"), ("cPickle", "loads"), ("httplib", "HTTPSConnection"),
     ("urllib2", "urlopen"), ("urllib", "urlopen")],
)  # fmt: skip
def test_python2_module_alias(tmp_path: Path, module: str, name: str) -> None:
    data = reduce_pickle(module, name, CMD, protocol=2)
    _assert_flagged(_scan_bytes(tmp_path, "py2.pkl", data), name)


# builtins: eval/exec/compile/__import__/getattr/setattr/open/globals/breakpoint.
# https://github.com/mmaitre314/picklescan/blob/main/tests/test_scanner.py
# https://github.com/trailofbits/fickling/pull/195 (GHSA-h4rm-mm56-xf63: builtins imports missing from AST)
@pytest.mark.parametrize(
    "name", ["eval", "exec", "compile", "__import__", "getattr", "setattr", "open", "globals", "breakpoint"]
)
def test_builtins_code_execution(tmp_path: Path, name: str) -> None:
    data = reduce_pickle("builtins", name, PY_PAYLOAD, protocol=4)
    _assert_flagged(_scan_bytes(tmp_path, f"builtins_{name}.pkl", data), name)


# =========================================================================================
# 5. Blocklist gaps: stdlib, numpy and torch functions that execute code or commands
# =========================================================================================

_GADGETS = [
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-xp4f-hrf8-rxw7
    pytest.param("ensurepip", "_run_pip", (PY_PAYLOAD,), id="ensurepip._run_pip"),
    # https://github.com/protectai/modelscan/pull/313 (timeit; picklescan Malicious21)
    pytest.param("timeit", "timeit", ("", PY_PAYLOAD), id="timeit.timeit"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-g38g-8gr9-h9xp (runpy/code/...)
    pytest.param("runpy", "_run_code", (PY_PAYLOAD, {}), id="runpy._run_code"),
    pytest.param("runpy", "run_path", ("payload.py",), id="runpy.run_path"),
    pytest.param("codeop", "compile_command", (PY_PAYLOAD,), id="codeop.compile_command"),
    pytest.param("py_compile", "compile", ("payload.py",), id="py_compile.compile"),
    pytest.param("compileall", "compile_file", ("payload.py",), id="compileall.compile_file"),
    pytest.param("pdb", "run", (PY_PAYLOAD,), id="pdb.run"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-cj3c-v495-4xqh
    pytest.param("code", "InteractiveInterpreter.runcode", ({}, PY_PAYLOAD), id="code.runcode"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-7wx9-6375-f5wh
    pytest.param("profile", "run", (PY_PAYLOAD,), id="profile.run"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-x696-vm39-cp64
    pytest.param("profile", "Profile.run", ({}, PY_PAYLOAD), id="profile.Profile.run"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-6vqj-c2q5-j97w
    pytest.param("profile", "Profile.runctx", ({}, PY_PAYLOAD, {}, {}), id="profile.Profile.runctx"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-49gj-c84q-6qm9
    pytest.param("cProfile", "run", (PY_PAYLOAD,), id="cProfile.run"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-9w88-8rmg-7g2p
    pytest.param("cProfile", "runctx", (PY_PAYLOAD, None, None), id="cProfile.runctx"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-5qwp-399c-mjwf
    pytest.param("trace", "Trace.run", ({}, PY_PAYLOAD), id="trace.Trace.run"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-g344-hcph-8vgg
    pytest.param("trace", "Trace.runctx", ({}, PY_PAYLOAD, {}, {}), id="trace.Trace.runctx"),
    # https://github.com/mmaitre314/picklescan/pull/29 (bdb/pdb debuggers)
    pytest.param("bdb", "Bdb.run", ({}, PY_PAYLOAD), id="bdb.Bdb.run"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-fqq6-7vqf-w3fg
    pytest.param("doctest", "debug_script", (PY_PAYLOAD, True), id="doctest.debug_script"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-9xph-j2h6-g47v
    pytest.param("idlelib.calltip", "get_entity", (PY_PAYLOAD,), id="idlelib.calltip.get_entity"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-8r4j-24qv-fmq9
    pytest.param("idlelib.calltip", "Calltip.fetch_tip", ({}, PY_PAYLOAD), id="idlelib.Calltip.fetch_tip"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-6w4w-5w54-rjvr
    pytest.param("idlelib.autocomplete", "AutoComplete.get_entity", ({}, PY_PAYLOAD),
                 id="idlelib.ac.get_entity"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-7cq8-mj8x-j263
    pytest.param(
        "idlelib.autocomplete", "AutoComplete.fetch_completions", ({}, PY_PAYLOAD, 1),
        id="idlelib.fetch_completions"
    ),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-3vg9-h568-4w9m
    pytest.param("idlelib.debugobj", "ObjectTreeItem.SetText", ({}, PY_PAYLOAD), id="idlelib.SetText"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-m869-42cg-3xwr
    pytest.param("idlelib.run", "Executive.runcode", ({}, PY_PAYLOAD), id="idlelib.Executive.runcode"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-j343-8v2j-ff7w
    pytest.param("idlelib.pyshell", "ModifiedInterpreter.runcommand", ({}, PY_PAYLOAD),
                 id="idlelib.runcommand"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-3gf5-cxq9-w223
    pytest.param("idlelib.pyshell", "ModifiedInterpreter.runcode", ({}, PY_PAYLOAD),
                 id="idlelib.pyshell.runcode"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-f54q-57x4-jg88
    pytest.param("lib2to3.pgen2.grammar", "Grammar.loads", ({}, b""), id="lib2to3.Grammar.loads"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-p9w7-82w4-7q8m
    pytest.param("lib2to3.pgen2.pgen", "ParserGenerator.make_label", (None, {}, '""+' + PY_PAYLOAD),
                 id="lib2to3.make_label"),
    # https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (Malicious18)
    pytest.param("pydoc", "pipepager", ("", CMD), id="pydoc.pipepager"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-vqmv-47xg-9wpr
    pytest.param("pty", "spawn", (["/bin/sh", "-c", CMD],), id="pty.spawn"),
    # https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (Malicious20)
    pytest.param("venv", "create", ("venv", False, False, True, False, CMD), id="venv.create"),
    # https://avd.aquasec.com/nvd/2025/cve-2025-1716 (CVE-2025-1716)
    pytest.param("pip", "main", (["install", "trainguard-marker-nonexistent"],), id="pip.main"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-4675-36f9-wf6r
    pytest.param("ctypes", "CDLL", (None,), id="ctypes.CDLL"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-m273-6v24-x4m4
    pytest.param("distutils.file_util", "write_file", ("pwned.env", [MARKER]), id="distutils.write_file"),
    # https://github.com/mmaitre314/picklescan/pull/29 (shutil)
    pytest.param("shutil", "rmtree", ("trainguard-marker-nonexistent", True), id="shutil.rmtree"),
    # https://github.com/promptfoo/modelaudit/pull/243
    pytest.param("webbrowser", "open", ("https://example.invalid/" + MARKER,), id="webbrowser.open"),
    # https://github.com/trailofbits/fickling/pull/240 (GHSA-5hwf-rc88-82xm)
    pytest.param("uuid", "_get_command_stdout", ("echo", MARKER), id="uuid._get_command_stdout"),
    pytest.param("_osx_support", "_read_output", (CMD,), id="_osx_support._read_output"),
    pytest.param("_aix_support", "_read_cmd_output", (CMD,), id="_aix_support._read_cmd_output"),
    # https://aithreatalert.com/cve/CVE-2026-56315 (picklescan < 1.0.4: imaplib, _pyrepl.pager, ...)
    pytest.param("imaplib", "IMAP4_stream", (CMD,), id="imaplib.IMAP4_stream"),
    pytest.param("_pyrepl.pager", "pipe_pager", ("", CMD), id="_pyrepl.pager.pipe_pager"),
    # https://github.com/mmaitre314/picklescan/pull/69
    pytest.param("mailcap", "findmatch", ({"text/plain": [{"view": CMD, "test": CMD}]}, "text/plain"),
                 id="mailcap.findmatch"),
    # https://github.com/protectai/modelscan/issues/338 (multiprocessing / mlflow / pandas)
    pytest.param("multiprocessing.util", "spawnv_passfds", (b"/bin/sh", ("/bin/sh", "-c", CMD), ()),
                 id="multiprocessing.spawnv_passfds"),
    pytest.param("mlflow.projects.backend.local", "_run_entry_point", (CMD, ".", "", ""),
                 id="mlflow.run_entry"),
    pytest.param("pandas.io.parsers.readers", "read_csv", ("https://example.invalid/" + MARKER,),
                 id="pandas.read_csv"),
    # https://github.com/trailofbits/fickling/pull/272 (GHSA-m6fh-58r7-x697)
    pytest.param("_posixsubprocess", "fork_exec", ([b"/bin/echo"], [b"/bin/echo"]), id="_posixsubprocess"),
    pytest.param("site", "addsitedir", ("/tmp/trainguard-marker",), id="site.addsitedir"),
    pytest.param("atexit", "register", (PY_PAYLOAD,), id="atexit.register"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-q77w-mwjj-7mqx (CVE-2025-10157:
    # submodule of a blocked package)
    pytest.param("asyncio.unix_events", "_UnixSubprocessTransport._start",
                 ({}, CMD, True, None, None, None, 0), id="asyncio._UnixSubprocessTransport"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-hgrh-qx5j-jfwx (network)
    pytest.param("socket", "create_connection", (("example.invalid", 80),), id="socket.create_connection"),
    pytest.param("http.client", "HTTPSConnection", ("example.invalid",), id="http.client"),
    pytest.param("urllib.request", "urlopen", ("https://example.invalid",), id="urllib.urlopen"),
    pytest.param("requests.api", "get", ("https://example.invalid",), id="requests.get"),
    pytest.param("aiohttp.client", "ClientSession", (), id="aiohttp.ClientSession"),
    # https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (dns_exfiltration.npy)
    pytest.param("ssl", "get_server_certificate", (("marker.example.invalid", 443),),
                 id="ssl.get_server_cert"),
    # https://aithreatalert.com/cve/CVE-2026-56304 (logging.FileHandler creates files)
    pytest.param("logging", "FileHandler", ("/tmp/trainguard-marker",), id="logging.FileHandler"),
    # https://github.com/trailofbits/fickling/pull/210 (_io.FileIO)
    pytest.param("_io", "FileIO", ("/tmp/trainguard-marker", "w"), id="_io.FileIO"),
    # https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (subprocess / os)
    pytest.param("subprocess", "run", (["echo", MARKER],), id="subprocess.run"),
    pytest.param("subprocess", "check_output", (["echo", MARKER],), id="subprocess.check_output"),
    pytest.param("os", "popen", (CMD,), id="os.popen"),
    pytest.param("posix", "execv", ("/bin/echo", ["echo", MARKER]), id="posix.execv"),
    # https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (Malicious22)
    pytest.param("numpy.testing._private.utils", "runstring", (PY_PAYLOAD, {}), id="numpy.runstring"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-r8g5-cgf2-4m4m
    pytest.param("numpy.f2py.crackfortran", "getlincoef", (PY_PAYLOAD, []), id="numpy.f2py.getlincoef"),
    # torch-internal gadgets: a scanner that allowlists "torch.*" misses all of these.
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-f745-w6jp-hpxx
    pytest.param("torch.utils.collect_env", "run", (CMD,), id="torch.collect_env.run"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-jhph-76pp-mggw
    pytest.param("torch.utils.collect_env", "run_and_read_all", (None, CMD), id="torch.run_and_read_all"),
    # https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (Malicious17)
    pytest.param("torch._inductor.codecache", "compile_file", ("", "", ["sh", "-c", CMD]),
                 id="torch.compile_file"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-4r9r-ch6f-vxmx
    pytest.param("torch.utils.bottleneck.__main__", "run_cprofile", (PY_PAYLOAD, {}),
                 id="torch.run_cprofile"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-4whj-rm5r-c2v8
    pytest.param("torch.utils.bottleneck.__main__", "run_autograd_prof", (PY_PAYLOAD, {}),
                 id="torch.run_autograd_prof"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-86cj-95qr-2p4f
    pytest.param("torch._dynamo.guards", "GuardBuilder.get", ({}, PY_PAYLOAD), id="torch.GuardBuilder.get"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-f4x7-rfwp-v3xw
    pytest.param("torch.fx.experimental.symbolic_shapes", "ShapeEnv.evaluate_guards_expression",
                 ({}, PY_PAYLOAD, []), id="torch.evaluate_guards_expression"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-vr7h-p6mm-wpmh
    pytest.param("torch.jit.unsupported_tensor_ops", "execWrapper", (PY_PAYLOAD, {}, {}),
                 id="torch.execWrapper"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-h3qp-7fh3-f8h4
    pytest.param("torch.utils.data.datapipes.utils.decoder", "basichandlers", ("pickle", b""),
                 id="torch.basichandlers"),
    # https://github.com/mmaitre314/picklescan/security/advisories/GHSA-vv6j-3g6g-2pvj
    pytest.param("torch.utils._config_module", "ConfigModule.load_config", ({}, b""), id="torch.load_config"),
    # https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (Malicious19)
    pytest.param("torch.serialization", "load", ("other_model.bin",), id="torch.load"),
    # https://github.com/protectai/modelscan/issues/28 (dill-based models); cloudpickle/dill/joblib
    # re-enter import or unpickling machinery (modelaudit blog: "pickle recursion")
    pytest.param("dill._dill", "_import_module", ("os",), id="dill._import_module"),
    pytest.param("dill._dill", "_create_code", (0, 0, 0, 0, 0, 0, b"", (), (), (), "", "", 0, b""),
                 id="dill._create_code"),
    pytest.param("cloudpickle.cloudpickle", "subimport", ("os",), id="cloudpickle.subimport"),
    pytest.param("joblib.numpy_pickle", "load", ("other_model.joblib",), id="joblib.load"),
]  # fmt: skip


# Each entry is a function that a blocklist-based scanner once missed; an allowlist must reject
# them all, and name the global in its finding.
@pytest.mark.parametrize(("module", "name", "args"), _GADGETS)
def test_blocklist_gap_gadget(tmp_path: Path, module: str, name: str, args: tuple[Any, ...]) -> None:
    data = reduce_pickle(module, name, *args, protocol=4)
    _assert_flagged(_scan_bytes(tmp_path, "gadget.pkl", data), name.rsplit(".", 1)[-1])


# =========================================================================================
# 6. Broken, truncated and stacked streams
# =========================================================================================


# The payload runs, *then* the stream breaks: a scanner that discards findings on a parse error
# reports clean (picklescan broken_model.pkl; "Exception-Oriented Programming").
# https://arxiv.org/html/2508.19774v1
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-9gvj-pp9x-gcfr
@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\xff", id="invalid-opcode"),
        pytest.param(b"", id="no-stop"),
        pytest.param(b"X\x10\x00\x00\x00abc", id="truncated-argument"),
        pytest.param(POP + POP + STOP, id="stack-underflow"),
        pytest.param(binget(99) + STOP, id="unknown-memo"),
        pytest.param(b"t.", id="tuple-without-mark"),
        # picklescan not_a_pickle.bin: a GLOBAL whose name is not UTF-8
        pytest.param(b"cmod\n\xf8\n.", id="invalid-utf8-global"),
    ],
)
def test_broken_pickle_after_payload(tmp_path: Path, tail: bytes) -> None:
    data = proto(2) + call(glob("builtins", "exec"), PY_PAYLOAD, protocol=2) + tail
    report = _scan_bytes(tmp_path, "broken.pkl", data, wellformed=False)
    _assert_flagged(report, "exec")


# picklescan's own broken_model.pkl: GLOBAL builtins.exec, then a BINUNICODE whose length field
# is made of text, so the stream is truncated.
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
def test_broken_model_truncated_binunicode(tmp_path: Path) -> None:
    data = b"cbuiltins\nexec\n(X>\nprint('TRAINGUARD-MARKER')tRX."
    report = _scan_bytes(tmp_path, "broken_model.pkl", data, wellformed=False)
    _assert_not_clean(report)


# Two pickles back to back: pickle.load reads the first, a second load (or torch's legacy format)
# the next (picklescan malicious6).
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
def test_concatenated_pickles_second_malicious(tmp_path: Path) -> None:
    data = benign_pickle(4) + os_system_pickle(4)
    _assert_flagged(_scan_bytes(tmp_path, "stacked.pkl", data), "system")


# Legacy torch.save (non-zip) is 4+ stacked pickles: magic number, protocol, sys_info, object.
# https://github.com/trailofbits/fickling#pytorch-polyglots ("PyTorch v0.1.10: Stacked pickle files")
def test_legacy_torch_stacked_pickles(tmp_path: Path) -> None:
    magic = proto(2) + b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + STOP
    version = proto(2) + b"M\xe9\x03" + STOP
    sys_info = wrap(value({"protocol_version": 1001, "little_endian": True}, 2), 2)
    data = magic + version + sys_info + os_system_pickle(2) + wrap(value([], 2), 2)
    _assert_flagged(_scan_bytes(tmp_path, "legacy.pt", data), "system")


# FRAME lengths are advisory to CPython's C unpickler: a frame declaring 0 or too few bytes, or
# many small frames, must not change what the scanner sees.
# https://github.com/promptfoo/modelaudit/pull/493 (FRAME used for payload obfuscation)
@pytest.mark.parametrize("variant", ["split-frames", "zero-length", "short-length", "frame-in-protocol2"])
def test_frame_tricks(tmp_path: Path, variant: str) -> None:
    head = sglob("os", "system")
    tail = MARK + u(CMD) + TUPLE + REDUCE + STOP
    if variant == "split-frames":
        data = proto(4) + frame(head) + frame(tail[:1]) + frame(tail[1:])
    elif variant == "zero-length":
        data = proto(4) + frame_header(0) + head + tail
    elif variant == "short-length":
        data = proto(4) + frame_header(3) + head + tail
    else:
        data = proto(2) + frame(glob("os", "system") + tail)
    _assert_flagged(_scan_bytes(tmp_path, "frames.pkl", data), "system")


# A self-referencing list crashed fickling's AST walk (RecursionError) - here with a payload
# appended, so a crash would hide a real finding.
# https://github.com/trailofbits/fickling/issues/196
def test_cyclic_structure_with_payload(tmp_path: Path) -> None:
    body = b"]" + MEMOIZE + binget(0) + b"a" + call(sglob("os", "system"), CMD) + b"a"
    _assert_flagged(_scan_bytes(tmp_path, "cycle.pkl", wrap(body, 4)), "system")


# Size gates: a scanner that skips big (or small) files by size never looks at the payload. A 1 GiB
# BINBYTES8 blob (sparse on disk) precedes the call.
# https://github.com/msaad00/agent-bom/pull/3326 ("size gate suppresses the security scan")
def test_payload_after_huge_blob(tmp_path: Path) -> None:
    path = tmp_path / "huge.pkl"
    size = 1 << 30
    with path.open("wb") as fh:
        fh.write(proto(4) + b"\x8e" + struct.pack("<Q", size))
        fh.seek(size, io.SEEK_CUR)  # sparse: nothing is written for the blob itself
        fh.write(POP + call(sglob("os", "system"), CMD) + STOP)
    report = scan_path([path])
    assert report.exit_code in (1, 3), _describe(report)
    if report.exit_code == 1:
        _assert_flagged(report, "system")


# Resource exhaustion before the payload (2M MARKs; 20 nested gzip layers): the scanner may give
# up, but only by failing closed.
# https://github.com/trailofbits/fickling/issues/196 (scanner DoS)
# https://www.bamsoftware.com/hacks/zipbomb/
@pytest.mark.parametrize("variant", ["many-marks", "deep-gzip"])
def test_resource_exhaustion_fails_closed(tmp_path: Path, variant: str) -> None:
    if variant == "many-marks":
        data = proto(2) + MARK * 2_000_000 + call(glob("os", "system"), CMD, protocol=2) + STOP
        name = "marks.pkl"
    else:
        data = os_system_pickle(4)
        for _ in range(20):
            data = gzip.compress(data)
        name = "deep.pkl.gz"
    _assert_not_clean(_scan_bytes(tmp_path, name, data, wellformed=False))


# CVE-2026-24747: the weights_only unpickler applied SETITEM(S) to non-dict targets (heap
# corruption) - a stream with only "safe" opcodes must not be called clean when it is invalid.
# https://github.com/pytorch/pytorch/security (CVE-2026-24747, fixed in torch 2.10)
def test_setitem_on_non_dict(tmp_path: Path) -> None:
    data = proto(2) + b"]" + binint(0) + binint(1) + SETITEM + STOP
    _assert_not_clean(_scan_bytes(tmp_path, "setitem_list.pt", data))


# =========================================================================================
# 7. Containers: PyTorch zip, zip tricks, compression, tar, numpy, joblib
# =========================================================================================


# PyTorch zip checkpoint with a malicious archive/data.pkl.
# https://github.com/mmaitre314/picklescan/blob/main/tests/test_scanner.py (archive/data.pkl mock)
def test_pytorch_zip_malicious_data_pkl(tmp_path: Path) -> None:
    data = zip_bytes(torch_zip_members(os_system_pickle(2)))
    _assert_flagged(_scan_bytes(tmp_path, "model.pt", data, wellformed=False), "system")


# TorchScript-era zips also carry constants.pkl (and other .pkl members); all are unpickled.
# https://github.com/trailofbits/fickling#pytorch-polyglots ("TorchScript v1.3: data.pkl and constants.pkl")
def test_pytorch_zip_malicious_constants_pkl(tmp_path: Path) -> None:
    members = [*torch_zip_members(benign_pickle(2)), ("archive/constants.pkl", os_system_pickle(2))]
    _assert_flagged(_scan_bytes(tmp_path, "model.pt", zip_bytes(members), wellformed=False), "system")


# Pickle inside a zip under a name that is not *.pkl (picklescan only scanned *.pkl members).
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-769v-p64c-89pr
# https://cvetodo.com/cve/CVE-2025-1889
@pytest.mark.parametrize("member", ["data.txt", "archive/config.json", "archive/data/0", "weights"])
def test_zip_member_with_non_pkl_name(tmp_path: Path, member: str) -> None:
    data = zip_bytes([(member, os_system_pickle(4))])
    _assert_flagged(_scan_bytes(tmp_path, "model.zip", data, wellformed=False), "system")


# Two members with the same name: readers disagree on which one wins (a zip parser differential of
# the "Zip exploit crashes picklescan but not PyTorch" family, GHSA-7q5r-7gvp-wc82 / GHSA-w8jq-xcqf-f792).
# https://github.com/protectai/modelscan/issues/263
@pytest.mark.parametrize("malicious_first", [True, False], ids=["malicious-first", "malicious-last"])
def test_zip_duplicate_member_names(tmp_path: Path, malicious_first: bool) -> None:
    pair = [os_system_pickle(2), benign_pickle(2)]
    if not malicious_first:
        pair.reverse()
    members = [("archive/data.pkl", pair[0]), ("archive/data.pkl", pair[1]), ("archive/version", b"3\n")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        data = zip_bytes(members)
    report = _scan_bytes(tmp_path, "dup.pt", data, wellformed=False)
    _assert_flagged(report, "system")


# Polyglot: a malicious pickle prepended to a valid torch zip. pickle.load (and torch's legacy
# path) reads the pickle; zip readers find the archive from the end.
# https://github.com/trailofbits/fickling#pytorch-polyglots
def test_pickle_prepended_to_zip_polyglot(tmp_path: Path) -> None:
    data = os_system_pickle(2) + zip_bytes(torch_zip_members(benign_pickle(2)))
    _assert_flagged(_scan_bytes(tmp_path, "polyglot.pt", data, wellformed=False), "system")


# ... and junk prepended before a zip whose data.pkl is the malicious part.
# https://github.com/trailofbits/fickling#pytorch-polyglots
def test_data_before_malicious_zip(tmp_path: Path) -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64 + zip_bytes(torch_zip_members(os_system_pickle(2)))
    _assert_flagged(_scan_bytes(tmp_path, "prefixed.pt", data, wellformed=False), "system")


# Member bytes edited after zipping so the CRC no longer matches: zipfile raises, torch loads it.
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (malicious1_crc.zip)
# https://www.plushcap.com/content/jfrog/blog/jfrog-pytorch-users-at-risk-unveiling-3-zero-day-picklescan-vulnerabilities
def test_zip_crc_mismatch(tmp_path: Path) -> None:
    data = zip_bytes(torch_zip_members(os_system_pickle(2)))
    tampered = data.replace(MARKER.encode(), b"TRAINGUARD-MARKES", 1)
    assert tampered != data
    report = _scan_bytes(tmp_path, "crc.pt", tampered, wellformed=False)
    _assert_flagged(report, "system")


# Local header file name differs from the central directory name ("datap.kl").
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (central_directory.zip)
# https://cvetodo.com/cve/CVE-2025-1944 (Sonatype, zip file name manipulation)
def test_zip_local_and_central_names_differ(tmp_path: Path) -> None:
    data = zip_bytes(torch_zip_members(os_system_pickle(2)))
    tampered = data.replace(b"archive/data.pkl", b"archive/datap.kl", 1)
    _assert_not_clean(_scan_bytes(tmp_path, "names.pt", tampered, wellformed=False))


def _set_first_member_field(data: bytes, local_off: int, central_off: int, fmt: str, val: int) -> bytes:
    out = bytearray(data)
    local = out.index(b"PK\x03\x04")
    central = out.index(b"PK\x01\x02")
    struct.pack_into(fmt, out, local + local_off, val)
    struct.pack_into(fmt, out, central + central_off, val)
    return bytes(out)


# General purpose flag bit 0 ("encrypted") set on a plain member: zipfile refuses, torch reads.
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-w8jq-xcqf-f792 (CVE-2025-1945)
def test_zip_encryption_flag_bit(tmp_path: Path) -> None:
    data = zip_bytes(torch_zip_members(os_system_pickle(2)))
    tampered = _set_first_member_field(data, 6, 8, "<H", 0x0001)
    _assert_not_clean(_scan_bytes(tmp_path, "flag.pt", tampered, wellformed=False))


# A corrupt member *before* data.pkl made modelscan abort the whole archive and report clean.
# https://github.com/protectai/modelscan/issues/354
def test_zip_corrupt_member_before_payload(tmp_path: Path) -> None:
    members = [("archive/aaa_broken.bin", b"x" * 100), *torch_zip_members(os_system_pickle(2))]
    tampered = _set_first_member_field(zip_bytes(members), 8, 10, "<H", 99)  # unknown compression
    _assert_not_clean(_scan_bytes(tmp_path, "corrupt.pt", tampered, wellformed=False))


# High-ratio member (256 MiB of zeros): must hit a limit and fail closed, not hang or pass.
# https://www.bamsoftware.com/hacks/zipbomb/
def test_zip_bomb_high_ratio_member(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pt"
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as member:
            for _ in range(256):
                member.write(chunk)
        zf.writestr("archive/version", b"3\n")
    _assert_not_clean(scan_path([path]))


# Overlapping zip bomb: thousands of central-directory entries pointing at one local member.
# https://www.bamsoftware.com/hacks/zipbomb/
def test_zip_bomb_overlapping_entries(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("archive/data.pkl", bytes(4 << 20))
    data = buf.getvalue()
    _sig, _disk, _cd_disk, _n, _total, cd_size, cd_off, _clen = struct.unpack("<4s4H2LH", data[-22:])
    record = data[cd_off : cd_off + cd_size]
    copies = 4000
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, copies, copies, cd_size * copies, cd_off, 0)
    bomb = data[:cd_off] + record * copies + eocd
    _assert_not_clean(_scan_bytes(tmp_path, "overlap.pt", bomb, wellformed=False))


# Local header sizes that disagree with the central directory (miniz trusts the directory); same
# zip-differential family as GHSA-7q5r-7gvp-wc82.
# https://github.com/protectai/modelscan/issues/263
def test_zip_local_header_sizes_lie(tmp_path: Path) -> None:
    data = zip_bytes(torch_zip_members(os_system_pickle(2)))
    out = bytearray(data)
    struct.pack_into("<II", out, 18, 5, 5)  # first local header: compressed/uncompressed size
    _assert_not_clean(_scan_bytes(tmp_path, "sizes.pt", bytes(out), wellformed=False))


# A checkpoint inside a tar.gz inside a zip: a one-level container scan never reaches it.
# https://github.com/protectai/modelscan/issues/354 (archive iteration)
def test_nested_archives(tmp_path: Path) -> None:
    checkpoint = zip_bytes(torch_zip_members(os_system_pickle(2)))
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("models/model.pt")
        info.size = len(checkpoint)
        tar.addfile(info, io.BytesIO(checkpoint))
    data = zip_bytes([("bundle/models.tar.gz", tar_buf.getvalue())])
    _assert_not_clean(_scan_bytes(tmp_path, "bundle.zip", data, wellformed=False))


# 7z archive holding a malicious pickle (picklescan malicious1.7z).
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
def test_seven_zip_archive(tmp_path: Path) -> None:
    py7zr = pytest.importorskip("py7zr")
    path = tmp_path / "model.7z"
    with py7zr.SevenZipFile(path, "w") as archive:
        archive.writestr(os_system_pickle(4), "data.pkl")
    _assert_flagged(scan_path([path]), "system")


# Stream-compressed pickles (joblib writes all of these; .pkl.gz is common on model hubs).
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
@pytest.mark.parametrize(
    ("suffix", "compress"),
    [
        ("pkl.gz", gzip.compress),
        ("pkl.bz2", bz2.compress),
        ("pkl.xz", lzma.compress),
        ("pkl.lzma", lambda b: lzma.compress(b, format=lzma.FORMAT_ALONE)),
        ("pkl.z", zlib.compress),
    ],
    ids=["gzip", "bz2", "xz", "lzma", "zlib"],
)
def test_compressed_pickle(tmp_path: Path, suffix: str, compress: Callable[[bytes], bytes]) -> None:
    data = compress(os_system_pickle(4))
    _assert_flagged(_scan_bytes(tmp_path, f"model.{suffix}", data, wellformed=False), "system")


# Legacy torch tar format: sys_info, pickle, storages, tensors members.
# https://github.com/trailofbits/fickling#pytorch-polyglots ("PyTorch v0.1.1: Tar file")
def test_legacy_torch_tar(tmp_path: Path) -> None:
    path = tmp_path / "legacy_tar.pt"
    members = {
        "sys_info": wrap(value({"protocol_version": 1000, "little_endian": True}, 2), 2),
        "pickle": os_system_pickle(2),
        "storages": wrap(value([], 2), 2),
        "tensors": wrap(value([], 2), 2),
    }
    with tarfile.open(path, "w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    _assert_flagged(scan_path([path]), "system")


# .npy object array: the body after the header is a pickle (picklescan dns_exfiltration.npy).
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py
def test_npy_object_array(tmp_path: Path) -> None:
    data = npy_object_header() + os_system_pickle(3)
    _assert_flagged(_scan_bytes(tmp_path, "array.npy", data, wellformed=False), "system")


# numpy pickles any dtype with hasobject, not just '|O': other spellings, structured dtypes with an
# object field, sub-array fields, and the 2.0/3.0 header versions.
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (object_array.npy)
@pytest.mark.parametrize(
    ("descr", "version"),
    [
        ("'O'", 1), ("'object'", 1), ("'|O8'", 1), ("[('a', '|O')]", 1),
        ("[('a', '<f4'), ('b', [('c', '|O')])]", 1), ("[('a', '|O', (2,))]", 1),
        ("'|O'", 2), ("'|O'", 3),
    ],
)  # fmt: skip
def test_npy_object_dtype_variants(tmp_path: Path, descr: str, version: int) -> None:
    data = npy_object_header(descr=descr, version=version) + os_system_pickle(3)
    _assert_flagged(_scan_bytes(tmp_path, "array.npy", data, wellformed=False), "system")


# .npz is a zip of .npy members, stored or deflated.
# https://github.com/mmaitre314/picklescan/blob/main/tests/init_data_files.py (object_arrays*.npz)
@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
def test_npz_member(tmp_path: Path, compression: int) -> None:
    npy = npy_object_header() + os_system_pickle(3)
    data = zip_bytes([("a.npy", npy), ("b.npy", npy_object_header() + benign_pickle(3))], compression)
    _assert_flagged(_scan_bytes(tmp_path, "arrays.npz", data, wellformed=False), "system")


# numpy.load on an .npz also unpickles members *without* the .npy suffix when they start with the
# .npy magic (NpzFile.__getitem__ sniffs the magic), so member names prove nothing.
# https://cvetodo.com/cve/CVE-2025-1889 (non-standard names)
def test_npz_member_without_npy_suffix(tmp_path: Path) -> None:
    npy = npy_object_header() + os_system_pickle(3)
    data = zip_bytes([("weights", npy)])
    _assert_flagged(_scan_bytes(tmp_path, "arrays.npz", data, wellformed=False), "system")


# joblib files (plain and with each compressor joblib supports).
# https://github.com/protectai/modelscan/pull/313
@pytest.mark.parametrize("compress", [0, ("zlib", 3), ("gzip", 3), ("bz2", 3), ("lzma", 3), ("xz", 3)],
                         ids=["raw", "zlib", "gzip", "bz2", "lzma", "xz"])  # fmt: skip
def test_joblib_file(tmp_path: Path, compress: Any) -> None:
    joblib = pytest.importorskip("joblib")
    path = tmp_path / "model.joblib"
    joblib.dump(_EvilReduce(), path, compress=compress)  # dump only: pickling never calls os.system
    _assert_flagged(scan_path([path]), "system")


# Pickles hiding behind other extensions / none (CVE-2025-10155, CVE-2025-1889): protocol 0/1
# has no \x80 magic, so format sniffing by magic bytes alone misses it too.
# https://github.com/promptfoo/modelaudit/pull/605
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-769v-p64c-89pr
@pytest.mark.parametrize(
    ("name", "protocol"),
    [("pytorch_model.bin", 4), ("model.bin", 0), ("model.bin", 1), ("notes.txt", 2), ("config.json", 4),
     ("model", 2), ("image.png", 0), ("model.safetensors", 4), ("model.ckpt", 2), ("model.h5", 4)],
)  # fmt: skip
def test_nonstandard_file_extension(tmp_path: Path, name: str, protocol: int) -> None:
    _assert_flagged(_scan_bytes(tmp_path, name, os_system_pickle(protocol)), "system")


# asyncio subprocess transport in a .bin file: both the gadget and the extension were missed.
# https://github.com/mmaitre314/picklescan/security/advisories/GHSA-jgw4-cr84-mqxg
def test_asyncio_subprocess_in_bin_file(tmp_path: Path) -> None:
    data = reduce_pickle(
        "asyncio.unix_events", "_UnixSubprocessTransport._start", {}, CMD, True, None, None, None, 0
    )
    _assert_flagged(_scan_bytes(tmp_path, "pytorch_model.bin", data), "_UnixSubprocessTransport")


# A folder scan must reach nested files of any name.
# https://cvetodo.com/cve/CVE-2025-1889
def test_folder_scan_finds_nested_payload(tmp_path: Path) -> None:
    write(tmp_path / "repo" / "a" / "b" / "weights.dat", os_system_pickle(2))
    write(tmp_path / "repo" / "README.md", b"# model card\n")
    _assert_flagged(scan_path([tmp_path / "repo"]), "system")


# =========================================================================================
# 8. torch: real torch.save output, TorchScript (CVE-2025-32434)
# =========================================================================================


# torch.save of an object whose __reduce__ is os.system (the common Hugging Face malware shape).
# https://jfrog.com/blog/data-scientists-targeted-by-malicious-hugging-face-ml-models-with-silent-backdoor/
@pytest.mark.torch
def test_torch_save_reduce_payload(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "evil": _EvilReduce()}, path)  # pickling does not call it
    _assert_flagged(scan_path([path]), "system")


# CVE-2025-32434: torch.load(weights_only=True) on a TorchScript archive ran its code. Such an
# archive is recognised as TorchScript and its code analysed (tests/attacks/test_torchscript.py
# holds the hostile edits); a genuine one is clean, not flagged for being TorchScript.
# https://github.com/pytorch/pytorch/security/advisories/GHSA-53q9-r3pm-6pq6
@pytest.mark.torch
def test_torchscript_archive(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    # No annotations (and no "type:" comments): TorchScript parses this source and defaults to Tensor.
    class AddOne(torch.nn.Module):
        def forward(self, x):
            return x + 1

    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent releases
        torch.jit.save(torch.jit.script(AddOne()), str(path))
    report = scan_path([path])
    assert report.exit_code == 0, _describe(report)
    assert "torchscript" in report.results[0].formats


# =========================================================================================
# 9. Benign controls (cheap sanity: the attacks above are not flagged for trivial reasons)
# =========================================================================================


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_control_plain_data_pickle_is_clean(tmp_path: Path, protocol: int) -> None:
    report = _scan_bytes(tmp_path, "data.pkl", benign_pickle(protocol))
    assert report.exit_code == 0, _describe(report)


@pytest.mark.torch
def test_control_torch_state_dict_is_clean(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "state_dict.pt"
    torch.save({"layer.weight": torch.ones(2, 2), "layer.bias": torch.zeros(2)}, path)
    report = scan_path([path])
    assert report.exit_code == 0, _describe(report)
