"""The fast RFC 8785 path writes exactly what the reference implementation writes."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.ledger._canonical import canonical_json

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["", "\u2028", "\x7f", "\x00\x1f", '"\\', "\ue000", "\U0001f600", "a\ud7ffb"]
)
_scalars = st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False) | _text
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=30,
)


def _reference(document: Any) -> bytes | type[Exception]:
    try:
        return rfc8785.dumps(document)
    except (ValueError, TypeError) as exc:
        return type(exc)


@settings(max_examples=600, deadline=None)
@given(_json)
def test_fast_path_equals_reference(document: Any) -> None:
    expected = _reference(document)
    if isinstance(expected, bytes):
        assert canonical_json(document) == expected
    else:
        with pytest.raises(expected):
            canonical_json(document)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        # RFC 8785 3.2.3: keys sort by UTF-16 code units; U+1F600 (D83D DE00) comes before U+E000.
        ({"\ue000": 1, "\U0001f600": 2}, '{"\U0001f600":2,"\ue000":1}'.encode()),
        ({"b": [1, True, None], "a": "\x0f\n"}, b'{"a":"\\u000f\\n","b":[1,true,null]}'),
        ({"n": 2**53 - 1}, b'{"n":9007199254740991}'),
        ({"f": 1e21, "g": 0.000001, "h": -0.0}, b'{"f":1e+21,"g":0.000001,"h":0}'),
    ],
)
def test_known_outputs(document: Any, expected: bytes) -> None:
    assert canonical_json(document) == expected


@pytest.mark.parametrize("document", [{"x": 2**53}, {"x": float("nan")}, {"x": "\ud800"}, {1: "int key"}])
def test_what_the_reference_refuses_is_refused(document: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        canonical_json(document)
