"""OpenAI wire format ⇄ internal types. Pure: no Flask, no I/O.

Requests: ``openai_chat_to_internal``, ``openai_completion_to_internal``,
``openai_embeddings_inputs``. Answers: ``internal_to_openai_chat``,
``internal_to_openai_completion``, and the stream converters ``OpenAIChatStream`` and
``OpenAICompletionStream`` (``process(event) -> [chunk dicts]``). Errors: ``openai_error``.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from typing import Any

from ..core.errors import (
    InvalidRequest,
)
from ..core.grammar import GrammarError, apply_tgi_grammar
from ..core.schemas import (
    Event,
    Finish,
    InternalRequest,
    PromptInfo,
    ReasoningDelta,
    TextDelta,
    TokenInfo,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from .fields import (  # noqa: F401 (re-exported)
    get_bool,
    get_number,
    get_stop,
    parse_function_tools,
    require_model,
)
from .openai_fields import (  # noqa: F401 (openai_error re-exported for the blueprints)
    REASONING_EFFORTS,
    apply_vllm_extras,
    common_sampling,
    openai_error,
    parse_messages,
)

FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length",
                  "tool_calls": "tool_calls"}
FINGERPRINT = "fp_ollama_server"


def _parse_tools(body: dict[str, Any]) -> list[Tool]:
    raw = body.get("tools")
    if raw is None and body.get("functions"):
        raw = [{"type": "function", "function": f} for f in body["functions"]]
    return parse_function_tools(raw)


def _parse_tool_choice(body: dict[str, Any]) -> str | dict[str, Any] | None:
    choice = body.get("tool_choice", body.get("function_call"))
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest("'tool_choice' must be none, auto, required or a function",
                                 param="tool_choice")
        return choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if not isinstance(name, str):
            raise InvalidRequest("'tool_choice' names no function", param="tool_choice")
        return {"name": name}
    raise InvalidRequest("'tool_choice' must be a string or an object", param="tool_choice")


def _response_format(body: dict[str, Any], req: InternalRequest) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise InvalidRequest("'response_format' must be an object", param="response_format")
    kind = fmt.get("type")
    if kind == "text":
        return
    if kind in ("json_object", "json", "regex") and "value" in fmt:
        _grammar_format(fmt, req)
    elif kind == "json_object":
        req.json_schema = {}
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest("'response_format.json_schema' must be an object with a "
                                 "'schema'", param="response_format")
        req.json_schema = spec.get("schema") or {}
    else:
        raise InvalidRequest(f"'response_format.type' must be text, json_object or "
                             f"json_schema; got {kind!r}", param="response_format")


def _grammar_format(fmt: dict[str, Any], req: InternalRequest) -> None:
    """TGI's grammar form of ``response_format`` (``{type, value}``), which its chat route
    takes and huggingface_hub's ``chat_completion`` sends: it turns OpenAI's ``json_schema``
    into ``{"type": "json_object", "value": <schema>}``. Read as TGI reads its grammar."""
    try:
        apply_tgi_grammar(fmt, req)
    except GrammarError as exc:
        raise InvalidRequest(f"'response_format': {exc.message}",
                             param="response_format") from None


def include_usage(body: dict[str, Any]) -> bool:
    """True when the client asked for a usage chunk at the end of the stream."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    return bool(options.get("include_usage"))


def continuous_usage(body: dict[str, Any]) -> bool:
    """vLLM's ``stream_options.continuous_usage_stats``: usage on every chunk (with
    ``include_usage``, as vLLM requires both)."""
    options = body.get("stream_options")
    return (include_usage(body) and isinstance(options, dict)
            and options.get("continuous_usage_stats") is True)


