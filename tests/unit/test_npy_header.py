"""The .npy header fast path reads exactly what ast.literal_eval (numpy's own reader) reads."""

from __future__ import annotations

import ast
import warnings

from hypothesis import given, settings
from hypothesis import strategies as st

from trainguard.scan.formats.npy import _parse_header

_HEADERS = [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }           \n",
    "{'descr': '>i8', 'fortran_order': True, 'shape': (5,), }\n",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (), }",
    "{'descr': [('a', '<f4'), ('b', '|i1')], 'fortran_order': False, 'shape': (3,), }",
]
_ALPHABET = "0123456789, ()'{}:<>|fTrueFalsd_\n\\ "


def _reference(text: str) -> object:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError) as exc:
        return type(exc)


@settings(max_examples=2000, deadline=None)
@given(
    base=st.sampled_from(_HEADERS),
    edits=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 200), st.sampled_from(_ALPHABET)), min_size=0, max_size=3
    ),
)
def test_fast_path_equals_literal_eval(base: str, edits: list[tuple[int, int, str]]) -> None:
    chars = list(base)
    for kind, where, char in edits:
        i = where % (len(chars) + 1)
        if kind == 0 and i < len(chars):
            chars[i] = char
        elif kind == 1 and i < len(chars):
            del chars[i]
        else:
            chars.insert(i, char)
    text = "".join(chars)
    expected = _reference(text)
    try:
        got: object = _parse_header(text)
    except (ValueError, TypeError, SyntaxError) as exc:
        got = type(exc)
    assert got == expected
    if isinstance(expected, dict):
        assert isinstance(got, dict)
        assert all(type(got[k]) is type(v) for k, v in expected.items())
