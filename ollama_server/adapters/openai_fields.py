"""OpenAI request pieces that the OpenAI, Responses and vLLM adapters share (pure): chat
messages, the sampling fields common to chat, completions and vLLM's legacy ``/generate``,
vLLM's extra fields (its server takes them on the OpenAI routes, and so does this one; guided
decoding becomes a grammar through ``core.grammar``) and the OpenAI error body."""

from __future__ import annotations

import json
import logging
from typing import Any

from ..core.errors import (
    AuthenticationError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceError,
    Unsupported,
)
from ..core.grammar import choice_to_gbnf, regex_to_gbnf
from ..core.min_tokens import check_min_tokens
from ..core.schemas import InternalRequest, Message, ToolCall
from .fields import get_bool, get_number, get_stop

log = logging.getLogger(__name__)

MAX_N = 128  # OpenAI's bound on ``n``
# reasoning_effort (chat) and reasoning.effort (Responses): OpenAI's levels
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")

# Fields vLLM accepts that change nothing here (defaults, or backend choices of vLLM itself).
_IGNORED = ("guided_decoding_backend", "guided_whitespace_pattern", "priority",
            "return_token_ids", "add_special_tokens", "spaces_between_special_tokens",
            "documents", "mm_processor_kwargs", "cache_salt", "kv_transfer_params",
            "vllm_xargs", "disable_any_whitespace", "whitespace_pattern")


def content_text(content: Any, images: list[str], where: str) -> str:
    """Text of an OpenAI content field (string or parts); image parts go to ``images``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts",
                             param="messages")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise InvalidRequest(f"{where}.content parts must be objects", param="messages")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:"):
                raise InvalidRequest("only data: URLs are accepted for images (this service "
                                     "has no internet access)", param="messages")
            images.append(url)
        else:
            raise InvalidRequest(f"unsupported content part type {kind!r}", param="messages")
    return "\n".join(texts)


def parse_messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object", param="messages")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role == "function":
            role = "tool"
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"{where}.role must be one of system, developer, user, "
                                 f"assistant, tool; got {role!r}", param="messages")
        images: list[str] = []
        msg = Message(role=role, content=content_text(m.get("content"), images, where),
                      images=images)
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list) or not all(isinstance(tc, dict) for tc in calls):
            raise InvalidRequest(f"{where}.tool_calls must be a list of objects",
                                 param="messages")
        for j, tc in enumerate(calls):
            fn = tc.get("function") if isinstance(tc.get("function"), dict) else {}
            args = fn.get("arguments", "{}")
            if not isinstance(args, str):
                args = json.dumps(args)
            msg.tool_calls.append(ToolCall(id=str(tc.get("id") or f"call_{i}_{j}"),
                                           name=str(fn.get("name", "")), arguments=args))
        if role == "tool":
            msg.tool_call_id = m.get("tool_call_id")
            msg.name = m.get("name")
        reasoning = m.get("reasoning_content") or m.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            msg.reasoning = reasoning
        out.append(msg)
    return out


def get_n(body: dict[str, Any]) -> int:
    """``n`` (1 when absent), bounded as OpenAI bounds it and refused in its words."""
    n = get_number(body, "n", integer=True)
    if n is None:
        return 1
    if n < 1 or n > MAX_N:
        below = n < 1
        exc = InvalidRequest(
            f"Invalid 'n': integer {'below minimum' if below else 'above maximum'} value. "
            f"Expected a value {'>= 1' if below else f'<= {MAX_N}'}, but got {n} instead.",
            param="n")
        exc.code = "integer_below_min_value" if below else "integer_above_max_value"
        raise exc
    return n


def common_sampling(body: dict[str, Any], req: InternalRequest) -> None:
    req.temperature = get_number(body, "temperature", 0, 2)
    req.top_p = get_number(body, "top_p", 0, 1)
    req.presence_penalty = get_number(body, "presence_penalty", -2, 2)
    req.frequency_penalty = get_number(body, "frequency_penalty", -2, 2)
    req.seed = get_number(body, "seed", integer=True)
    req.stop = get_stop(body)
    req.stream = get_bool(body, "stream")
    if body.get("stream_options") is not None and not req.stream:
        # OpenAI's and vLLM's 400: the options are about a stream there is not.
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is "
                             "enabled.", param="stream_options")
    req.n = get_n(body)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidRequest("'logit_bias' must be an object of token id → bias",
                                 param="logit_bias")
        try:
            req.logit_bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise InvalidRequest("'logit_bias' keys must be token ids and values numbers",
                                 param="logit_bias") from None
    # Common extensions (llama.cpp, vLLM, Ollama's compat layer) accepted on every route.
    req.top_k = get_number(body, "top_k", integer=True)
    if req.top_k is not None and req.top_k < 0:
        req.top_k = 0
    req.min_p = get_number(body, "min_p", 0, 1)
    rep = get_number(body, "repetition_penalty", 0)
    if rep is None:
        rep = get_number(body, "repeat_penalty", 0)
    req.repeat_penalty = rep
    req.ignore_eos = get_bool(body, "ignore_eos")
    if isinstance(body.get("keep_alive"), (int, float)):
        req.keep_alive = float(body["keep_alive"])


# --- vLLM's extra request fields (taken on the OpenAI routes, as vLLM's server takes them) ---

def _schema(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequest(f"'{key}' is not valid JSON: {exc}", param=key) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{key}' must be a JSON schema (object or JSON text)", param=key)
    return value


def _guided(body: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The guided-decoding requests of a body as (kind, field name, value)."""
    found: list[tuple[str, str, Any]] = []
    for kind in ("json", "regex", "choice", "grammar"):
        if body.get(f"guided_{kind}") is not None:
            found.append((kind, f"guided_{kind}", body[f"guided_{kind}"]))
    if body.get("guided_json_object"):
        found.append(("json_object", "guided_json_object", True))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidRequest("'structured_outputs' must be an object",
                                 param="structured_outputs")
        for kind in ("json", "regex", "choice", "grammar", "json_object", "structural_tag"):
            value = so.get(kind)
            if value is not None and value is not False:
                found.append((kind, f"structured_outputs.{kind}", value))
    return found


