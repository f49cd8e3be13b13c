"""Anthropic Messages wire format ⇄ internal types. Pure: no Flask, no I/O.

Requests: ``anthropic_messages_to_internal`` (``/v1/messages`` and, with
``require_max_tokens=False``, ``/v1/messages/count_tokens``). Answers:
``internal_to_anthropic_message`` (non-streamed body) and ``AnthropicStream``, the stream
converter (``process(event) -> [(event name, data)]``). Models: ``anthropic_model`` and
``anthropic_models_page``. Errors: ``anthropic_error``.

The shapes follow anthropics/anthropic-sdk-python (types/*, lib/streaming/_messages.py) and
ollama/ollama's anthropic/anthropic.go; see API-REFERENCE.md §4.

Why one module of about 700 lines: it is one wire format, request to stream, as STYLE.md asks
(a dialect is one pure translation package); its size is the Messages API's (content blocks,
tools, thinking, documents, count_tokens, the stream's event order, errors).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from ..core.errors import (
    AuthenticationError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
)
from ..core.schemas import (
    Event,
    Finish,
    InternalRequest,
    Message,
    PromptInfo,
    ReasoningDelta,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from .fields import get_number, get_stop, require_model

log = logging.getLogger(__name__)

STOP_REASONS = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens",
                "tool_calls": "tool_use"}

# Claude Code (2.1.x) puts an attribution line first in the system prompt, e.g.
# ``x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; cch=a5145;``.
# Its ``cch`` changes on every request, so leaving it in would make every prompt differ from
# the first token on and defeat the engine's prefix cache. It means nothing to a local model.
BILLING_PREFIX = "x-anthropic-billing-header:"
_BILLING_LINE = re.compile(r"\Ax-anthropic-billing-header:[^\n]*?(?:cch=[^;\n]*;[ \t]*|\n|\Z)\n?")

MIN_THINKING_BUDGET = 1024


# --- request ---------------------------------------------------------------------------------

def strip_billing_header(text: str) -> str:
    """``text`` without Claude Code's leading per-request billing line (if it has one)."""
    while text.startswith(BILLING_PREFIX):
        match = _BILLING_LINE.match(text)
        if match is None:  # pragma: no cover - the pattern always matches the prefix
            break
        text = text[match.end():]
    return text