def openai_chat_to_internal(body: dict[str, Any], dialect: str = "openai") -> InternalRequest:
    """A chat completions body → InternalRequest (InvalidRequest on a bad field)."""
    req = InternalRequest(model=require_model(body), dialect=dialect,
                          messages=parse_messages(body.get("messages")))
    common_sampling(body, req)
    max_tokens = get_number(body, "max_completion_tokens", 1, integer=True)
    if max_tokens is None:
        max_tokens = get_number(body, "max_tokens", 1, integer=True)
    req.max_tokens = max_tokens
    req.logprobs = get_bool(body, "logprobs")
    top = get_number(body, "top_logprobs", 0, 20, integer=True)
    if top:
        if not req.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        req.top_logprobs = top
    _response_format(body, req)
    req.tools = _parse_tools(body)
    req.tool_choice = _parse_tool_choice(body)
    if req.tool_choice == "required" and not req.tools:
        raise InvalidRequest("Invalid value for 'tool_choice': 'tool_choice' is only allowed "
                             "when 'tools' are specified.", param="tool_choice")
    if isinstance(req.tool_choice, dict) and not any(
            t.name == req.tool_choice["name"] for t in req.tools):
        raise InvalidRequest(f"tool_choice names {req.tool_choice['name']!r}, which is not in "
                             f"'tools'", param="tool_choice")
    if body.get("parallel_tool_calls") is not None:
        req.parallel_tool_calls = get_bool(body, "parallel_tool_calls")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise InvalidRequest(
                f"Invalid value: '{effort}'. Supported values are: "
                f"{', '.join(repr(e) for e in REASONING_EFFORTS)}.", param="reasoning_effort")
        req.reasoning = effort != "none"
        if req.reasoning:
            req.reasoning_effort = str(effort)
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, dict):
        req.chat_template_kwargs = dict(kwargs)
        if isinstance(kwargs.get("enable_thinking"), bool):
            req.reasoning = kwargs["enable_thinking"]
    apply_vllm_extras(body, req)
    return req


def openai_completion_to_internal(body: dict[str, Any], dialect: str = "openai"
                                  ) -> InternalRequest:
    """A legacy completions body → InternalRequest (raw prompt, no chat template)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool)
                                 for t in prompt):
            raise InvalidRequest("'prompt' must be a string, a list of one string, or a list "
                                 "of token ids (batches of prompts are not supported)",
                                 param="prompt")
    elif not isinstance(prompt, str):
        raise InvalidRequest("'prompt' is required and must be a string or token ids",
                             param="prompt")
    req = InternalRequest(model=require_model(body), dialect=dialect, prompt=prompt, raw=True)
    common_sampling(body, req)
    max_tokens = get_number(body, "max_tokens", 0, integer=True)
    req.max_tokens = 16 if max_tokens is None else max_tokens
    logprobs = get_number(body, "logprobs", 0, 20, integer=True)
    if logprobs is not None:
        req.logprobs = True
        req.top_logprobs = logprobs
    best_of = get_number(body, "best_of", 1, integer=True)
    if best_of not in (None, 1):
        raise InvalidRequest("only best_of=1 is supported", param="best_of")
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise InvalidRequest("'suffix' must be a string", param="suffix")
        if suffix:
            req.suffix = suffix
    _response_format(body, req)
    apply_vllm_extras(body, req)
    return req


def openai_embeddings_inputs(body: dict[str, Any]) -> tuple[list[Any], str, int | None]:
    """(inputs, encoding format, dimensions) of an embeddings body."""
    raw = body.get("input")
    if isinstance(raw, str):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(
            isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in raw):
        inputs = list(raw)
    else:
        raise InvalidRequest("'input' must be a non-empty string, list of strings, list of "
                             "token ids, or list of token id lists", param="input")
    if any(isinstance(x, str) and not x for x in inputs):
        raise InvalidRequest("'input' cannot contain empty strings", param="input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be float or base64",
                             param="encoding_format")
    dims = get_number(body, "dimensions", 1, integer=True)
    return inputs, fmt, dims


def shape_embedding(vector: list[float], dims: int | None, fmt: str) -> list[float] | str:
    """Truncate (and renormalise) to ``dims``; encode as base64 little-endian float32."""
    if dims is not None and dims < len(vector):
        vector = vector[:dims]
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        vector = [x / norm for x in vector]
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def internal_to_openai_embeddings(vectors: list[list[float]], model: str, prompt_tokens: int,
                                  fmt: str, dims: int | None) -> dict[str, Any]:
    """The embeddings response body."""
    return {"object": "list",
            "data": [{"object": "embedding", "index": i,
                      "embedding": shape_embedding(v, dims, fmt)}
                     for i, v in enumerate(vectors)],
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


# --- answers ---------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    """An id such as ``chatcmpl-…``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def stop_reason(finish: Finish | None) -> str | int | None:
    """vLLM's ``stop_reason`` on a choice: the stop string that ended it, or the id of the
    stop token (``stop_token_ids``), else None."""
    if not finish or finish.reason != "stop_sequence":
        return None
    return finish.stop_token if finish.stop_token is not None else finish.stop_sequence


