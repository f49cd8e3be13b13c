"""parse_json_body reads bodies with orjson where that gives exactly what the standard parser
gives, and leaves everything else (errors included) to the standard path: the two must agree
on every body, value for value and type for type, or on the error's message and field."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollama_server.api import validation
from ollama_server.api.validation import parse_json_body
from ollama_server.core.errors import InvalidRequest

DEPTH = 8


def outcome(parse, raw: bytes) -> tuple:
    try:
        return ("value", _typed(parse(raw, DEPTH)))
    except InvalidRequest as exc:
        return ("error", exc.message, exc.param)


def _typed(value):
    """The value with every scalar's type spelled out (1 and 1.0 and True differ)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def assert_same(raw: bytes) -> None:
    assert outcome(parse_json_body, raw) == outcome(validation._standard_body, raw), raw[:200]


EDGES = [
    b'{"a": 1}', b"[]", b"{}", b"1", b"-0", b"-0.0", b"1E2", b"1e-400", b"5e-324",
    b'{"a": 1, "a": 2}', b"9223372036854775807", b"9223372036854775808",
    b"18446744073709551615", b"18446744073709551616", b"-9223372036854775808",
    b"-9223372036854775809", b'{"seed": 123456789012345678901234567890}',
    b'{"x": [1, 2, 100000000000000000000]}', b'{"x": 1e20}', b'{"x": -1e19}',
    b"1" * 400, b'{"a": 1.7976931348623157e308}', b'{"a": 1.8e308}', b"2e308",
    b'\xef\xbb\xbf{"a": 1}', '{"a": "é"}'.encode("utf-16"), b'{"a": "\xff"}',
    b'"\xed\xa0\x80"', b'{"a": "\\ud800"}', b'{"a": "\\udc00\\ud800"}',
    b'{"a": "\\ud83d\\ude00"}', b'{"a\\udc00": 1}', b'{"a": NaN}', b'{"a": Infinity}',
    b'{"a": -Infinity}', b"[1,]", b'{"a": 1,}', b"'a'", b"01", b"1.", b".5", b"123abc",
    b'{"a": "a\tb"}', b'"\\u0000"', b" {\"a\": 1} \n", b"", b"   ", b"nul", b"true",
    b"null", b'{"a": [' * 8 + b"]" * 8 + b"}", b"[" * 8 + b"]" * 8, b"[" * 9 + b"]" * 9,
    b"[" * 2000 + b"]" * 2000, b'{"a": "' + b"[" * 50 + b'"}',
    b'{"a": [' * 9 + b"NaN" + b"]" * 9 + b"}", b'{"a": [' * 9 + b"1e400" + b"]" * 9 + b"}",
    b'[[[[[[[[[[1e20]]]]]]]]]]', b'[1e20, [[[[[[[[[1]]]]]]]]]]',
]


@pytest.mark.parametrize("raw", EDGES)
def test_edge_bodies_parse_as_the_standard_path_parses_them(raw: bytes) -> None:
    assert_same(raw)


def test_the_fast_path_is_taken_for_ordinary_bodies() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi é 中文"}],
            "temperature": 0.5, "seed": 18446744073709551615, "stream": True}
    assert validation._orjson_body(json.dumps(body).encode(), DEPTH) == body
    assert validation._orjson_body(b'{"seed": 18446744073709551616}', DEPTH) \
        is validation._STANDARD  # read as a float by orjson: the standard path keeps the int


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_generated_bodies_parse_as_the_standard_path_parses_them(value) -> None:
    assert_same(json.dumps(value).encode())  # NaN and Infinity written as json writes them


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | st.text(alphabet='[]{}",:0123456789.eE+-tfnul \\u', max_size=40)
       .map(str.encode))
def test_arbitrary_bytes_parse_or_fail_as_the_standard_path(raw: bytes) -> None:
    assert_same(raw)