def _system_text(raw: Any) -> str:
    """The ``system`` field (a string or text blocks) as one string, billing line removed."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return strip_billing_header(raw)
    if not isinstance(raw, list):
        raise InvalidRequest("system: must be a string or a list of text blocks",
                             param="system")
    texts = []
    for i, block in enumerate(raw):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(
                block.get("text"), str):
            raise InvalidRequest(f"system.{i}: each system block must be "
                                 f"{{\"type\": \"text\", \"text\": …}}", param="system")
        text = strip_billing_header(block["text"])
        if text:
            texts.append(text)
    return "\n".join(texts)


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequest(f"{where}.source: Field required", param="messages")
    kind = source.get("type")
    if kind == "base64":
        data, media = source.get("data"), source.get("media_type")
        if not isinstance(data, str) or not data or not isinstance(media, str):
            raise InvalidRequest(f"{where}.source: a base64 image needs 'media_type' and "
                                 f"'data'", param="messages")
        return f"data:{media};base64,{data}"
    if kind == "url":
        raise InvalidRequest(f"{where}.source: URL images are not supported (this service has "
                             f"no internet access); send the image as base64",
                             param="messages")
    raise InvalidRequest(f"{where}.source.type: must be 'base64' or 'url', got {kind!r}",
                         param="messages")


def _document_text(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "text" and isinstance(
            source.get("data"), str):
        title = block.get("title")
        return f"{title}\n{source['data']}" if isinstance(title, str) and title else \
            source["data"]
    raise InvalidRequest(f"{where}: only plain-text documents (source.type 'text') are "
                         f"supported", param="messages")


def _tool_result_content(content: Any, images: list[str], where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: must be a string or a list of blocks",
                             param="messages")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image":
            images.append(_image_url(part, f"{where}.content.{j}"))
        elif kind == "document":
            texts.append(_document_text(part, f"{where}.content.{j}"))
        else:
            raise InvalidRequest(f"{where}.content.{j}.type: unsupported block type {kind!r}",
                                 param="messages")
    return "\n".join(texts)


def _tool_input_json(value: Any, where: str) -> str:
    if value is None:
        return "{}"
    if isinstance(value, str):  # tolerated: some clients send the JSON text
        return value
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}.input: must be an object", param="messages")
    return json.dumps(value, ensure_ascii=False)


def _convert_message(m: Any, i: int, tool_names: dict[str, str]) -> list[Message]:
    """One Anthropic message → neutral messages (tool results become ``tool`` messages)."""
    where = f"messages.{i}"
    if not isinstance(m, dict):
        raise InvalidRequest(f"{where}: must be an object", param="messages")
    role = m.get("role")
    if role not in ("user", "assistant", "system"):
        raise InvalidRequest(f"{where}.role: Input should be 'user' or 'assistant', got "
                             f"{role!r}", param="messages")
    content = m.get("content")
    if isinstance(content, str):
        text = strip_billing_header(content) if role == "system" else content
        return [Message(role=role, content=text)]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: must be a string or a list of content blocks",
                             param="messages")
    texts: list[str] = []
    images: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    results: list[Message] = []
    for j, block in enumerate(content):
        bwhere = f"{where}.content.{j}"
        if not isinstance(block, dict):
            raise InvalidRequest(f"{bwhere}: must be an object", param="messages")
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise InvalidRequest(f"{bwhere}.text: Field required", param="messages")
            texts.append(block["text"])
        elif kind == "image":
            images.append(_image_url(block, bwhere))
        elif kind == "document":
            texts.append(_document_text(block, bwhere))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise InvalidRequest(f"{bwhere}: a tool_use block needs 'id' and 'name'",
                                     param="messages")
            tool_names[block["id"]] = block["name"]
            calls.append(ToolCall(id=block["id"], name=block["name"],
                                  arguments=_tool_input_json(block.get("input"), bwhere)))
        elif kind == "tool_result":
            use_id = block.get("tool_use_id")
            if not isinstance(use_id, str):
                raise InvalidRequest(f"{bwhere}.tool_use_id: Field required", param="messages")
            result_images: list[str] = []
            text = _tool_result_content(block.get("content"), result_images, bwhere)
            results.append(Message(role="tool", content=text, images=result_images,
                                   tool_call_id=use_id, name=tool_names.get(use_id)))
        elif kind == "thinking":
            # Earlier reasoning sent back; its signature is ours and opaque, so not checked.
            if isinstance(block.get("thinking"), str) and block["thinking"]:
                reasoning.append(block["thinking"])
        elif kind == "redacted_thinking":
            pass  # encrypted reasoning of another server: nothing a local model can read
        else:
            raise InvalidRequest(f"{bwhere}.type: unsupported content block type {kind!r}",
                                 param="messages")
    out = list(results)  # tool results answer the previous assistant turn: they come first
    if texts or images or calls or reasoning or not results:
        text = "\n".join(texts)
        if role == "system":
            text = strip_billing_header(text)
        out.append(Message(role=role, content=text, images=images, tool_calls=calls,
                           reasoning="".join(reasoning) or None))
    return out


def _merge_turns(messages: list[Message]) -> list[Message]:
    """Fold system-role messages and join consecutive user or assistant turns.

    Anthropic treats consecutive same-role turns as one; many chat templates reject them
    (and llama-server refuses two trailing assistant messages). System messages that come
    after the conversation started (newer Claude Code sends them) join the next user turn,
    since most templates only accept a system message first.
    """
    out: list[Message] = []
    pending_system: list[str] = []
    for msg in messages:
        if msg.role == "system":
            if not any(m.role != "system" for m in out):
                if out:
                    out[0].content = "\n".join(t for t in (out[0].content, msg.content) if t)
                elif msg.content:
                    out.append(msg)
            elif msg.content:
                pending_system.append(msg.content)
            continue
        if pending_system and msg.role == "user":
            msg.content = "\n".join([*pending_system, msg.content] if msg.content
                                    else pending_system)
            pending_system = []
        prev = out[-1] if out else None
        if prev is not None and prev.role == msg.role and msg.role in ("user", "assistant") \
                and not prev.tool_calls:
            prev.content = "\n".join(t for t in (prev.content, msg.content) if t)
            prev.images.extend(msg.images)
            prev.tool_calls.extend(msg.tool_calls)
            if msg.reasoning:
                prev.reasoning = (prev.reasoning or "") + msg.reasoning
            continue
        out.append(msg)
    if pending_system:
        last_user = next((m for m in reversed(out) if m.role == "user"), None)
        if last_user is not None:
            last_user.content = "\n".join([last_user.content, *pending_system])
        else:
            out.append(Message(role="user", content="\n".join(pending_system)))
    return out


def _parse_tools(raw: Any) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest("tools: must be a list", param="tools")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise InvalidRequest(f"tools.{i}.name: Field required", param="tools")
        kind = t.get("type")
        if kind not in (None, "custom"):
            raise InvalidRequest(f"tools.{i}: server tool type {kind!r} is not supported by "
                                 f"this service; define it as a custom tool with an "
                                 f"input_schema", param="tools")
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"tools.{i}.input_schema: Field required (a JSON schema "
                                 f"object)", param="tools")
        tools.append(Tool(name=t["name"], description=t.get("description") or "",
                          parameters=schema))
    return tools


def _parse_tool_choice(raw: Any, req: InternalRequest) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise InvalidRequest("tool_choice: must be an object such as {\"type\": \"auto\"}",
                             param="tool_choice")
    kind = raw.get("type")
    if kind == "auto":
        req.tool_choice = "auto"
    elif kind == "any":
        req.tool_choice = "required"
    elif kind == "none":
        req.tool_choice = "none"
    elif kind == "tool":
        name = raw.get("name")
        if not isinstance(name, str) or not any(t.name == name for t in req.tools):
            raise InvalidRequest(f"tool_choice.name: {name!r} is not one of the 'tools'",
                                 param="tool_choice")
        # llama-server's chat endpoint takes only auto|none|required (an object silently
        # means "auto"), so a forced tool is "required" with only that tool offered.
        req.tools = [t for t in req.tools if t.name == name]
        req.tool_choice = "required"
    else:
        raise InvalidRequest(f"tool_choice.type: must be auto, any, tool or none; got {kind!r}",
                             param="tool_choice")
    if raw.get("disable_parallel_tool_use") is True:
        req.parallel_tool_calls = False
    if req.tool_choice == "required" and not req.tools:
        raise InvalidRequest("tool_choice: requires 'tools'", param="tool_choice")


def _parse_thinking(body: dict[str, Any], req: InternalRequest) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict):
        raise InvalidRequest("thinking: must be an object", param="thinking")
    kind = thinking.get("type")
    if kind == "enabled":
        budget = get_number(thinking, "budget_tokens", integer=True)
        if budget is None:
            raise InvalidRequest("thinking.enabled.budget_tokens: Field required",
                                 param="thinking")
        if budget < MIN_THINKING_BUDGET:
            raise InvalidRequest(f"thinking.enabled.budget_tokens: Input should be greater "
                                 f"than or equal to {MIN_THINKING_BUDGET}", param="thinking")
        if req.max_tokens is not None and budget >= req.max_tokens:
            raise InvalidRequest("`max_tokens` must be greater than `thinking.budget_tokens`",
                                 param="thinking")
        req.reasoning = True
        req.reasoning_budget = budget
    elif kind == "adaptive":
        req.reasoning = True
    elif kind == "disabled":
        req.reasoning = False
    else:
        raise InvalidRequest(f"thinking.type: must be enabled, disabled or adaptive; got "
                             f"{kind!r}", param="thinking")


def _parse_output_format(body: dict[str, Any], req: InternalRequest) -> None:
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        fmt = body.get("output_format")  # the earlier beta name
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(
            fmt.get("schema"), dict):
        raise InvalidRequest("output_config.format: must be {\"type\": \"json_schema\", "
                             "\"schema\": {…}}", param="output_config")
    req.json_schema = fmt["schema"]


def anthropic_messages_to_internal(body: dict[str, Any], require_max_tokens: bool = True
                                   ) -> InternalRequest:
    """A Messages API body → InternalRequest (InvalidRequest on a bad field).

    ``metadata``, ``cache_control``, ``service_tier`` and other fields this service has no use
    for are accepted and ignored. A non-standard top-level ``grammar`` (GBNF) is passed on.
    """
    model = require_model(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages: must be a non-empty list", param="messages")
    tool_names: dict[str, str] = {}
    messages: list[Message] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append(Message(role="system", content=system))
    for i, m in enumerate(raw):
        messages.extend(_convert_message(m, i, tool_names))
    req = InternalRequest(model=model, dialect="anthropic", messages=_merge_turns(messages))
    max_tokens = get_number(body, "max_tokens", 1, integer=True)
    if max_tokens is None and require_max_tokens:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    req.max_tokens = max_tokens
    req.temperature = get_number(body, "temperature", 0, 1)
    req.top_p = get_number(body, "top_p", 0, 1)
    req.top_k = get_number(body, "top_k", 0, integer=True)
    if isinstance(body.get("stop_sequences"), str):
        raise InvalidRequest("stop_sequences: Input should be a valid list",
                             param="stop_sequences")
    req.stop = get_stop(body, "stop_sequences")
    req.wants_context_full = True  # stop_reason model_context_window_exceeded
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: must be a boolean", param="stream")
    req.stream = bool(stream)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("metadata: must be an object", param="metadata")
    req.tools = _parse_tools(body.get("tools"))
    _parse_tool_choice(body.get("tool_choice"), req)
    _parse_thinking(body, req)
    _parse_output_format(body, req)
    grammar = body.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise InvalidRequest("grammar: must be a non-empty GBNF string", param="grammar")
        req.grammar = grammar
    known = {"model", "messages", "system", "max_tokens", "temperature", "top_p", "top_k",
             "stop_sequences", "stream", "metadata", "tools", "tool_choice", "thinking",
             "output_config", "output_format", "grammar"}
    extra = sorted(set(body) - known)
    if extra:
        log.debug("ignored Messages API fields: %s", ", ".join(extra))
    return req


# --- answers ---------------------------------------------------------------------------------

def new_message_id() -> str:
    """A message id such as ``msg_…``."""
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id(raw: str | None) -> str:
    """A ``toolu_…`` id for an engine's tool-call id (stable, so the round trip matches)."""
    if raw and raw.startswith("toolu_"):
        return raw
    tail = re.sub(r"[^A-Za-z0-9_-]", "", raw or "") or uuid.uuid4().hex[:24]
    return f"toolu_{tail}"


