"""The bounded marshal reader: same structure as `marshal.loads` on streams CPython writes, one canonical
digest for streams that differ only in ref flags, string forms or set order, and a clean error (never a
crash, hang or big allocation) on hostile bytes. `marshal.loads` is only ever called on bytes the test
made itself."""

from __future__ import annotations

import marshal
import math
import struct
import sys
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.envcheck._marshal import MarshalCode, MarshalError, MarshalLimits, canonical_digest, decode
from trainguard.errors import LimitExceeded, UndecidableError

# Large generated values make hypothesis warn about long reprs; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

SOURCE = '''
import os
X = (1, 2.5, -3j, b"raw", "text", "\\u20ac\\udc80", None, True, False, ...)
Y = (2**100, -(2**70), frozenset({1, "a"}), 1e300, -0.0)
def f(a, /, b, *args, c=1, **kw):
    total = 0
    for item in {"x", "y", "z"}:
        total += len(item)
    def inner():
        return a + total
    return inner, [a, b], {"k": c}
class K:
    """doc"""
    def method(self) -> int:
        try:
            return 1 // 0
        except ZeroDivisionError:
            return -1
async def g():
    async with x as y:
        await y
lam = lambda q: q if q else 0.0
'''


def i32(n: int) -> bytes:
    return struct.pack("<i", n)


def digest(data: bytes) -> bytes:
    return canonical_digest(data)[0]


def same(ours: object, theirs: object) -> bool:
    """Structural equality with exact types; floats by their bits; code objects field by field."""
    if isinstance(theirs, types.CodeType):
        return isinstance(ours, MarshalCode) and same_code(ours, theirs)
    if type(ours) is not type(theirs):
        return False
    if isinstance(theirs, float):
        assert isinstance(ours, float)
        return struct.pack("<d", ours) == struct.pack("<d", theirs)
    if isinstance(theirs, complex):
        assert isinstance(ours, complex)
        return same(ours.real, theirs.real) and same(ours.imag, theirs.imag)
    if isinstance(theirs, (tuple, list)):
        assert isinstance(ours, (tuple, list))
        return len(ours) == len(theirs) and all(same(a, b) for a, b in zip(ours, theirs, strict=True))
    if isinstance(theirs, dict):
        assert isinstance(ours, dict)
        return same(list(ours.items()), list(theirs.items()))
    if isinstance(theirs, (set, frozenset)):
        assert isinstance(ours, (set, frozenset))
        left = list(theirs)  # match element by element: nan is not equal to itself
        for item in ours:
            match = next((i for i, other in enumerate(left) if same(item, other)), None)
            if match is None:
                return False
            del left[match]
        return not left
    return ours == theirs


def same_code(ours: MarshalCode, code: types.CodeType) -> bool:
    ints = (
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_stacksize,
        code.co_flags,
        code.co_firstlineno,
    )
    (
        co_code,
        consts,
        names,
        localsplusnames,
        localspluskinds,
        filename,
        name,
        qualname,
        linetable,
        exceptiontable,
    ) = ours.objects
    assert isinstance(localsplusnames, tuple)
    assert isinstance(localspluskinds, bytes)
    return (
        ours.ints == ints
        and co_code == code.co_code
        and same(consts, code.co_consts)
        and names == code.co_names
        and set(localsplusnames) == {*code.co_varnames, *code.co_cellvars, *code.co_freevars}
        and len(localspluskinds) == len(localsplusnames)
        and filename == ours.filename == code.co_filename
        and name == code.co_name
        and qualname == code.co_qualname
        and linetable == code.co_linetable
        and exceptiontable == code.co_exceptiontable
    )


