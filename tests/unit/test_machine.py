"""The symbolic machine follows the unpickler's stack, marks and memo, and records what it would run."""

from __future__ import annotations

import codecs
import io
import math
import pickle
import struct
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from trainguard._pickle.machine import Event, LimitError, Machine, MachineResult, PickleLimits
from trainguard._pickle.reader import Blob, PickleSyntaxError, iter_ops
from trainguard._pickle.values import CONTAINER_CAP, Call, Dct, Global, Opaque, PersRef, Seq, Value

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")


def run(data: bytes, **limits: int) -> MachineResult:
    return Machine(data, limits=PickleLimits(**limits)).run()


def ok(data: bytes) -> MachineResult:
    result = run(data)
    assert result.error is None, result.error
    return result


def kinds(result: MachineResult) -> list[tuple[str, str]]:
    return [(e.kind, e.qualname) for e in result.events]


_BUILTINS: dict[str, Any] = {
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.bytes": bytes,
    "_codecs.encode": codecs.encode,
}


def to_python(value: Value, data: bytes, built: dict[int, object] | None = None) -> object:
    """Turn a symbolic value built only from literals back into the object pickle.loads builds.

    Shared values (memo GETs) stay shared, so a stream of repeated references cannot blow up.
    """
    built = {} if built is None else built
    if id(value) in built:
        return built[id(value)]
    result: object
    if isinstance(value, Blob):
        return data[value.offset : value.offset + value.length]
    if isinstance(value, Seq):
        assert value.complete
        if value.kind in ("list", "set"):
            result = [] if value.kind == "list" else set()
            built[id(value)] = result  # before the items: a list may hold itself
            items = [to_python(v, data, built) for v in value.items]
            if isinstance(result, list):
                result.extend(items)
            else:
                assert isinstance(result, set)
                result.update(items)
            return result
        items = [to_python(v, data, built) for v in value.items]
        result = tuple(items) if value.kind == "tuple" else frozenset(items)
    elif isinstance(value, Dct):
        assert not value.dropped
        mapping: dict[object, object] = {}
        built[id(value)] = mapping
        for k, v in value.pairs:
            mapping[to_python(k, data, built)] = to_python(v, data, built)
        return mapping
    elif isinstance(value, Global):  # a harmless builtin pushed as a value, not called
        return _BUILTINS[value.qualname]
    elif isinstance(value, Call):
        # protocols 0-2 spell sets, frozensets, bytes and bytearrays as calls of these builtins
        assert isinstance(value.func, Global), value
        assert isinstance(value.args, Seq), value
        func = _BUILTINS[value.func.qualname]
        result = func(*[to_python(a, data, built) for a in value.args.items])
    else:
        assert not isinstance(value, (PersRef, Opaque)), value
        return value
    built[id(value)] = result
    return result


