"""OpenAI Responses API (``POST /v1/responses``) ⇄ internal types. Pure: no Flask, no I/O.

Requests: ``responses_to_internal`` (plus ``response_envelope``, the request fields every
response object echoes). Answers: ``internal_to_response`` (a collected Result → the response
object) and the stream converter ``ResponsesStream`` (``process(event) -> [(type, data)]``).
Errors before the first byte use ``openai_fields.openai_error``; after it,
``ResponsesStream.error``.

Why one module of about 600 lines: one wire format, request to stream (items, tools,
reasoning, the stream's typed events), as STYLE.md asks of a dialect.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from ..core.errors import InvalidRequest, ServiceError
from ..core.schemas import (
    Event,
    Finish,
    InternalRequest,
    Message,
    ReasoningDelta,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from .fields import get_bool, get_number, get_str, require_model
from .openai_fields import REASONING_EFFORTS, openai_error

log = logging.getLogger(__name__)

# Fields the service reads or deliberately accepts without effect (no storage, no tiers).
KNOWN_FIELDS = {
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools",
    "tool_choice", "text", "reasoning", "stream", "store", "metadata", "user",
    "parallel_tool_calls", "truncation", "previous_response_id", "include", "service_tier",
    "stream_options", "top_logprobs", "seed", "safety_identifier", "prompt_cache_key",
    "max_tool_calls", "background", "conversation", "prompt",
}


def new_id(prefix: str) -> str:
    """An id in OpenAI's style for the Responses API, such as ``resp_…`` or ``msg_…``."""
    return f"{prefix}_{uuid.uuid4().hex}"


# --- requests --------------------------------------------------------------------------------

def _image_url(part: dict[str, Any], where: str) -> str:
    url = part.get("image_url")
    if isinstance(url, dict):  # chat-completions style, accepted for convenience
        url = url.get("url")
    if part.get("file_id") and not url:
        raise InvalidRequest(f"{where}: images by file_id are not supported (no file storage); "
                             f"send a data: URL in 'image_url'", param="input")
    if not isinstance(url, str) or not url.startswith("data:"):
        raise InvalidRequest(f"{where}: only data: URLs are accepted for images (this service "
                             f"has no internet access)", param="input")
    return url