hashable = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**2000), max_value=2**2000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.complex_numbers(allow_nan=True, allow_infinity=True)
    | st.binary(max_size=40)
    | st.text(max_size=20)
    | st.text(alphabet=st.characters(max_codepoint=127), max_size=300)
    | st.just(Ellipsis)
    | st.just(StopIteration),
    lambda inner: (
        st.tuples(inner, inner) | st.lists(inner, max_size=4).map(tuple) | st.frozensets(inner, max_size=4)
    ),
    max_leaves=20,
)
values = st.recursive(
    hashable,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(hashable, inner, max_size=4)
        | st.sets(hashable, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(values, st.integers(min_value=0, max_value=marshal.version))
def test_decode_equals_marshal_loads_on_streams_marshal_wrote(value: Any, version: int) -> None:
    data = marshal.dumps(value, version)
    ours, end = decode(data)
    assert end == len(data)
    assert same(ours, marshal.loads(data))


@settings(max_examples=200, deadline=None)
@given(values)
def test_digest_does_not_depend_on_the_marshal_version(value: Any) -> None:
    # Version 2 writes no refs, 3 adds refs, 4 short ascii forms. (0 and 1 write floats as text,
    # which loses NaN payloads: CPython reads those back as other floats too.)
    digests = {digest(marshal.dumps(value, version)) for version in range(2, marshal.version + 1)}
    assert len(digests) == 1
    assert digest(marshal.dumps(value, 0)) == digest(marshal.dumps(value, 1))


def compiled() -> types.CodeType:
    return compile(SOURCE, "/site-packages/pkg/mod.py", "exec", dont_inherit=True)


def test_code_objects_decode_field_by_field() -> None:
    code = compiled()
    data = marshal.dumps(code)
    ours, end = decode(data)
    assert end == len(data)
    assert isinstance(ours, MarshalCode)
    assert same_code(ours, code)
    assert same(ours, marshal.loads(data))


@pytest.mark.parametrize("module", ["dataclasses", "asyncio.base_events", "typing", "json.decoder"])
def test_stdlib_modules_decode_like_marshal_loads(module: str) -> None:
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    code = compile(Path(spec.origin).read_bytes(), spec.origin, "exec", dont_inherit=True)
    data = marshal.dumps(code)
    ours, _ = decode(data)
    assert same(ours, marshal.loads(data))
    assert digest(data) == digest(marshal.dumps(code, 2))


def test_flag_ref_flipped_stream_has_the_same_digest() -> None:
    code = compiled()
    plain = marshal.dumps(code, 2)  # no FLAG_REF anywhere
    flagged = marshal.dumps(code)
    assert plain != flagged
    assert digest(plain) == digest(flagged)
    # Real variance: FLAG_REF is set on objects with more than one reference when dumps runs.
    held = [*code.co_consts, *code.co_names]
    assert digest(marshal.dumps(code)) == digest(flagged)
    del held


def test_ref_equals_the_object_written_again() -> None:
    inline = b")\x02" + b"\xfa\x03abc" + b"\xfa\x03abc"
    by_ref = b")\x02" + b"\xfa\x03abc" + b"r" + i32(0)
    unflagged = b")\x02" + b"z\x03abc" + b"z\x03abc"
    assert marshal.loads(by_ref) == marshal.loads(inline) == ("abc", "abc")
    assert digest(inline) == digest(by_ref) == digest(unflagged)


@pytest.mark.parametrize(
    "form",
    [
        b"u" + i32(3) + b"abc",
        b"t" + i32(3) + b"abc",
        b"a" + i32(3) + b"abc",
        b"A" + i32(3) + b"abc",
        b"z\x03abc",
        b"Z\x03abc",
        b"\xda\x03abc",
    ],
)
def test_every_string_form_is_the_same_string(form: bytes) -> None:
    assert decode(form)[0] == "abc" == marshal.loads(form)
    assert digest(form) == digest(b"u" + i32(3) + b"abc")


def test_ascii_forms_read_as_latin1_like_cpython() -> None:
    data = b"z\x02\xe9\xff"
    assert decode(data)[0] == marshal.loads(data) == "\xe9\xff"
    assert digest(data) == digest(marshal.dumps("\xe9\xff"))


def test_int_forms_compare_by_value() -> None:
    assert digest(b"i" + i32(5)) == digest(b"l" + i32(1) + b"\x05\x00") == digest(b"I" + struct.pack("<q", 5))
    assert digest(b"l" + i32(-1) + b"\x05\x00") == digest(b"i" + i32(-5))
    assert digest(b"l" + i32(0)) == digest(b"i" + i32(0))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (True, 1),
        (1, 1.0),
        (0.0, -0.0),
        (b"a", "a"),
        ((1, 2), (2, 1)),
        ((1, 2), [1, 2]),
        (frozenset({1}), {1}),
        (None, ()),
        (math.nan, -math.nan),
        ({"a": 1}, {"a": 2}),
    ],
)
def test_digest_keeps_what_changes_meaning(a: Any, b: Any) -> None:
    assert digest(marshal.dumps(a)) != digest(marshal.dumps(b))


