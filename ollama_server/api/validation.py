"""Validation at the edge of the service: everything the engine cannot take is refused (400
naming the field) or brought into the engine's range here, before any work starts.

Three checks, each called in one place:

- ``parse_json_body`` (from ``common.json_body``, every JSON route): nesting deeper than
  ``max_json_depth`` (found without recursion), lone UTF-16 surrogates in any string and
  non-finite numbers (``NaN``, ``Infinity``, ``1e999``): llama-server's JSON parser rejects
  all of them, and the store cannot write them. orjson reads the bodies it can read exactly;
  the others, and every error, go through the standard parser.
- ``fit_request_to_engine`` (from ``handlers.start_generation``): the configured token default
  and cap, ``max_tokens`` beyond the model's context, and numbers outside what the engine's
  C types hold (seed, top_k, repeat_last_n, n_probs, token ids, 32-bit floats).
- ``fit_embedding_inputs`` (from ``handlers.run_embeddings``): inputs longer than the engine
  can embed in one batch are cut where the API allows it (Ollama's ``truncate``), else a 400
  that names the limit.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from ..config import Config
from ..core.errors import InvalidRequest
from ..core.schemas import InternalRequest
from ..models.schemas import ModelInfo

INT32_MAX = 2**31 - 1
SEED_RANGE = 2**32 - 1  # llama.cpp seeds are uint32; 0xFFFFFFFF means "random"
FLOAT32_MAX = 3.4028234663852886e38
MAX_TOP_LOGPROBS = 20  # what OpenAI, vLLM and Ollama allow
# llama.cpp's default physical batch (-ub): an embedding input must fit in one.
DEFAULT_UBATCH = 512

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


# --- a generation request against its model and engine --------------------------------------------

def _int_field(name: str, value: int | None, lo: int, hi: int) -> int | None:
    if value is not None and not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}, got {value}", param=name)
    return value


def _check_float32(req: InternalRequest) -> None:
    for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                 "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and abs(value) > FLOAT32_MAX:
            raise InvalidRequest(f"{name} is {value}, beyond what the engine can hold (a 32-bit "
                                 f"float, at most {FLOAT32_MAX:.3g})", param=name)
    for token, bias in (req.logit_bias or {}).items():
        _int_field("logit_bias", token, 0, INT32_MAX)
        if abs(bias) > FLOAT32_MAX:
            raise InvalidRequest(f"logit_bias of token {token} is {bias}, beyond a 32-bit "
                                 f"float", param="logit_bias")


def fit_request_to_engine(req: InternalRequest, info: ModelInfo, config: Config) -> None:
    """Apply the configured token default and cap, and bring every number into the engine's
    range: clamp what has one meaning beyond it, refuse (400 naming the field) what has none.
    """
    default, cap = config.token_limit(info.name)
    if req.max_tokens is None and default is not None:
        req.max_tokens = default
    if cap is not None and (req.max_tokens is None or req.max_tokens > cap):
        req.max_tokens = cap
    # The engine stops at the end of the context anyway: more than that means "up to it".
    context = info.context_length or INT32_MAX
    if req.max_tokens is not None and req.max_tokens > context:
        req.max_tokens = context
    _int_field("min_tokens", req.min_tokens, 0, context)
    if req.seed is not None:
        # -1 is "random" in llama.cpp (and Ollama's default); other seeds fold into uint32.
        req.seed = None if req.seed == -1 else req.seed % SEED_RANGE
    if req.top_k is not None and not 0 <= req.top_k <= INT32_MAX:
        req.top_k = 0  # beyond the vocabulary (or negative) means no top-k limit
    if req.repeat_last_n is not None and req.repeat_last_n > INT32_MAX:
        req.repeat_last_n = -1  # the whole context
    _int_field("repeat_last_n", req.repeat_last_n, -1, INT32_MAX)
    _int_field("top_logprobs", req.top_logprobs, 0, MAX_TOP_LOGPROBS)
    _int_field("num_ctx", req.num_ctx, 0, INT32_MAX)
    _check_float32(req)
    check_token_ids(req.stop_token_ids, info, "stop_token_ids")
    if isinstance(req.prompt, list):
        check_token_ids(req.prompt, info, "prompt")


def check_token_ids(tokens: Any, info: ModelInfo, name: str) -> list[int]:
    """``tokens`` as a list of ids of ``info``'s vocabulary, or InvalidRequest naming
    ``name`` (llama-server fails with a 500 on an id outside its vocabulary)."""
    if not isinstance(tokens, list) or any(
            isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise InvalidRequest(f"{name} must be a list of token ids (integers)", param=name)
    top = (info.vocab_size or INT32_MAX + 1) - 1
    for token in tokens:
        if not 0 <= token <= top:
            raise InvalidRequest(f"{name} holds the token id {token}, outside the vocabulary "
                                 f"of {info.name} (ids 0 to {top})", param=name)
    return tokens


# --- embeddings -----------------------------------------------------------------------------------

def embedding_token_limit(engine: Any) -> int:
    """The most tokens one input may have: it must fit in one physical batch of the engine."""
    settings = engine.settings
    ubatch = getattr(settings, "ubatch_size", None) or DEFAULT_UBATCH
    return max(1, min(settings.batch_size, ubatch, engine.ctx_size))


def fit_embedding_inputs(inputs: list[Any], engine: Any, truncate: bool) -> list[Any]:
    """``inputs`` with each one longer than the engine's limit cut to it (``truncate``), or
    InvalidRequest naming the input and the limit."""
    limit = embedding_token_limit(engine)
    out: list[Any] = []
    for i, item in enumerate(inputs):
        if isinstance(item, list):
            tokens = item
            for token in tokens:
                _int_field("input", token, 0, INT32_MAX)
        elif len(item.encode("utf-8")) + 4 <= limit:
            out.append(item)  # a token is at least one byte: it fits without counting
            continue
        else:
            tokens = engine.tokenize(item, add_special=True)
        if len(tokens) <= limit:
            out.append(item)
        elif truncate:
            out.append(list(tokens[:limit]))
        else:
            raise InvalidRequest(
                f"input {i} is {len(tokens)} tokens, more than the {limit} tokens this "
                f"model can embed at once (batch_size); shorten or split it", param="input")
    return out