def same(a: object, b: object, seen: set[tuple[int, int]] | None = None) -> bool:
    """Equality that treats NaN as equal to itself, tells -0.0 from 0.0, and copes with shared
    and self-referential containers."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    if type(a) is not type(b):
        return False
    if not isinstance(a, (list, tuple, dict, set, frozenset)):
        return a == b
    seen = set() if seen is None else seen
    if (id(a), id(b)) in seen:
        return True
    seen.add((id(a), id(b)))
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        return len(a) == len(b) and all(same(x, y, seen) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        if len(a) != len(b):
            return False
        if all(k in b for k in a):
            return all(same(v, b[k], seen) for k, v in a.items())
        return sorted(map(repr, a)) == sorted(map(repr, b))  # NaN keys
    assert isinstance(a, (set, frozenset))
    assert isinstance(b, (set, frozenset))
    return a == b or sorted(map(repr, a)) == sorted(map(repr, b))


_keys = st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=8)
_leaves = _keys | st.floats() | st.binary(min_size=5000, max_size=5001)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(_keys, inner, max_size=5)
        | st.sets(_keys, max_size=5)
        | st.frozensets(_keys, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(obj=_values, protocol=st.integers(0, 5), shared=st.booleans())
def test_machine_rebuilds_what_pickle_loads_builds(obj: object, protocol: int, shared: bool) -> None:
    if shared:  # the same object twice: the second is a memo GET
        obj = [obj, obj]
    data = pickle.dumps(obj, protocol=protocol)
    result = ok(data)
    assert result.end == len(data)
    assert same(to_python(result.value, data), pickle.loads(data))
    allowed = {"builtins.set", "builtins.frozenset", "builtins.bytearray", "builtins.bytes", "_codecs.encode"}
    assert {e.qualname for e in result.events} <= allowed
    assert {e.kind for e in result.events} <= {"import", "call"}


# -- memo


def test_put_and_get() -> None:
    # 'a' PUT 0, GET 0, TUPLE2
    result = ok(b"\x80\x02X\x01\x00\x00\x00aq\x00h\x00\x86.")
    assert isinstance(result.value, Seq)
    assert result.value.kind == "tuple"
    assert result.value.items == ["a", "a"]


def test_text_put_and_get_at_protocol_0() -> None:
    data = b"(Va\np7\ng7\nt."
    assert to_python(ok(data).value, data) == pickle.loads(data) == ("a", "a")


def test_memoize_numbers_by_memo_size() -> None:
    data = b"\x80\x04\x8c\x01a\x94\x8c\x01b\x94h\x01h\x00\x86."
    assert to_python(ok(data).value, data) == pickle.loads(data) == ("b", "a")


def test_memoize_after_sparse_put_uses_len_of_memo() -> None:
    # PUT 5 ('a'); MEMOIZE ('b') lands at index len(memo) == 1, not 6
    data = b"\x80\x04\x8c\x01aq\x05\x8c\x01b\x94h\x01h\x05\x86."
    assert pickle.loads(data) == ("b", "a")
    assert to_python(ok(data).value, data) == ("b", "a")
    with pytest.raises(pickle.UnpicklingError, match="index 6"):
        pickle.loads(b"\x80\x04\x8c\x01aq\x05\x8c\x01b\x94h\x06.")
    assert run(b"\x80\x04\x8c\x01aq\x05\x8c\x01b\x94h\x06.").error is not None


def test_put_overwrites_memo_entry() -> None:
    # 'a' PUT 0, POP, 'b' PUT 0, GET 0 -> 'b'
    data = b"\x80\x02X\x01\x00\x00\x00aq\x000X\x01\x00\x00\x00bq\x000h\x00."
    assert pickle.loads(data) == "b"
    assert ok(data).value == "b"


def test_overwritten_memo_entry_hides_an_import_until_it_is_read() -> None:
    # os.system PUT 0; 'x' PUT 0 overwrites it; GET 0 pushes 'x': the import is still recorded
    data = b"\x80\x02cos\nsystem\nq\x000X\x01\x00\x00\x00xq\x000h\x00."
    result = ok(data)
    assert result.value == "x"
    assert ("import", "os.system") in kinds(result)


def test_get_of_missing_index_is_an_error() -> None:
    result = run(b"\x80\x02h\x03.")
    assert isinstance(result.error, PickleSyntaxError)
    assert "memo value not found at index 3" in str(result.error)
    assert result.error.offset == 2


def test_get_returns_the_same_symbolic_object() -> None:
    # EMPTY_LIST PUT 0, GET 0, 'x' APPEND, POP -> the first list (memo) sees the append
    data = b"\x80\x02]q\x00h\x00X\x01\x00\x00\x00xa0."
    assert pickle.loads(data) == ["x"]
    value = ok(data).value
    assert isinstance(value, Seq)
    assert value.items == ["x"]


def test_negative_put_is_an_error() -> None:
    result = run(b"N(p-1\n.")
    assert result.error is not None
    assert "negative PUT" in str(result.error)


def test_memo_limit() -> None:
    data = b"\x80\x04N" + b"\x94" * 10 + b"."
    result = run(data, max_memo=5)
    assert isinstance(result.error, LimitError)
    assert ok(data).value is None


# -- marks


def test_pop_with_empty_frame_pops_the_mark() -> None:
    data = b"N(0."
    assert pickle.loads(data) is None
    result = ok(data)
    assert result.value is None


def test_pop_with_empty_frame_restores_the_outer_stack() -> None:
    # 'a' MARK POP (pops the mark) 'b' TUPLE2 -> ('a', 'b'); were the mark kept, TUPLE2 would underflow
    data = b"\x80\x02X\x01\x00\x00\x00a(0X\x01\x00\x00\x00b\x86."
    assert pickle.loads(data) == ("a", "b")
    assert to_python(ok(data).value, data) == ("a", "b")


def test_pop_on_empty_stack_without_mark_is_an_error() -> None:
    result = run(b"0.")
    assert result.error is not None
    assert "could not find MARK" in str(result.error)


def test_pop_mark_discards_the_frame() -> None:
    data = b"N(KxK\x011."
    assert pickle.loads(data) is None
    assert ok(data).value is None


def test_tuple_without_mark_is_an_error() -> None:
    result = run(b"Nt.")
    assert result.error is not None
    assert "MARK" in str(result.error)


def test_mark_limit() -> None:
    result = run(b"(" * 11 + b"N.", max_marks=10)
    assert isinstance(result.error, LimitError)
    assert run(b"(" * 10 + b"N.", max_marks=10).error is None


def test_stop_on_empty_stack_is_an_error() -> None:
    result = run(b"(.")
    assert result.error is not None
    assert "underflow" in str(result.error)


# -- imports


def test_stack_global_resolved_from_memo_strings() -> None:
    data = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x8c\x01x\x94h\x00h\x01\x93."
    result = ok(data)
    assert result.events == [
        Event("import", len(data) - 2, module="os", name="system", detail="STACK_GLOBAL")
    ]
    assert isinstance(result.value, Global)
    assert result.value.qualname == "os.system"


def test_stack_global_resolved_from_overwritten_memo_strings() -> None:
    # memo 0 first holds 'math', then 'os'; the import must use what GET returns now
    data = b"\x80\x04\x8c\x04math\x94\x8c\x02os\x94h\x01r\x00\x00\x00\x000\x8c\x06system\x94h\x00h\x02\x93."
    result = ok(data)
    assert kinds(result) == [("import", "os.system")]


@pytest.mark.parametrize(
    ("body", "described"),
    [
        pytest.param(b"NN", "None", id="none"),
        pytest.param(b"K\x01\x8c\x06system", "1", id="int-module"),
        pytest.param(b"\x8c\x02os)", "a tuple", id="tuple-name"),
        pytest.param(b"\x8c\x08builtins\x8c\x03str\x93)R\x8c\x06system", "calling builtins.str", id="call"),
        pytest.param(b"\x8c\x01x\x8c\x01y\x93\x8c\x06system", "x.y", id="import-as-module"),
    ],
)
def test_unresolved_stack_global(body: bytes, described: str) -> None:
    result = ok(b"\x80\x04" + body + b"\x93.")
    unresolved = [e for e in result.events if e.kind == "unresolved-import"]
    assert len(unresolved) == 1
    assert described in unresolved[0].detail
    assert isinstance(result.value, Opaque)


def test_stack_global_underflow_is_an_error() -> None:
    result = run(b"\x80\x04\x8c\x02os\x93.")
    assert result.error is not None


@pytest.mark.parametrize("proto", [b"", b"\x80\x01", b"\x80\x02"])
def test_python2_names_are_mapped_below_protocol_3(proto: bytes) -> None:
    result = ok(proto + b"c__builtin__\neval\n.")
    [event] = result.events
    assert (event.kind, event.module, event.name) == ("import", "builtins", "eval")
    assert event.written_as == "__builtin__.eval"


@pytest.mark.parametrize("proto", [b"\x80\x03", b"\x80\x04", b"\x80\x05"])
def test_python2_names_are_kept_from_protocol_3(proto: bytes) -> None:
    result = ok(proto + b"c__builtin__\neval\n.")
    [event] = result.events
    assert (event.kind, event.module, event.name) == ("import", "__builtin__", "eval")
    assert event.written_as == ""


def test_python2_name_mapping_for_renamed_names_and_modules() -> None:
    result = ok(b"\x80\x02c__builtin__\nxrange\ncUserDict\nUserDict\ncCookie\nSimpleCookie\n.")
    assert kinds(result) == [
        ("import", "builtins.range"),
        ("import", "collections.UserDict"),
        ("import", "http.cookies.SimpleCookie"),
    ]


def test_python2_mapping_applies_to_stack_global_and_inst() -> None:
    result = ok(b"\x80\x02X\x0b\x00\x00\x00__builtin__X\x04\x00\x00\x00eval\x93(i__builtin__\nset\n.")
    assert kinds(result) == [
        ("import", "builtins.eval"),
        ("import", "builtins.set"),
        ("call", "builtins.set"),
    ]


def test_reduce_records_import_then_call() -> None:
    data = b"cos\nsystem\n(S'ls'\ntR."
    result = ok(data)
    assert kinds(result) == [("import", "os.system"), ("call", "os.system")]
    assert result.events[1].detail == "REDUCE"


def test_call_of_a_call_is_non_constant() -> None:
    result = ok(b"\x80\x02cm\nf\n)R)R.")
    assert [e.kind for e in result.events] == ["import", "call", "non-constant-call"]


# -- global state


def test_build_on_a_global_emits_global_attribute_write() -> None:
    data = b"\x80\x02cmodule\nName\n}X\x01\x00\x00\x00aK\x01sb."
    result = ok(data)
    writes = [e for e in result.events if e.kind == "global-attribute-write"]
    assert len(writes) == 1
    assert writes[0].qualname == "module.Name"
    assert writes[0].pos == len(data) - 2


def test_build_on_a_call_records_state_without_global_write() -> None:
    result = ok(b"\x80\x02cm\nC\n)\x81}b.")
    assert "global-attribute-write" not in [e.kind for e in result.events]
    assert isinstance(result.value, Call)
    assert len(result.value.states) == 1


@pytest.mark.parametrize(
    ("ops", "op_name"),
    [
        pytest.param(b"N", b"a", id="APPEND"),
        pytest.param(b"(N", b"e", id="APPENDS"),
        pytest.param(b"NN", b"s", id="SETITEM"),
        pytest.param(b"(NN", b"u", id="SETITEMS"),
        pytest.param(b"(N", b"\x90", id="ADDITEMS"),
    ],
)
def test_mutating_a_global_emits_global_mutation(ops: bytes, op_name: bytes) -> None:
    result = ok(b"\x80\x04cm\nregistry\n" + ops + op_name + b".")
    assert [e.kind for e in result.events] == ["import", "global-mutation"]
    assert result.events[1].qualname == "m.registry"


@pytest.mark.parametrize(
    ("op", "code"),
    [(b"\x82\x01", 1), (b"\x83\x00\x01", 256), (b"\x84\x00\x00\x01\x00", 65536)],
    ids=["EXT1", "EXT2", "EXT4"],
)
def test_extension_opcodes_emit_extension(op: bytes, code: int) -> None:
    result = ok(b"\x80\x02" + op + b".")
    assert result.events == [Event("extension", 2, detail=f"extension code {code}")]
    assert isinstance(result.value, Opaque)


def test_calling_an_extension_is_a_non_constant_call() -> None:
    result = ok(b"\x80\x02\x82\x01)R.")
    assert [e.kind for e in result.events] == ["extension", "non-constant-call"]


# -- errors


def test_events_are_recorded_before_an_error() -> None:
    # os.system('ls') is called, then the stream is broken: the call already happened on load
    prefix = b"cos\nsystem\n(S'ls'\ntR"
    result = run(prefix + b"\xff.")
    assert isinstance(result.error, PickleSyntaxError)
    assert result.error.offset == len(prefix)
    assert result.end == len(prefix)
    assert kinds(result) == [("import", "os.system"), ("call", "os.system")]


def test_events_are_recorded_before_truncation() -> None:
    result = run(b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x02ls\x85R")
    assert result.error is not None
    assert kinds(result) == [("import", "os.system"), ("call", "os.system")]


def test_events_are_recorded_before_a_semantic_error() -> None:
    result = run(b"cos\nsystem\n(S'ls'\ntRu.")  # SETITEMS with no mark left
    assert result.error is not None
    assert kinds(result) == [("import", "os.system"), ("call", "os.system")]


def test_op_limit_stops_the_machine() -> None:
    result = run(b"N0" * 100 + b"N.", max_ops=50)
    assert isinstance(result.error, LimitError)
    assert result.ops == 51


def test_stack_limit_counts_marked_items() -> None:
    result = run(b"NNN(NNN(NNN.", max_stack=8)
    assert isinstance(result.error, LimitError)


def test_frame_longer_than_the_rest_is_read_as_far_as_it_goes() -> None:
    # pickle's pure-Python unpickler (joblib's) accepts it and runs the opcodes inside.
    result = run(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00cos\nsystem\n.")
    assert result.error is None
    assert [e.qualname for e in result.events if e.kind == "import"] == ["os.system"]


def test_persistent_ids_are_collected() -> None:
    result = ok(b"\x80\x02X\x03\x00\x00\x00pidQ(Pabc\nl.")
    assert len(result.persistent_ids) == 2
    assert result.persistent_ids[0].pid == "pid"
    assert result.persistent_ids[1].pid == "abc"


def test_containers_are_capped() -> None:
    data = pickle.dumps(list(range(CONTAINER_CAP + 10)), protocol=2)
    value = ok(data).value
    assert isinstance(value, Seq)
    assert len(value.items) == CONTAINER_CAP
    assert value.dropped == 10
    assert not value.complete


def test_start_and_end_select_one_pickle() -> None:
    first = pickle.dumps("a", protocol=2)
    second = pickle.dumps("b", protocol=2)
    data = first + second
    result = Machine(data, len(first)).run()
    assert result.error is None
    assert result.value == "b"
    assert result.end == len(data)
    truncated = Machine(data, 0, len(first) - 1).run()
    assert truncated.error is not None


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_ops"):
        PickleLimits(max_ops=0)


# -- differential: where the real unpickler loads a stream, the machine must load it to the same value

# Harmless names, as written in a stream; pickle's own find_class applies the Python 2 map (or not)
# by the protocol in force, and then imports them for real.
_HARMLESS = {
    (module, name) for name in ("set", "frozenset", "bytes") for module in ("builtins", "__builtin__")
} | {("_codecs", "encode")}


class _Refused(Exception):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """The C unpickler pickle.load uses, refusing every import but a few harmless builtins."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _HARMLESS:
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _has_huge_put(data: bytes) -> bool:
    """CPython's unpickler grows its memo array to twice a PUT index: a mutated LONG_BINPUT costs GBs."""
    try:
        for op in iter_ops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(op.arg, int) and op.arg > 100_000:
                return True
    except PickleSyntaxError:
        pass
    return False