def apply_guided(body: dict[str, Any], req: InternalRequest) -> None:
    """guided_* / structured_outputs → ``req.json_schema`` or ``req.grammar`` (GBNF)."""
    found = _guided(body)
    if not found:
        return
    if len(found) > 1:
        raise InvalidRequest("You can only use one kind of guided decoding ('json', 'regex', "
                             "'choice', 'grammar', 'json_object'); got "
                             + ", ".join(f for _, f, _ in found), param=found[1][1])
    kind, key, value = found[0]
    if kind == "json":
        req.json_schema = _schema(value, key)
        req.grammar = None
    elif kind == "json_object":
        req.json_schema = {}
        req.grammar = None
    elif kind == "choice":
        req.grammar = choice_to_gbnf(value)
    elif kind == "regex":
        try:
            req.grammar = regex_to_gbnf(value)
        except InvalidRequest as exc:
            exc.param = key
            raise
    elif kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(f"'{key}' must be a non-empty grammar (GBNF)", param=key)
        req.grammar = value
    else:
        raise Unsupported(f"'{key}' is not supported: llama.cpp has no structural tags",
                          param=key)


def apply_vllm_extras(body: dict[str, Any], req: InternalRequest) -> None:
    """Read vLLM's extra fields of a chat or completions body onto ``req``.

    The sampling fields shared with other dialects (``top_k``, ``min_p``,
    ``repetition_penalty``, ``ignore_eos``) are parsed by the OpenAI adapter already.
    """
    min_tokens = _int(body, "min_tokens", 0)
    if min_tokens:
        if req.max_tokens is not None and min_tokens > req.max_tokens:
            raise InvalidRequest(f"min_tokens must be less than or equal to max_tokens="
                                 f"{req.max_tokens}, got {min_tokens}.", param="min_tokens")
        req.min_tokens = min_tokens
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise InvalidRequest("'stop_token_ids' must be a list of token ids",
                                 param="stop_token_ids")
        req.stop_token_ids = list(ids)
    req.include_stop_str_in_output = get_bool(body, "include_stop_str_in_output", False)
    if not get_bool(body, "skip_special_tokens", True):
        raise Unsupported("'skip_special_tokens': false is not supported: llama-server never "
                          "renders special tokens in generated text", param="skip_special_tokens")
    if body.get("prompt_logprobs") not in (None, 0):
        raise Unsupported("'prompt_logprobs' is not supported: llama-server does not score "
                          "prompt tokens", param="prompt_logprobs")
    if get_bool(body, "use_beam_search", False):
        raise Unsupported("'use_beam_search' is not supported by this engine",
                          param="use_beam_search")
    if body.get("echo") is True and req.is_chat:
        raise Unsupported("'echo' is not supported on chat completions", param="echo")
    if body.get("echo") is True and body.get("logprobs") not in (None, False):
        # lm-evaluation-harness and the like sum the prompt's log probabilities: leaving
        # them out would give silently wrong scores.
        raise Unsupported("'echo' with 'logprobs' is not supported: llama-server does not "
                          "score prompt tokens, so the prompt's log probabilities would be "
                          "missing", param="echo")
    for key in ("allowed_token_ids", "bad_words", "truncate_prompt_tokens"):
        if body.get(key) not in (None, []):  # refused, not ignored: the answer would differ
            raise Unsupported(f"'{key}' is not supported by this engine", param=key)
    for key in ("add_generation_prompt", "continue_final_message"):
        if body.get(key) is not None:
            setattr(req, key, get_bool(body, key, getattr(req, key)))
    if body.get("include_reasoning") is False:
        req.reasoning = False
    apply_guided(body, req)
    check_min_tokens(req)
    unknown = [k for k in _IGNORED if k in body]
    if unknown:
        log.debug("vLLM fields accepted and ignored: %s", ", ".join(unknown))


def _int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"'{key}' must be a non-negative integer, got "
                             f"{json.dumps(value)}", param=key)
    return value


# --- errors ---------------------------------------------------------------------------------

def openai_error(exc: ServiceError) -> tuple[dict[str, Any], int]:
    """``{"error": {message, type, param, code}}`` and the status for ``exc``."""
    code: Any = getattr(exc, "code", None)  # set where OpenAI names the check (n's bounds)
    kind = "invalid_request_error"
    message = exc.message
    if isinstance(exc, ModelNotFound):
        code = "model_not_found"
        message = f"The model `{exc.name}` does not exist or you do not have access to it."
    elif isinstance(exc, ContextLengthExceeded):
        code = "context_length_exceeded"
    elif isinstance(exc, AuthenticationError):
        code = "invalid_api_key"
    elif isinstance(exc, NotFound):
        code = "not_found"
    elif isinstance(exc, PayloadTooLarge):
        code = "request_too_large"
    elif isinstance(exc, Overloaded):
        kind = "server_overloaded"  # 429, as vLLM's and OpenAI's SDKs retry it
    elif isinstance(exc, RateLimited):
        kind, code = "requests", "rate_limit_exceeded"
    elif isinstance(exc, RequestTimeout):
        kind, code = "server_error", "timeout"
    elif not isinstance(exc, InvalidRequest):
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    status = 429 if isinstance(exc, Overloaded) else exc.status
    return ({"error": {"message": message, "type": kind, "param": exc.param, "code": code}},
            status)