def usage_dict(finish: Finish | None) -> dict[str, Any]:
    """OpenAI usage from a Finish."""
    u = finish.usage if finish else None
    if u is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def choices_usage(finishes: list[Finish | None]) -> dict[str, Any]:
    """OpenAI usage of all choices: the prompt once, generated tokens summed."""
    done = [f for f in finishes if f is not None]
    if len(finishes) == 1 or not done:
        return usage_dict(finishes[0] if finishes else None)
    return usage_dict(Finish("stop", Usage.of_choices([f.usage for f in done])))


def _as_list(results: Any) -> list[Any]:
    return list(results) if isinstance(results, list) else [results]


def _chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any] | None:
    if not tokens:
        return None
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": t.bytes,
                         "top_logprobs": [{"token": s, "logprob": lp,
                                           "bytes": list(s.encode())} for s, lp, _ in t.top]}
                        for t in tokens if t.logprob is not None]}


def tool_call_dicts(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` from complete calls."""
    return [{"id": c.id or new_id("call"), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def legacy_functions(body: dict[str, Any]) -> bool:
    """Whether the request offered the deprecated ``functions`` (and no ``tools``): OpenAI
    then answers with ``message.function_call`` and ``finish_reason: "function_call"``."""
    return bool(body.get("functions")) and not body.get("tools")


def named_tool_choice(body: dict[str, Any]) -> bool:
    """Whether the request forces one named function: OpenAI then ends the answer with
    ``finish_reason: "stop"``, not ``"tool_calls"`` (vLLM does the same since PR #25054)."""
    choice = body.get("tool_choice")
    return isinstance(choice, dict) and choice.get("type") == "function"


def internal_to_openai_chat(results: Any, model: str, logprobs: bool = False,
                            completion_id: str | None = None,
                            functions: bool = False, named_tool: bool = False) -> dict[str, Any]:
    """A non-streamed chat completion from a collected Result (or one per choice);
    ``functions``: in the deprecated function-call form (``legacy_functions``);
    ``named_tool``: the request forced a named function (``named_tool_choice``)."""
    choices = []
    for index, result in enumerate(_as_list(results)):
        finish = result.finish
        message: dict[str, Any] = {"role": "assistant",
                                   "content": result.text if result.text or not result.tool_calls
                                   else None}
        if result.reasoning:
            message["reasoning_content"] = result.reasoning
            message["reasoning"] = result.reasoning
        reason = FINISH_REASONS.get(finish.reason if finish else "stop", "stop")
        if result.tool_calls and functions:
            call = result.tool_calls[0]  # the function-call form has room for one
            message["function_call"] = {"name": call.name, "arguments": call.arguments}
            reason = "function_call"
        elif result.tool_calls:
            message["tool_calls"] = tool_call_dicts(result.tool_calls)
            if named_tool and reason == "tool_calls":
                reason = "stop"
        choices.append({"index": index, "message": message,
                        "logprobs": _chat_logprobs(result.tokens) if logprobs else None,
                        "finish_reason": reason,
                        "stop_reason": stop_reason(finish)})
    return {
        "id": completion_id or new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
        "usage": choices_usage([r.finish for r in _as_list(results)]),
    }


class _ChoicesStream:
    """What the chat and text-completion streams share: the chunk envelope, and the usage
    chunk once every one of the ``n`` choices has finished (as OpenAI streams ``n`` > 1: each
    chunk carries one choice, by its ``index``, interleaved as they are generated)."""

    object = ""

    def __init__(self, prefix: str, model: str, include_usage: bool, logprobs: bool,
                 n: int, completion_id: str | None = None,
                 continuous_usage: bool = False) -> None:
        self.id = completion_id or new_id(prefix)
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.n = n
        self._finishes: dict[int, Finish] = {}
        self.continuous = include_usage and continuous_usage
        self._prompt_tokens = 0  # known once the engine has read the prompt
        self._generated: dict[int, int] = {}  # tokens so far, by choice

    def _count(self, event: Event) -> None:
        """Keep the running usage that ``continuous_usage_stats`` puts on every chunk: the
        prompt from the engine's first report, then the tokens each choice has generated
        (exact at its finish)."""
        if not self.continuous:
            return
        kind = type(event)
        if kind is PromptInfo:
            self._prompt_tokens = event.prompt_tokens
        elif kind is Finish:
            self._prompt_tokens = event.usage.prompt_tokens or self._prompt_tokens
            self._generated[event.choice] = event.usage.completion_tokens
        elif kind is TextDelta or kind is ReasoningDelta or kind is ToolCallDelta:
            tokens = len(event.tokens) if kind is TextDelta else 0
            self._generated[event.choice] = self._generated.get(event.choice, 0) + (tokens or 1)

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {"id": self.id, "object": self.object, "created": self.created,
                 "model": self.model, "system_fingerprint": FINGERPRINT, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
            if self.continuous and choices:
                done = self._generated.get(choices[0]["index"], 0)
                chunk["usage"] = {"prompt_tokens": self._prompt_tokens,
                                  "completion_tokens": done,
                                  "total_tokens": self._prompt_tokens + done}
        return chunk

    def _finished(self, event: Finish, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The finish chunk of one choice, then the usage chunk after the last choice."""
        chunk["choices"][0]["stop_reason"] = stop_reason(event)
        out = [chunk]
        self._finishes[event.choice] = event
        if self.include_usage and len(self._finishes) == self.n:
            usage = self._envelope([])
            usage["usage"] = choices_usage([self._finishes[i] for i in sorted(self._finishes)])
            out.append(usage)
        return out


class OpenAIChatStream(_ChoicesStream):
    """Internal events → ``chat.completion.chunk`` dicts, with the stream's state."""

    object = "chat.completion.chunk"

    def __init__(self, model: str, include_usage: bool = False, logprobs: bool = False,
                 completion_id: str | None = None, n: int = 1,
                 continuous_usage: bool = False, functions: bool = False,
                 named_tool: bool = False) -> None:
        super().__init__("chatcmpl", model, include_usage, logprobs, n, completion_id,
                         continuous_usage)
        self._started = False
        self.functions = functions  # the deprecated function-call form (legacy_functions)
        self.named_tool = named_tool  # a forced named function ends with "stop"

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: Any = None, index: int = 0) -> dict[str, Any]:
        return self._envelope([{"index": index, "delta": delta, "logprobs": logprobs,
                                "finish_reason": finish_reason}])

    def start(self) -> list[dict[str, Any]]:
        """The first chunk of each choice (its role), sent once before any content."""
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""}, index=i)
                for i in range(self.n)]

    def process(self, event: Event) -> list[dict[str, Any]]:
        """Chunks for one internal event."""
        self._count(event)
        out = self.start()
        index = event.choice
        if isinstance(event, TextDelta):
            logprobs = _chat_logprobs(event.tokens) if self.logprobs else None
            if event.text or logprobs:
                out.append(self._chunk({"content": event.text}, logprobs=logprobs,
                                       index=index))
        elif isinstance(event, ReasoningDelta):
            out.append(self._chunk({"reasoning_content": event.text,
                                    "reasoning": event.text}, index=index))
        elif isinstance(event, ToolCallDelta) and self.functions:
            if event.index == 0:  # the function-call form has room for one call
                fn: dict[str, Any] = {"arguments": event.arguments}
                if event.name is not None:
                    fn = {"name": event.name, **fn}
                out.append(self._chunk({"function_call": fn}, index=index))
        elif isinstance(event, ToolCallDelta):
            call: dict[str, Any] = {"index": event.index,
                                    "function": {"arguments": event.arguments}}
            if event.name is not None:
                call["id"] = event.id or new_id("call")
                call["type"] = "function"
                call["function"]["name"] = event.name
            out.append(self._chunk({"tool_calls": [call]}, index=index))
        elif isinstance(event, Finish):
            reason = FINISH_REASONS.get(event.reason, "stop")
            if self.functions and reason == "tool_calls":
                reason = "function_call"
            elif self.named_tool and reason == "tool_calls":
                reason = "stop"
            out += self._finished(event, self._chunk({}, reason, index=index))
        return out


def _completion_logprobs(tokens: list[TokenInfo], offset: int = 0) -> dict[str, Any] | None:
    if not tokens:
        return None
    text_offset = []
    pos = offset
    for t in tokens:
        text_offset.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{s: lp for s, lp, _ in t.top} for t in tokens],
            "text_offset": text_offset}


def internal_to_openai_completion(results: Any, model: str, echo_prompt: str | None = None,
                                  logprobs: bool = False) -> dict[str, Any]:
    """A non-streamed text completion from a collected Result (or one per choice)."""
    choices = []
    for index, result in enumerate(_as_list(results)):
        finish = result.finish
        choices.append({
            "text": (echo_prompt or "") + result.text, "index": index,
            "logprobs": (_completion_logprobs(result.tokens, len(echo_prompt or ""))
                         if logprobs else None),
            "finish_reason": FINISH_REASONS.get(finish.reason if finish else "stop", "stop"),
            "stop_reason": stop_reason(finish)})
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
        "usage": choices_usage([r.finish for r in _as_list(results)]),
    }


class OpenAICompletionStream(_ChoicesStream):
    """Internal events → ``text_completion`` stream chunks."""

    object = "text_completion"

    def __init__(self, model: str, include_usage: bool = False, logprobs: bool = False,
                 echo_prompt: str | None = None, n: int = 1,
                 continuous_usage: bool = False) -> None:
        super().__init__("cmpl", model, include_usage, logprobs, n,
                         continuous_usage=continuous_usage)
        self._echo = echo_prompt
        self._echoed: set[int] = set()
        self._offsets = dict.fromkeys(range(n), len(echo_prompt or ""))

    def _chunk(self, text: str, finish_reason: str | None = None,
               logprobs: Any = None, index: int = 0) -> dict[str, Any]:
        return self._envelope([{"text": text, "index": index, "logprobs": logprobs,
                                "finish_reason": finish_reason}])

    def process(self, event: Event) -> list[dict[str, Any]]:
        """Chunks for one internal event."""
        self._count(event)
        out = []
        index = event.choice
        if self._echo and index not in self._echoed:
            out.append(self._chunk(self._echo, index=index))
            self._echoed.add(index)
        if isinstance(event, TextDelta):
            lp = _completion_logprobs(event.tokens, self._offsets.get(index, 0)) \
                if self.logprobs else None
            self._offsets[index] = self._offsets.get(index, 0) + len(event.text)
            if event.text or lp:
                out.append(self._chunk(event.text, logprobs=lp, index=index))
        elif isinstance(event, ReasoningDelta):
            out.append(self._chunk(event.text, index=index))
        elif isinstance(event, Finish):
            out += self._finished(event, self._chunk(
                "", FINISH_REASONS.get(event.reason, "stop"), index=index))
        return out


def model_card(info: Any) -> dict[str, Any]:
    """One ``/v1/models`` entry (vLLM's ``max_model_len`` included)."""
    owner = info.name.split("/")[-2] if info.name.count("/") >= 1 else "library"
    return {"id": info.name, "object": "model", "created": int(info.modified_at),
            "owned_by": owner, "root": info.name, "parent": None,
            "max_model_len": info.context_length or None}


# --- errors ----------------------------------------------------------------------------------