def _content(content: Any, images: list[str], where: str) -> str:
    """Text of a message item's content (string or parts); image parts go to ``images``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of content parts",
                             param="input")
    texts = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"{here} must be an object", param="input")
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{here}.text must be a string", param="input")
            texts.append(text)
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        elif kind == "input_image":
            images.append(_image_url(part, here))
        else:
            raise InvalidRequest(f"{here}: unsupported content part type {kind!r} (supported: "
                                 f"input_text, output_text, input_image)", param="input")
    return "\n".join(texts)


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value if value is not None else {})


def _parse_input(raw: Any) -> list[Message]:
    """``input`` (a string or a list of items) → messages."""
    if isinstance(raw, str):
        return [Message(role="user", content=raw)]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'input' is required and must be a string or a non-empty list of "
                             "input items", param="input")
    out: list[Message] = []
    call_names: dict[str, str] = {}
    reasoning: list[str] = []  # reasoning items belong to the assistant turn that follows
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param="input")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role == "developer":
                role = "system"
            if role not in ("user", "system", "assistant"):
                raise InvalidRequest(f"{where}.role must be one of user, system, developer, "
                                     f"assistant; got {role!r}", param="input")
            images: list[str] = []
            msg = Message(role=role, content=_content(item.get("content"), images, where),
                          images=images)
            if role == "assistant" and reasoning:
                msg.reasoning, reasoning = "\n".join(reasoning), []
            out.append(msg)
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise InvalidRequest(f"{where}: a function_call item needs 'call_id' and 'name'",
                                     param="input")
            call_names[call_id] = name
            call = ToolCall(id=call_id, name=name, arguments=_arguments(item.get("arguments")))
            # Calls of one turn are one assistant message with several tool calls.
            last = out[-1] if out else None
            if last is None or last.role != "assistant":
                last = Message(role="assistant", content="")
                out.append(last)
            if reasoning:
                last.reasoning, reasoning = "\n".join(reasoning), []
            last.tool_calls.append(call)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise InvalidRequest(f"{where}: a function_call_output item needs 'call_id'",
                                     param="input")
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, [], where)
            out.append(Message(role="tool", content=text, tool_call_id=call_id,
                               name=call_names.get(call_id)))
        elif kind == "reasoning":
            parts = [p.get("text") for p in (item.get("content") or item.get("summary") or [])
                     if isinstance(p, dict)]
            reasoning.extend(p for p in parts if isinstance(p, str) and p)
        elif kind == "item_reference":
            raise InvalidRequest(f"{where}: item references are not supported: this service "
                                 f"does not store responses; send the items themselves",
                                 param="input")
        else:
            raise InvalidRequest(f"{where}: unsupported input item type {kind!r} (supported: "
                                 f"message, function_call, function_call_output, reasoning)",
                                 param="input")
    if not out:
        raise InvalidRequest("'input' has no message", param="input")
    return out


def _parse_tools(raw: Any) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be a list", param="tools")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise InvalidRequest(f"tools[{i}] must be an object", param="tools")
        if t.get("type") != "function":
            raise InvalidRequest(f"tools[{i}]: tool type {t.get('type')!r} is not supported; "
                                 f"only function tools are (this service has no built-in "
                                 f"tools such as web search)", param="tools")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tools[{i}]: a function tool needs 'name' at its top level "
                                 f"({{type: 'function', name, description, parameters}})",
                                 param="tools")
        params = t.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequest(f"tools[{i}].parameters must be a JSON schema object",
                                 param="tools")
        tools.append(Tool(name=name, description=t.get("description") or "",
                          parameters=params or {"type": "object", "properties": {}}))
    return tools


def _parse_tool_choice(raw: Any, tools: list[Tool]) -> str | dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise InvalidRequest("'tool_choice' must be none, auto, required or "
                                 "{type: 'function', name}", param="tool_choice")
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function":
        name = raw.get("name")
        if not isinstance(name, str):
            raise InvalidRequest("'tool_choice' names no function", param="tool_choice")
        if not any(t.name == name for t in tools):
            raise InvalidRequest(f"tool_choice names {name!r}, which is not in 'tools'",
                                 param="tool_choice")
        return {"name": name}
    raise InvalidRequest("'tool_choice' must be none, auto, required or {type: 'function', "
                         "name}", param="tool_choice")


def _text_format(body: dict[str, Any], req: InternalRequest) -> None:
    text = body.get("text")
    if text is None:
        return
    if not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object", param="text")
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise InvalidRequest("'text.format' must be an object", param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        req.json_schema = {}
    elif kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest("'text.format.schema' must be a JSON schema object",
                                 param="text.format.schema")
        if not isinstance(fmt.get("name"), str):
            raise InvalidRequest("'text.format.name' is required for json_schema",
                                 param="text.format.name")
        req.json_schema = schema
    else:
        raise InvalidRequest(f"'text.format.type' must be text, json_object or json_schema; "
                             f"got {kind!r}", param="text.format.type")


def _reasoning(body: dict[str, Any], req: InternalRequest) -> None:
    raw = body.get("reasoning")
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise InvalidRequest("'reasoning' must be an object", param="reasoning")
    effort = raw.get("effort")
    if effort is None:
        return
    if effort not in REASONING_EFFORTS:
        raise InvalidRequest(f"'reasoning.effort' must be one of {', '.join(REASONING_EFFORTS)};"
                             f" got {json.dumps(effort)}", param="reasoning.effort")
    req.reasoning = effort != "none"
    if req.reasoning:
        req.reasoning_effort = effort


def responses_to_internal(body: dict[str, Any]) -> InternalRequest:
    """A Responses API body → InternalRequest (InvalidRequest on a bad field)."""
    model = require_model(body)
    if body.get("previous_response_id") is not None:
        raise InvalidRequest("'previous_response_id' is not supported: this service does not "
                             "store responses; send the whole conversation in 'input'",
                             param="previous_response_id")
    if body.get("conversation") is not None:
        raise InvalidRequest("'conversation' is not supported: this service does not store "
                             "conversations; send the whole conversation in 'input'",
                             param="conversation")
    if body.get("prompt") is not None:
        raise InvalidRequest("'prompt' (stored prompt templates) is not supported",
                             param="prompt")
    if get_bool(body, "background"):
        raise InvalidRequest("'background' responses are not supported (nothing is stored)",
                             param="background")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        log.debug("responses: ignoring unknown fields %s", unknown)
    messages = _parse_input(body.get("input"))
    instructions = get_str(body, "instructions")
    if instructions:
        messages.insert(0, Message(role="system", content=instructions))
    req = InternalRequest(model=model, dialect="openai", messages=messages,
                          prompt_field="input")
    req.max_tokens = get_number(body, "max_output_tokens", 1, integer=True)
    req.temperature = get_number(body, "temperature", 0, 2)
    req.top_p = get_number(body, "top_p", 0, 1)
    req.seed = get_number(body, "seed", integer=True)
    req.stream = get_bool(body, "stream")
    top = get_number(body, "top_logprobs", 0, 20, integer=True)
    include = body.get("include")
    if include is not None and not (isinstance(include, list)
                                    and all(isinstance(x, str) for x in include)):
        raise InvalidRequest("'include' must be a list of strings", param="include")
    if top or "message.output_text.logprobs" in (include or []):
        req.logprobs = True
        req.top_logprobs = top or 0
    req.tools = _parse_tools(body.get("tools"))
    req.tool_choice = _parse_tool_choice(body.get("tool_choice"), req.tools)
    if body.get("parallel_tool_calls") is not None:
        req.parallel_tool_calls = get_bool(body, "parallel_tool_calls")
    _text_format(body, req)
    _reasoning(body, req)
    get_bool(body, "store", default=True)
    get_str(body, "user")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise InvalidRequest("'metadata' must be an object", param="metadata")
    if body.get("truncation") not in (None, "auto", "disabled"):
        raise InvalidRequest("'truncation' must be auto or disabled", param="truncation")
    return req


def _echo_tools(raw: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "name": t["name"], "description": t.get("description"),
             "parameters": t.get("parameters"), "strict": t.get("strict", True)}
            for t in raw or []]


def response_envelope(body: dict[str, Any], req: InternalRequest,
                      response_id: str | None = None) -> dict[str, Any]:
    """The response object without output, status and usage: the request fields it echoes.

    Sampling values are taken from ``req`` after the model's defaults were applied, so they
    say what was used; unset ones are OpenAI's defaults (1.0).
    """
    choice = body.get("tool_choice") or "auto"
    text = dict(body["text"]) if isinstance(body.get("text"), dict) else {}
    text.setdefault("format", {"type": "text"})
    text.setdefault("verbosity", "medium")
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    return {
        "id": response_id or new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": body["model"],
        "output": [],
        "parallel_tool_calls": (req.parallel_tool_calls
                                if req.parallel_tool_calls is not None else True),
        "previous_response_id": None,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "service_tier": "default",
        "store": False,  # nothing is kept: no GET /v1/responses/{id}, no previous_response_id
        "temperature": req.temperature if req.temperature is not None else 1.0,
        "text": text,
        "tool_choice": choice,
        "tools": _echo_tools(body.get("tools")),
        "top_logprobs": body.get("top_logprobs") or 0,
        "top_p": req.top_p if req.top_p is not None else 1.0,
        "truncation": body.get("truncation") or "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


# --- answers ---------------------------------------------------------------------------------

def usage_dict(usage: Usage | None) -> dict[str, Any]:
    """Responses API usage from internal Usage."""
    u = usage or Usage()
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens}


def _logprobs(tokens: list[Any]) -> list[dict[str, Any]]:
    return [{"token": t.text, "logprob": t.logprob, "bytes": t.bytes or list(t.text.encode()),
             "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                              for s, lp, _ in t.top]}
            for t in tokens if t.logprob is not None]


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _message_item(item_id: str, text: str, status: str,
                  logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text, logprobs)]}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "encrypted_content": None,
            "status": "completed"}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str
               ) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _finish_fields(response: dict[str, Any], finish: Finish | None) -> dict[str, Any]:
    """Status, incomplete details, usage and completion time from the Finish."""
    incomplete = finish is not None and finish.reason == "length"
    response["status"] = "incomplete" if incomplete else "completed"
    response["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
    response["completed_at"] = None if incomplete else int(time.time())
    response["usage"] = usage_dict(finish.usage if finish else None)
    return response


def internal_to_response(result: Any, envelope: dict[str, Any], logprobs: bool = False
                         ) -> dict[str, Any]:
    """A non-streamed response object from a collected Result and the request's envelope."""
    finish = result.finish
    status = "incomplete" if finish is not None and finish.reason == "length" else "completed"
    output: list[dict[str, Any]] = []
    if result.reasoning:
        output.append(_reasoning_item(new_id("rs"), result.reasoning))
    if result.text or not result.tool_calls:
        output.append(_message_item(new_id("msg"), result.text, status,
                                    _logprobs(result.tokens) if logprobs else None))
    for call in result.tool_calls:
        output.append(_call_item(new_id("fc"), call.id or new_id("call"), call.name,
                                 call.arguments, "completed"))
    response = dict(envelope, output=output)
    return _finish_fields(response, finish)


