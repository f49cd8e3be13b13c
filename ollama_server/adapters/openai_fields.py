"""OpenAI request pieces that the OpenAI and vLLM adapters share (pure): chat messages and
the sampling fields common to chat, completions and vLLM's legacy ``/generate``."""

from __future__ import annotations

import json
from typing import Any

from ..core.errors import InvalidRequest
from ..core.schemas import InternalRequest, Message, ToolCall
from .fields import get_bool, get_number, get_stop

MAX_N = 128  # OpenAI's bound on ``n``


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
