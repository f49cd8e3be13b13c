"""Validation at the edge of the service: everything the engine cannot take is refused (400
naming the field) or brought into the engine's range here, before any work starts.

``parse_json_body`` (from ``common.json_body``, every JSON route): nesting deeper than
  ``max_json_depth`` (found without recursion), lone UTF-16 surrogates in any string and
  non-finite numbers (``NaN``, ``Infinity``, ``1e999``): llama-server's JSON parser rejects
  all of them, and the store cannot write them. orjson reads the bodies it can read exactly;
  the others, and every error, go through the standard parser.

The checks of a request against its model and engine are ``service.fitting``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from ..core.errors import InvalidRequest

# A JSON string (escapes included), and the brackets left once strings are gone.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


# --- the body -------------------------------------------------------------------------------------

def nesting_exceeds(text: str, limit: int) -> bool:
    """True when arrays/objects in ``text`` nest deeper than ``limit`` (no recursion)."""
    if text.count("[") + text.count("{") <= limit:
        return False  # cannot nest deeper than it has brackets
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _path(node: tuple | None) -> str:
    parts: list[str] = []
    while node is not None:
        node, key = node
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    text = "".join(reversed(parts)).lstrip(".")
    return _printable(text) or "the body"


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_json_values(body: Any) -> None:
    """InvalidRequest naming the first field that holds a lone surrogate or a non-finite
    number (a walk with an explicit stack: the depth is already bounded, but no recursion)."""
    stack: list[tuple[Any, tuple | None]] = [(body, None)]
    while stack:
        value, node = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                raise InvalidRequest(
                    f"{_path(node)} holds a lone UTF-16 surrogate ({_printable(found.group())}"
                    f" at character {found.start()}): text must be valid Unicode; send "
                    f"characters outside the BMP as a surrogate pair or as UTF-8",
                    param=_path(node))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidRequest(
                    f"{_path(node)} is not a finite number ({value}): NaN, Infinity and "
                    f"numbers beyond the range of a double are not JSON values; send a "
                    f"finite number", param=_path(node))
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise InvalidRequest(f"a key in {_path(node)} ({_printable(key)!r}) holds "
                                         f"a lone UTF-16 surrogate: keys must be valid Unicode",
                                         param=_path(node))
                stack.append((item, (node, key)))
        elif isinstance(value, list):
            stack.extend((item, (node, i)) for i, item in enumerate(value))


_STANDARD = object()  # _orjson_body's answer when the standard path must decide
_BIG = 2.0**63  # orjson reads an integer beyond 64 bits as a float; json keeps it exact


def _too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest(f"the request body nests arrays and objects more than {max_depth} "
                          f"deep (max_json_depth); flatten it")


def _orjson_body(raw: bytes, max_depth: int) -> Any:
    """The body as orjson reads it, when that is what the standard path would give.

    orjson refuses everything the standard path refuses after parsing (lone surrogates, NaN,
    Infinity, numbers beyond a double) and everything that is not UTF-8: for those, and for a
    float that may have been an integer beyond 64 bits, the answer is ``_STANDARD``, and the
    standard path parses again and says what is wrong and where. The nesting is measured on
    the parsed containers, with the standard path's limit and message.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _STANDARD
    kind = type(body)
    if kind is not dict and kind is not list:
        return _STANDARD if kind is float and abs(body) >= _BIG else body
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep(max_depth)
        for item in value.values() if type(value) is dict else value:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif kind is float and abs(item) >= _BIG:
                return _STANDARD
    return body


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    """The parsed body, or InvalidRequest saying what is wrong with it and where.

    orjson reads most bodies (``_orjson_body``): 147 KB of chat history and tools took 3.0 ms
    on the standard path (the nesting scan, ``json.loads`` and the value walk) and 0.3 ms
    this way, before the first token of every request that sends it.
    """
    body = _orjson_body(raw, max_depth)
    return _standard_body(raw, max_depth) if body is _STANDARD else body


def _standard_body(raw: bytes, max_depth: int) -> Any:
    """``parse_json_body`` with the standard parser: any encoding ``json`` detects, and an
    error that names what is wrong and where."""
    try:
        text = raw.decode(json.detect_encoding(raw))
    except (UnicodeDecodeError, LookupError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: it is not UTF-8 text "
                             f"({exc})") from None
    if nesting_exceeds(text, max_depth):
        raise _too_deep(max_depth)
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    check_json_values(body)
    return body