class ResponsesStream:
    """Internal events → Responses API stream events ``(type, data)``, with the stream's state.

    The sequence is the one the SDK's accumulator expects: ``response.created``,
    ``response.in_progress``; per output item ``output_item.added``, its content events,
    ``output_item.done``; then ``response.completed`` (``response.incomplete`` when the token
    limit cut the answer) with the whole response object.
    """

    def __init__(self, envelope: dict[str, Any], logprobs: bool = False) -> None:
        self.response = dict(envelope, output=[], status="in_progress")
        self.logprobs = logprobs
        self._seq = 0
        self._started = False
        self._done = False
        self._output: list[dict[str, Any]] = []  # finished items, in output order
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call index → its open item state

    def _event(self, kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
        event = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return kind, event

    def _snapshot(self, **changes: Any) -> dict[str, Any]:
        return dict(self.response, output=list(self._output), **changes)

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        """``response.created`` and ``response.in_progress``, once."""
        if self._started:
            return []
        self._started = True
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    # Items are opened lazily by the first event of their kind and closed by the next item.

    def _open_item(self, kind: str, item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        index = len(self._output)
        self._open = {"kind": kind, "id": item["id"], "index": index, "text": [],
                      "logprobs": [], "item": item}
        out = [self._event("response.output_item.added", output_index=index, item=item)]
        if kind == "message":
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=index, content_index=0, part=_text_part("")))
        elif kind == "reasoning":
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=index, content_index=0,
                                   part={"type": "reasoning_text", "text": ""}))
        return out

    def _close_item(self, status: str = "completed") -> list[tuple[str, dict[str, Any]]]:
        cur, self._open = self._open, None
        if cur is None:
            return []
        item_id, index, text = cur["id"], cur["index"], "".join(cur["text"])
        out = []
        if cur["kind"] == "message":
            part = _text_part(text, cur["logprobs"] if self.logprobs else None)
            out.append(self._event("response.output_text.done", item_id=item_id,
                                   output_index=index, content_index=0, text=text,
                                   logprobs=part["logprobs"]))
            out.append(self._event("response.content_part.done", item_id=item_id,
                                   output_index=index, content_index=0, part=part))
            item = _message_item(item_id, text, status, part["logprobs"])
        elif cur["kind"] == "reasoning":
            out.append(self._event("response.reasoning_text.done", item_id=item_id,
                                   output_index=index, content_index=0, text=text))
            out.append(self._event("response.content_part.done", item_id=item_id,
                                   output_index=index, content_index=0,
                                   part={"type": "reasoning_text", "text": text}))
            item = _reasoning_item(item_id, text)
        else:
            src = cur["item"]
            out.append(self._event("response.function_call_arguments.done", item_id=item_id,
                                   output_index=index, name=src["name"], arguments=text))
            item = _call_item(item_id, src["call_id"], src["name"], text, "completed")
        self._output.append(item)
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def process(self, event: Event) -> list[tuple[str, dict[str, Any]]]:
        """Stream events for one internal event."""
        out = self.start()
        if self._done:
            return out
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return out
            if self._open is None or self._open["kind"] != "reasoning":
                out += self._close_item()
                out += self._open_item("reasoning", {
                    "id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                    "encrypted_content": None, "status": "in_progress"})
            self._open["text"].append(event.text)
            out.append(self._event("response.reasoning_text.delta", item_id=self._open["id"],
                                   output_index=self._open["index"], content_index=0,
                                   delta=event.text))
        elif isinstance(event, TextDelta):
            lp = _logprobs(event.tokens) if self.logprobs else []
            if not event.text and not lp:
                return out
            if self._open is None or self._open["kind"] != "message":
                out += self._close_item()
                out += self._open_item("message", {
                    "id": new_id("msg"), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": []})
            self._open["text"].append(event.text)
            self._open["logprobs"].extend(lp)
            out.append(self._event("response.output_text.delta", item_id=self._open["id"],
                                   output_index=self._open["index"], content_index=0,
                                   delta=event.text, logprobs=lp))
        elif isinstance(event, ToolCallDelta):
            cur = self._open
            if cur is None or cur["kind"] != "function_call" or cur["call"] != event.index:
                out += self._close_item()
                item = _call_item(new_id("fc"), event.id or new_id("call"), event.name or "",
                                  "", "in_progress")
                out += self._open_item("function_call", item)
                self._open["call"] = event.index
            elif event.name and not cur["item"]["name"]:
                cur["item"]["name"] = event.name
            if event.arguments:
                self._open["text"].append(event.arguments)
                out.append(self._event("response.function_call_arguments.delta",
                                       item_id=self._open["id"],
                                       output_index=self._open["index"],
                                       delta=event.arguments))
        elif isinstance(event, Finish):
            out += self._finish(event)
        return out

    def _finish(self, finish: Finish) -> list[tuple[str, dict[str, Any]]]:
        incomplete = finish.reason == "length"
        out = self._close_item("incomplete" if incomplete else "completed")
        if not self._output:
            # An empty answer is still one (empty) message, as the non-streamed form has.
            out += self._open_item("message", {"id": new_id("msg"), "type": "message",
                                               "role": "assistant", "status": "in_progress",
                                               "content": []})
            out += self._close_item("incomplete" if incomplete else "completed")
        self._done = True
        final = _finish_fields(self._snapshot(), finish)
        self.response = final
        kind = "response.incomplete" if incomplete else "response.completed"
        out.append(self._event(kind, response=final))
        return out

    def error(self, exc: ServiceError) -> list[tuple[str, dict[str, Any]]]:
        """Events for a failure after the first byte: ``error``, then ``response.failed``.

        The error event carries ``code``/``message``/``param`` at its top level (the documented
        ``ResponseErrorEvent``) and the same under ``error`` (what OpenAI sends in practice;
        the Python SDK raises ``APIError`` on it).
        """
        out = self.start()
        body, status = openai_error(exc)
        err = body["error"]
        code = err.get("code") or ("server_error" if status >= 500 else err.get("type"))
        out.append(self._event("error", code=code, message=err["message"],
                               param=err.get("param"), error=err))
        self._open = None
        self._done = True
        failed = self._snapshot(status="failed",
                                error={"code": code, "message": err["message"]},
                                usage=None)
        self.response = failed
        out.append(self._event("response.failed", response=failed))
        return out