def thinking_signature(thinking: str) -> str:
    """An opaque signature for a thinking block (a digest; nothing verifies it here)."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments and arguments.strip() else {}
    except ValueError:
        log.warning("tool call arguments are not JSON: %r", arguments[:200])
        return {}
    return value if isinstance(value, dict) else {"value": value}


def anthropic_usage(finish: Finish | None) -> dict[str, Any]:
    """Anthropic usage: ``input_tokens`` excludes the prompt tokens read from the cache."""
    u = finish.usage if finish else None
    if u is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0}
    cached = min(u.cached_tokens, u.prompt_tokens)
    return {"input_tokens": u.prompt_tokens - cached, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def stop_reason(finish: Finish | None) -> str:
    """The Anthropic ``stop_reason`` of a finish."""
    if finish is None:
        return "end_turn"
    if finish.tool_calls and finish.reason != "length":  # a call cut off: max_tokens
        return "tool_use"
    if finish.context_full:
        return "model_context_window_exceeded"
    return STOP_REASONS.get(finish.reason, "end_turn")


def internal_to_anthropic_message(result: Any, model: str, message_id: str | None = None
                                  ) -> dict[str, Any]:
    """The non-streamed Messages response body from a collected Result."""
    finish = result.finish
    content: list[dict[str, Any]] = []
    if result.reasoning:
        content.append({"type": "thinking", "thinking": result.reasoning,
                        "signature": thinking_signature(result.reasoning)})
    if result.text:
        content.append({"type": "text", "text": result.text})
    for call in result.tool_calls:
        content.append({"type": "tool_use", "id": tool_use_id(call.id), "name": call.name,
                        "input": _tool_input(call.arguments)})
    reason = stop_reason(finish)
    return {"id": message_id or new_message_id(), "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": reason,
            "stop_sequence": finish.stop_sequence if finish and reason == "stop_sequence"
            else None,
            "usage": anthropic_usage(finish)}


Frame = tuple[str, dict[str, Any]]


class AnthropicStream:
    """Internal events → Anthropic stream events ``(event name, data)``, with the stream's state.

    Order: ``message_start``; per content block ``content_block_start`` (the first one followed
    by ``ping``), deltas, ``content_block_stop`` (a thinking block gets one
    ``signature_delta`` before it closes); then ``message_delta`` and ``message_stop``.
    """

    def __init__(self, model: str, message_id: str | None = None,
                 input_tokens: int = 0) -> None:
        self.id = message_id or new_message_id()
        self.model = model
        self.input_tokens = input_tokens
        self.cached_tokens = 0
        self._started = False
        self._index = -1  # index of the last block opened
        self._open: str | None = None  # type of the open block
        self._thinking: list[str] = []
        self._tool_blocks: dict[int, int] = {}  # engine tool index → block index
        self._pinged = False
        self._ended = False

    def start(self) -> list[Frame]:
        """``message_start``, sent once."""
        if self._started:
            return []
        self._started = True
        return [("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0,
                      "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": self.cached_tokens}}})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[Frame]:
        out = self._close_block()
        self._index += 1
        self._open = kind
        out.append(("content_block_start", {"type": "content_block_start",
                                            "index": self._index, "content_block": block}))
        if not self._pinged:
            self._pinged = True
            out.append(("ping", {"type": "ping"}))
        return out

    def _close_block(self) -> list[Frame]:
        if self._open is None:
            return []
        out: list[Frame] = []
        if self._open == "thinking":
            out.append(self._delta({"type": "signature_delta",
                                    "signature": thinking_signature("".join(self._thinking))}))
            self._thinking = []
        out.append(("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        self._open = None
        return out

    def _delta(self, delta: dict[str, Any]) -> Frame:
        return ("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                        "delta": delta})

    def _tool_block(self, index: int, call_id: str | None, name: str) -> list[Frame]:
        out = self._open_block("tool_use", {"type": "tool_use", "id": tool_use_id(call_id),
                                            "name": name, "input": {}})
        self._tool_blocks[index] = self._index
        return out

    def process(self, event: Event) -> list[Frame]:
        """Stream events for one internal event."""
        if isinstance(event, PromptInfo) and not self._started:
            # message_start carries the prompt size, as the real API's does.
            self.input_tokens = event.prompt_tokens - event.cached_tokens
            self.cached_tokens = event.cached_tokens
        out = self.start()
        if self._ended:
            return out
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return out
            if self._open != "thinking":
                out += self._open_block("thinking", {"type": "thinking", "thinking": "",
                                                     "signature": ""})
            self._thinking.append(event.text)
            out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
        elif isinstance(event, TextDelta):
            if not event.text:
                return out
            if self._open != "text":
                out += self._open_block("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": event.text}))
        elif isinstance(event, ToolCallDelta):
            if event.index not in self._tool_blocks:
                out += self._tool_block(event.index, event.id, event.name or "")
            elif self._tool_blocks[event.index] != self._index or self._open != "tool_use":
                # A late piece of a call whose block was closed: Anthropic blocks cannot be
                # reopened, and llama-server streams calls one after another, so drop it.
                log.warning("tool call %d continued after its block closed", event.index)
                return out
            if event.arguments:
                out.append(self._delta({"type": "input_json_delta",
                                        "partial_json": event.arguments}))
        elif isinstance(event, Finish):
            for i, call in enumerate(event.tool_calls):
                if i not in self._tool_blocks:  # calls the engine only named at the end
                    out += self._tool_block(i, call.id, call.name)
                    if call.arguments:
                        out.append(self._delta({"type": "input_json_delta",
                                                "partial_json": call.arguments}))
            out += self._close_block()
            reason = ("tool_use" if self._tool_blocks and event.reason != "length"
                      else stop_reason(event))
            out.append(("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": reason,
                          "stop_sequence": event.stop_sequence if reason == "stop_sequence"
                          else None},
                "usage": anthropic_usage(event)}))
            out.append(("message_stop", {"type": "message_stop"}))
            self._ended = True
        return out

    def error(self, exc: ServiceError) -> list[Frame]:
        """The ``error`` event for a failure after the stream began (the SDK raises on it)."""
        body, _ = anthropic_error(exc)
        return [("error", body)]


# --- models ----------------------------------------------------------------------------------

def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def anthropic_model(info: Any) -> dict[str, Any]:
    """One Anthropic ``ModelInfo`` object for a model of the store."""
    out: dict[str, Any] = {"type": "model", "id": info.name, "display_name": info.name,
                           "created_at": _rfc3339(info.modified_at or 0)}
    if info.context_length:
        out["max_input_tokens"] = info.context_length
    return out


def anthropic_models_page(infos: list[Any], args: Any) -> dict[str, Any]:
    """``GET /v1/models`` in Anthropic's shape, paged by ``limit``/``after_id``/``before_id``."""
    limit = args.get("limit")
    if limit is None or limit == "":
        size = 20
    else:
        try:
            size = int(limit)
        except (TypeError, ValueError):
            raise InvalidRequest(f"limit: must be an integer, got {limit!r}",
                                 param="limit") from None
        if not 1 <= size <= 1000:
            raise InvalidRequest("limit: must be between 1 and 1000", param="limit")
    items = [anthropic_model(i) for i in infos]
    ids = [m["id"] for m in items]
    after, before = args.get("after_id"), args.get("before_id")
    if after:
        if after not in ids:
            raise InvalidRequest(f"after_id: unknown model id {after!r}", param="after_id")
        items = items[ids.index(after) + 1:]
        page, has_more = items[:size], len(items) > size
    elif before:
        if before not in ids:
            raise InvalidRequest(f"before_id: unknown model id {before!r}", param="before_id")
        items = items[:ids.index(before)]
        page, has_more = items[-size:], len(items) > size
    else:
        page, has_more = items[:size], len(items) > size
    return {"data": page, "has_more": has_more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


# --- errors ----------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 504: "timeout_error",
               529: "overloaded_error"}


def anthropic_error(exc: ServiceError) -> tuple[dict[str, Any], int]:
    """``{"type": "error", "error": {type, message}}`` and the status for ``exc``."""
    if isinstance(exc, AuthenticationError):
        status = 401
    elif isinstance(exc, (ModelNotFound, NotFound)):
        status = 404
    elif isinstance(exc, PayloadTooLarge):
        status = 413
    elif isinstance(exc, Overloaded):
        status = 529  # Anthropic's "overloaded"; the SDK retries it like a 5xx
    elif isinstance(exc, InvalidRequest):
        status = exc.status if 400 <= exc.status < 500 else 400  # 405 stays 405
    elif exc.status in (403, 429, 503):  # 503: an engine dependency is down, retry later
        status = exc.status
    elif isinstance(exc, RequestTimeout):
        status = 504
    else:
        status = 500
    message = exc.message
    if isinstance(exc, ModelNotFound):
        message = f"model: {exc.name}"  # the real API's wording for an unknown model
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}, status