def test_set_order_does_not_matter() -> None:
    one = b">" + i32(2) + b"i" + i32(1) + b"z\x01a"
    two = b">" + i32(2) + b"z\x01a" + b"i" + i32(1)
    assert marshal.loads(one) == marshal.loads(two)
    assert digest(one) == digest(two)


def test_code_field_change_changes_digest() -> None:
    code = compiled()
    assert digest(marshal.dumps(code)) != digest(marshal.dumps(code.replace(co_firstlineno=2)))
    assert digest(marshal.dumps(code)) != digest(marshal.dumps(code.replace(co_filename="/elsewhere.py")))
    assert digest(marshal.dumps(code)) != digest(marshal.dumps(code.replace(co_consts=(*code.co_consts, 0))))


@pytest.mark.parametrize(
    "data",
    [
        b"{NN0",  # a dict ends at a NULL key
        b"{NNN0",  # a NULL value ends it too, dropping the key
        b"{"
        + b"\xfa\x01k"
        + b"i"
        + i32(1)
        + b"r"
        + i32(0)
        + b"i"
        + i32(2)
        + b"0",  # duplicate key: last wins
        b"\xce",  # FLAG_REF on a singleton takes no slot
        b")\x02\xce\xfa\x01ar" + i32(0),
        b"f\x031.\x00",
        b"x\x031e9\x04-inf",
        b"f\x03nan",
        b"\xbc" + i32(0),
        b">" + i32(0),
        b"I" + struct.pack("<q", -(2**62)),
        b"l" + i32(3) + b"\xff\x7f\xff\x7f\x01\x00",
    ],
)
def test_hand_written_streams_read_like_marshal_loads(data: bytes) -> None:
    assert same(decode(data)[0], marshal.loads(data))


def test_trailing_bytes_are_reported_by_offset() -> None:
    assert decode(b"N" + b"junk") == (None, 1)
    assert canonical_digest(b"N" + b"junk")[1] == 1


BAD = [
    b"",
    b"?",
    b"\x00",
    b"0",  # NULL at the top
    b")\x010",  # NULL in a tuple
    b"[" + i32(1) + b"0",
    b"{N",
    b"r" + i32(0),  # no such ref
    b")\x02\xfa\x01ar" + i32(1),
    b"\xa9\x01r" + i32(0),  # a tuple that contains itself
    b"\xdb" + i32(1) + b"r" + i32(0),  # a list that contains itself
    b"\xbe" + i32(1) + b"r" + i32(0),
    b"l" + i32(1) + b"\x00\x80",  # digit out of range
    b"l" + i32(1) + b"\x00\x00",  # unnormalized
    b"u" + i32(2) + b"\xff\xfe",  # invalid utf-8
    b"f\x03 1.",  # whitespace
    b"f\x031_0",
    b"f\x03abc",
    b"f\x00",
    b"g\x00\x00",
    b"y" + bytes(15),
    b"z\x05abc",
    b"i\x01\x02",
    b"c" + i32(0),
]


