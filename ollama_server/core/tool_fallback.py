"""Tool calling for models whose chat template knows nothing of tools.

llama-server drops ``tools`` for such templates, so the model never sees them. This module does
what Ollama and llama.cpp's generic format do instead, once for every dialect:

- ``prepare(req)`` rewrites the request: the tool definitions and the answer format go into the
  system prompt, earlier tool calls and results become plain messages, and when a call is
  required (``tool_choice`` required or a named tool) the output is constrained by a JSON schema
  so the model can only answer with a valid call.
- ``ToolCallExtractor`` turns an answer that is such a JSON call into ToolCallDelta events and a
  ``tool_calls`` finish; any other answer passes through as text. It holds text back only while
  the answer could still be a call (it starts with ``{`` or ``[``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from .schemas import (
    Event,
    Finish,
    InternalRequest,
    Message,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
)


def template_supports_tools(chat_template: str | None) -> bool:
    """True when a Jinja chat template renders ``tools`` itself."""
    return bool(chat_template) and "tools" in (chat_template or "")


def _call_schema(tools: list[Tool]) -> dict[str, Any]:
    return {"anyOf": [{"type": "object",
                       "properties": {"name": {"const": t.name},
                                      "arguments": t.parameters or {"type": "object"}},
                       "required": ["name", "arguments"]} for t in tools]}


def _instructions(tools: list[Tool], required: bool) -> str:
    specs = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                  "parameters": t.parameters}) for t in tools)
    when = ("You must call one of them." if required else
            "Call one only when it helps answer the user; otherwise answer normally.")
    return ("You can call these functions:\n" + specs + "\n" + when +
            ' To call a function, answer with only a JSON object: '
            '{"name": "<function name>", "arguments": {<arguments>}}.')


def prepare(req: InternalRequest) -> list[Tool] | None:
    """Rewrite ``req`` for a template without tool support; return the tools to extract.

    Returns None (request unchanged) when the request has no tools.
    """
    if not req.tools or req.messages is None:
        return None
    tools = list(req.tools)
    choice = req.tool_choice
    req.tools = []
    req.tool_choice = None
    if choice == "none":
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t.name == choice.get("name")] or tools
    required = choice == "required" or isinstance(choice, dict)
    messages: list[Message] = []
    for m in req.messages:
        if m.role == "assistant" and m.tool_calls:
            calls = [{"name": c.name, "arguments": _loads(c.arguments)} for c in m.tool_calls]
            text = json.dumps(calls[0] if len(calls) == 1 else calls)
            messages.append(Message("assistant", (m.content + "\n" if m.content else "") + text))
        elif m.role == "tool":
            label = f" of {m.name}" if m.name else ""
            messages.append(Message("user", f"Result{label}: {m.content}"))
        else:
            messages.append(m)
    instructions = _instructions(tools, required)
    if messages and messages[0].role == "system":
        first = messages[0]
        messages[0] = Message("system", f"{first.content}\n\n{instructions}", first.images)
    else:
        messages.insert(0, Message("system", instructions))
    req.messages = messages
    if required and req.grammar is None and req.json_schema is None:
        req.json_schema = _call_schema(tools)
    return tools


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def parse_calls(text: str, tools: list[Tool]) -> list[ToolCall] | None:
    """The calls in ``text`` when it is exactly a call (or a list of calls), else None."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    items = data if isinstance(data, list) else [data]
    names = {t.name for t in tools}
    calls = []
    for item in items:
        if not (isinstance(item, dict) and item.get("name") in names):
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = _loads(args)
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=item["name"],
                              arguments=json.dumps(args if args is not None else {})))
    return calls or None


_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def parse_cut_call(text: str, tools: list[Tool]) -> ToolCall | None:
    """The call a model was writing when its answer was cut off (``max_tokens``), as OpenAI
    returns one: the function's name and the arguments' text so far (not valid JSON). None
    when ``text`` is not the start of a call (``{"name": "<tool>", "arguments": …``) of one of
    ``tools``: its name must be complete, or the text a beginning of the only tool's call."""
    compact = re.sub(r"\s+", "", text)
    if not compact.startswith("{"):
        return None
    heads = {t.name: '{"name":' + json.dumps(t.name) for t in tools}
    named = [name for name, head in heads.items() if compact.startswith(head)]
    if not named and len(heads) == 1:
        named = [name for name, head in heads.items() if head.startswith(compact)]
    if len(named) != 1:
        return None
    args = _ARGUMENTS.search(text)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=named[0],
                    arguments=text[args.end():] if args else "")


class ToolCallExtractor:
    """Event filter: an answer that is a JSON call becomes tool-call events."""

    def __init__(self, tools: list[Tool]) -> None:
        self.tools = tools
        self._held: list[TextDelta] = []
        self._passing = False

    def process(self, events: Iterable[Event]) -> Iterator[Event]:
        """Apply the filter to a stream of internal events."""
        for event in events:
            if isinstance(event, TextDelta) and not self._passing:
                self._held.append(event)
                head = "".join(e.text for e in self._held).lstrip()
                if head and head[0] not in "{[":
                    self._passing = True
                    yield from self._held
                    self._held = []
            elif isinstance(event, Finish) and self._held:
                text = "".join(e.text for e in self._held)
                calls = parse_calls(text.strip(), self.tools)
                if calls is None and event.reason == "length":
                    cut = parse_cut_call(text, self.tools)
                    calls = [cut] if cut is not None else None
                if calls is None:
                    yield from self._held
                else:
                    for i, call in enumerate(calls):
                        yield ToolCallDelta(index=i, id=call.id, name=call.name,
                                            arguments=call.arguments)
                    if event.reason != "length":  # a call cut off stays "length"
                        event.reason = "tool_calls"
                    event.tool_calls = calls
                self._held = []
                yield event
            else:
                yield event
        yield from self._held
