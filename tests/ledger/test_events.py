"""Events: canonical RFC 8785 bytes, strict parsing back, and errors that name the field."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import re
import struct
import types
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.errors import UsageError, VerificationFailed
from trainguard.ledger import _events
from trainguard.ledger._events import MAX_ENTRY_BYTES, Actor, EntryError, Event, new_event

ACTOR = Actor(user="alice", uid=1000, host="node-7", pid=4242)
TIME = "2026-11-27T23:35:08.123456Z"


def event(payload: Any = None, **fields: Any) -> Event:
    base: dict[str, Any] = {
        "type": "checkpoint.save",
        "time": TIME,
        "actor": ACTOR,
        "run_id": "run-1",
        "rank": 0,
        "payload": {} if payload is None else payload,
    }
    base.update(fields)
    return Event(**base)


def test_canonical_bytes() -> None:
    e = event({"step": 10, "path": "/ckpt/a.pt", "loss": 0.5, "ok": True, "tags": ["x", None]})
    assert e.canonical() == (
        b'{"actor":{"host":"node-7","pid":4242,"uid":1000,"user":"alice"},'
        b'"payload":{"loss":0.5,"ok":true,"path":"/ckpt/a.pt","step":10,"tags":["x",null]},'
        b'"rank":0,"run_id":"run-1","time":"2026-11-27T23:35:08.123456Z","type":"checkpoint.save"}'
    )
    assert Event.from_canonical(e.canonical()) == e


def test_none_fields_are_null() -> None:
    e = event(run_id=None, rank=None)
    assert b'"rank":null,"run_id":null' in e.canonical()
    assert Event.from_canonical(e.canonical()) == e


def test_new_event_defaults() -> None:
    e = new_event("scan.result", {"verdict": "clean"}, run_id="r", rank=3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e.time)
    assert e.actor == Actor.current()
    assert e.actor.pid == os.getpid()
    assert e.payload == {"verdict": "clean"}
    assert Event.from_canonical(e.canonical()) == e
    assert new_event("x").payload == {}
    assert (
        new_event("x", actor=ACTOR, time=TIME).canonical()
        == event(type="x", run_id=None, rank=None).canonical()
    )


def test_actor_without_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_user() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(getpass, "getuser", no_user)
    monkeypatch.setattr(_events, "_current", {})
    actor = Actor.current()
    assert actor.user == str(actor.uid)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": ""}, "event type"),
        ({"type": 5}, "event type"),
        ({"time": "2026-11-27T23:35:08Z"}, "RFC 3339"),
        ({"time": "2026-13-27T23:35:08.123456Z"}, "RFC 3339"),
        ({"time": "2026-11-27T23:35:08.123456+00:00"}, "RFC 3339"),
        ({"actor": {"user": "a"}}, "actor"),
        ({"run_id": 7}, "run_id"),
        ({"rank": -1}, "rank"),
        ({"rank": True}, "rank"),
        ({"payload": [1, 2]}, "payload"),
    ],
)
def test_bad_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        event(**fields)


def test_bad_actor() -> None:
    with pytest.raises(UsageError, match="uid"):
        Actor(user="a", uid="0", host="h", pid=1)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="host"):
        Actor(user="a", uid=0, host=None, pid=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"loss": float("nan")}, r"payload\['loss'\] is nan"),
        ({"x": [1, float("inf")]}, r"payload\['x'\]\[1\] is inf"),
        ({"big": 2**53}, r"payload\['big'\] is the integer 9007199254740992"),
        ({"neg": -(2**60)}, r"payload\['neg'\] is the integer"),
        ({1: "a"}, "key 1"),
        ({"a": {(1, 2): 3}}, r"payload\['a'\] has the key \(1, 2\)"),
        ({"b": b"bytes"}, r"payload\['b'\] is a bytes"),
        ({"s": {1, 2}}, r"payload\['s'\] is a set"),
        ({"t": "\ud800"}, r"payload\['t'\] contains a lone surrogate"),
        ({"\udfff": 1}, "a key of payload contains a lone surrogate"),
    ],
)
def test_payload_errors_name_the_value(payload: dict[Any, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        event(payload).canonical()


def test_fixed_field_errors_name_the_field() -> None:
    with pytest.raises(UsageError, match="actor host contains a lone surrogate"):
        event(actor=Actor(user="a", uid=0, host="h\ud800", pid=1)).canonical()
    with pytest.raises(UsageError, match="run_id contains a lone surrogate"):
        event(run_id="\udc00").canonical()


def test_deep_payload_is_refused() -> None:
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(UsageError, match="nested"):
        event({"d": deep}).canonical()


def test_other_mappings_and_tuples_are_json() -> None:
    e = event(types.MappingProxyType({"b": (1, 2), "a": OrderedDict(z=1, y=2)}))
    assert b'"payload":{"a":{"y":2,"z":1},"b":[1,2]}' in e.canonical()
    back = Event.from_canonical(e.canonical())
    assert back.payload == {"a": {"y": 2, "z": 1}, "b": [1, 2]}


def test_oversized_event() -> None:
    with pytest.raises(UsageError, match="at most"):
        event({"blob": "x" * MAX_ENTRY_BYTES}).canonical()
    with pytest.raises(EntryError, match="above the"):
        Event.from_canonical(b" " * (MAX_ENTRY_BYTES + 1))


# --- RFC 8785 examples through event payloads -------------------------------------------------------


def test_rfc8785_section_3_2_2_example() -> None:
    # RFC 8785 3.2.2 and 3.2.3: the sample input and its canonical form.
    raw = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )
    expected = (
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    ).encode()
    data = event(json.loads(raw)).canonical()
    assert b'"payload":' + expected + b"," in data
    assert Event.from_canonical(data).payload == json.loads(raw)


def test_rfc8785_section_3_2_3_sorting() -> None:
    raw = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    keys = ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    data = event(raw).canonical()
    payload = json.loads(data)["payload"]
    assert list(payload) == keys
    assert Event.from_canonical(data).payload == raw


# RFC 8785 Appendix B: IEEE 754 doubles and their canonical text.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "text"), APPENDIX_B)
def test_rfc8785_appendix_b_numbers(bits: str, text: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    data = event({"n": value}).canonical()
    assert b'"payload":{"n":' + text.encode() + b"}" in data
    # Doubles written in integer form (2**53, 2.9e20) come back as the same double.
    back = Event.from_canonical(data)
    assert back.payload["n"] == value
    assert back.canonical() == data


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_rfc8785_appendix_b_refused(bits: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    with pytest.raises(UsageError, match=r"payload\['n'\]"):
        event({"n": value}).canonical()


# --- Strict parsing --------------------------------------------------------------------------------


GOOD = event({"a": 1, "b": [1.5, "x"]}).canonical()


def _mutations() -> list[tuple[str, bytes]]:
    doc = json.loads(GOOD)
    out = [
        ("whitespace", GOOD.replace(b",", b", ", 1)),
        ("trailing newline", GOOD + b"\n"),
        ("leading space", b" " + GOOD),
        ("pretty", json.dumps(doc, indent=1, sort_keys=True).encode()),
        ("unsorted", json.dumps(dict(reversed(doc.items())), separators=(",", ":")).encode()),
        ("ascii escapes", GOOD.replace(b'"x"', b'"\\u0078"')),
        ("float form", GOOD.replace(b"1.5", b"1.50")),
        ("exponent form", GOOD.replace(b'"a":1', b'"a":1e0')),
        ("negative zero", GOOD.replace(b'"a":1', b'"a":-0')),
        ("unsafe integer", GOOD.replace(b'"a":1', b'"a":9007199254740993')),
        ("NaN", GOOD.replace(b'"a":1', b'"a":NaN')),
        ("Infinity", GOOD.replace(b'"a":1', b'"a":Infinity')),
        ("duplicate key", GOOD.replace(b'"a":1', b'"a":1,"a":1')),
        ("utf-16", GOOD.decode().encode("utf-16")),
        ("bad utf-8", GOOD.replace(b'"x"', b'"\xff"')),
        ("lone surrogate escape", GOOD.replace(b'"x"', b'"\\ud800"')),
        ("not an object", b"[]"),
        ("truncated", GOOD[:-1]),
        ("empty", b""),
    ]
    for key in ["type", "time", "actor", "run_id", "rank", "payload"]:
        missing = dict(doc)
        del missing[key]
        out.append((f"missing {key}", _jcs(missing)))
    extra = dict(doc, version=1)
    out.append(("extra field", _jcs(extra)))
    bad_values: list[tuple[str, Any]] = [
        ("type", None),
        ("type", ""),
        ("time", "yesterday"),
        ("run_id", 3),
        ("rank", -2),
        ("rank", 1.5),
        ("rank", True),
        ("payload", []),
        ("payload", None),
        ("actor", {"user": "a", "uid": 1, "host": "h"}),
        ("actor", {"user": "a", "uid": "1", "host": "h", "pid": 1}),
        ("actor", {"user": "a", "uid": 1, "host": "h", "pid": 1, "tty": "x"}),
        ("actor", "alice"),
    ]
    for key, value in bad_values:
        out.append((f"bad {key} {value!r}", _jcs(dict(doc, **{key: value}))))
    return out


def _json_number(text: str) -> int | float:
    # JSON numbers are doubles; only Python needs integers below 2**53 told apart.
    return int(text) if abs(int(text)) < 2**53 else float(text)


def _jcs(doc: Any) -> bytes:
    import rfc8785

    return rfc8785.dumps(doc)


@pytest.mark.parametrize(("name", "data"), _mutations(), ids=[name for name, _ in _mutations()])
def test_non_canonical_or_invalid_is_refused(name: str, data: bytes) -> None:
    with pytest.raises(EntryError) as info:
        Event.from_canonical(data, index=17)
    assert isinstance(info.value, VerificationFailed)
    assert info.value.index == 17
    assert "entry 17" in info.value.message


def test_deeply_nested_entry_is_refused() -> None:
    data = GOOD.replace(b'"a":1', b'"a":' + b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(EntryError):
        Event.from_canonical(data)


# --- Round trips of arbitrary JSON payloads -----------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)

_events_st = st.builds(
    Event,
    type=st.text(min_size=1),
    time=st.datetimes().map(lambda d: d.isoformat(timespec="microseconds") + "Z"),
    actor=st.builds(
        Actor,
        user=st.text(),
        uid=st.integers(-1, 2**32),
        host=st.text(),
        pid=st.integers(0, 2**22),
    ),
    run_id=st.none() | st.text(),
    rank=st.none() | st.integers(0, 4096),
    payload=st.dictionaries(st.text(), _json, max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(_events_st)
def test_round_trip(e: Event) -> None:
    data = e.canonical()
    assert e.canonical() == data
    back = Event.from_canonical(data)
    assert back == e
    assert back.canonical() == data
    # The bytes are what rfc8785 makes of the parsed document.
    assert _jcs(json.loads(data, parse_int=_json_number)) == data


@settings(max_examples=100, deadline=None)
@given(_events_st, st.data())
def test_any_single_byte_change_is_refused_or_changes_the_event(e: Event, data: st.DataObject) -> None:
    raw = bytearray(e.canonical())
    i = data.draw(st.integers(0, len(raw) - 1), label="position")
    raw[i] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[i]), label="byte")
    try:
        back = Event.from_canonical(bytes(raw))
    except EntryError:
        return
    assert back != e or back.canonical() != e.canonical()


def test_event_is_frozen() -> None:
    e = event()
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.type = "other"  # type: ignore[misc]