@pytest.mark.parametrize("data", BAD)
def test_malformed_streams_are_marshal_errors(data: bytes) -> None:
    with pytest.raises(MarshalError):
        decode(data)
    with pytest.raises(MarshalError):
        canonical_digest(data)


@pytest.mark.parametrize("code", [b"s", b"u", b"t", b"a", b"A", b"(", b"[", b"<", b">", b"l"])
@pytest.mark.parametrize("length", [2**31 - 1, -(2**31), 2**30])
def test_huge_length_fields_allocate_nothing(code: bytes, length: int) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(MarshalError):
            canonical_digest(code + i32(length) + b"N" * 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("code", [b"s", b"u", b"t", b"a", b"A", b"(", b"[", b"<", b">"])
def test_negative_lengths_are_errors(code: bytes) -> None:
    with pytest.raises(MarshalError):
        canonical_digest(code + i32(-1) + b"N" * 8)


def test_deep_nesting_stops_at_the_depth_limit_without_recursion() -> None:
    data = b")\x01" * 100_000 + b"N"
    with pytest.raises(LimitExceeded):
        canonical_digest(data)
    assert sys.getrecursionlimit() < 100_000
    shallow = b")\x01" * 1999 + b"N"
    assert canonical_digest(shallow)[1] == len(shallow)
    assert canonical_digest(shallow) == canonical_digest(b")\x01" * 1999 + b"N")
    with pytest.raises(LimitExceeded):
        canonical_digest(shallow, limits=MarshalLimits(max_depth=10))


def test_exponential_ref_expansion_costs_only_its_bytes() -> None:
    # A list of 300 tuples, each holding two refs to the one before: 2**300 strings if expanded.
    laughs = bytearray(b"[" + i32(301) + b"\xfa\x01a")
    for level in range(300):
        laughs += b"\xa9\x02" + b"r" + i32(level) + b"r" + i32(level)
    start = time.perf_counter()
    _, end = canonical_digest(bytes(laughs))
    value, _ = decode(bytes(laughs))
    assert time.perf_counter() - start < 2
    assert end == len(laughs)
    assert isinstance(value, list)
    assert value[2] == (value[1], value[1])


def test_object_count_limit() -> None:
    data = b"[" + i32(1000) + b"N" * 1000
    with pytest.raises(LimitExceeded):
        canonical_digest(data, limits=MarshalLimits(max_objects=100))
    with pytest.raises(LimitExceeded):
        canonical_digest(data, limits=MarshalLimits(max_bytes=100))
    assert canonical_digest(data)[1] == len(data)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        MarshalLimits(max_depth=0)


def test_every_truncation_of_a_real_stream_is_a_clean_error() -> None:
    data = marshal.dumps(compiled())
    for cut in range(len(data)):
        with pytest.raises(MarshalError):
            canonical_digest(data[:cut])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_exceptions(data: bytes) -> None:
    try:
        canonical_digest(data)
        decode(data)
    except UndecidableError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutated_code_streams_never_escape_as_other_exceptions(data: st.DataObject) -> None:
    stream = bytearray(marshal.dumps(compiled()))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        at = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
        stream[at] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        canonical_digest(bytes(stream))
        decode(bytes(stream))
    except UndecidableError:
        pass


def test_python_310_code_layout() -> None:
    # argcount posonly kwonly nlocals stacksize flags | 8 objects | firstlineno | lnotab
    fields = b"N" * 8
    data = b"c" + b"".join(i32(n) for n in (1, 0, 0, 1, 2, 64)) + fields + i32(7) + b"s" + i32(0)
    code, end = decode(data, version=(3, 10))
    assert end == len(data)
    assert isinstance(code, MarshalCode)
    assert code.ints == (1, 0, 0, 1, 2, 64, 7)
    assert len(code.objects) == 9
    with pytest.raises(MarshalError):
        decode(data, version=(3, 11))
    with pytest.raises(ValueError, match="not supported"):
        decode(data, version=(3, 7))