_DIFF_SEEDS = [
    {"a": [1, 2.5, None, True], "b": (b"xy", "z"), "c": {1, 2}, "d": frozenset([3])},
    [[1], [2, [3]], "s", "s"],
    ("t", "t", b"", (1, 2, 3)),
    {"k": {"k2": (1, 2, 3)}, "j": [b"q" * 5]},
    1 << 70,
    "hé",
]
_OPCODE_BYTES = list(b"()0123.NeusbR\x81\x85\x86\x87\x8f\x90\x91\x93\x94]}adhjlpqrtgIKJMXV\x8c\x80\x95")


@settings(max_examples=1000, deadline=None)
@given(
    seed=st.sampled_from(_DIFF_SEEDS),
    protocol=st.integers(0, 5),
    edits=st.lists(
        st.tuples(
            st.integers(0, 3), st.integers(0, 10_000), st.sampled_from(_OPCODE_BYTES), st.integers(1, 8)
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_machine_loads_whatever_the_real_unpickler_loads(
    seed: object, protocol: int, edits: list[tuple[int, int, int, int]]
) -> None:
    data = pickle.dumps(seed, protocol=protocol)
    for kind, where, byte, width in edits:
        i = where % len(data)
        if kind == 0:
            data = data[:i] + bytes([byte]) + data[i + 1 :]
        elif kind == 1:
            data = data[:i] + data[i + 1 :]
        elif kind == 2:
            data = data[:i] + bytes([byte]) + data[i:]
        else:
            data = data[:i] + data[i : i + width] + data[i:]
        if not data:
            return
    if _has_huge_put(data):
        event("a PUT index so large that CPython would allocate gigabytes of memo")
        return
    try:
        real = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception:  # refused imports, errors of any kind: the machine may go further, never less far
        event("the real unpickler refused the stream")
        return
    event("the real unpickler loaded the stream")
    result = Machine(data).run()
    assert result.error is None, (data, result.error)
    if any(op.name == "ADDITEMS" for op in iter_ops(data)):
        event("ADDITEMS: the machine does not follow what it adds to a call's result")
        return
    try:
        rebuilt = to_python(result.value, data)
    except RecursionError:  # a tuple that holds itself through a list
        event("self-referential tuple")
        return
    assert same(rebuilt, real), data
