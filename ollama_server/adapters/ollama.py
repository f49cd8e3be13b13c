"""Ollama wire format ⇄ internal types. Pure: no Flask, no I/O.

Requests: ``ollama_generate_to_internal``, ``ollama_chat_to_internal``, ``apply_options``,
``parse_keep_alive``, ``parse_think``, ``parse_format``, ``parse_modelfile``,
``ollama_embed_inputs``. Answers: the stream converters ``OllamaGenerateStream`` and
``OllamaChatStream`` (``process(event) -> [objects]``, ``finish(event, context) -> object``,
``whole(final) -> object`` for ``stream: false``), ``load_response``, and the model bodies
``tags_body``, ``show_body``, ``ps_body``, ``models_body``. Errors: ``ollama_error``.

Durations are nanoseconds measured by the engine (prompt and decode) and by the service
(load, total); times are RFC 3339 (API-REFERENCE.md §3).

Why one module of about 700 lines: it is one wire format (generate, chat, embed, the model
bodies of tags/show/ps, errors); what is not wire, Modelfiles, Go templates and durations, is
``models.modelfile``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..core.engine import kv_pool_cells
from ..core.errors import (
    AuthenticationError,
    Cancelled,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
)
from ..core.schemas import (
    Event,
    Finish,
    InternalRequest,
    Message,
    ReasoningDelta,
    TextDelta,
    TokenInfo,
    ToolCall,
)
from ..models.modelfile import (
    PARAMETER_KINDS,
    modelfile_text,
    parameters_text,
    parse_go_duration,
    render_go_template,
)
from .fields import get_bool, get_str, parse_function_tools

OLLAMA_VERSION = "0.12.6"  # the Ollama release whose API this dialect follows
FOREVER_S = -1.0  # keep_alive: never unload while idle
THINK_LEVELS = ("low", "medium", "high", "max")
DONE_REASONS = {"stop": "stop", "stop_sequence": "stop", "tool_calls": "stop",
                "length": "length"}

# options → (InternalRequest attribute, kind); the kinds are the Modelfile's PARAMETER kinds
_SAMPLING_OPTIONS: dict[str, tuple[str, str]] = {
    name: (attr, PARAMETER_KINDS[name]) for name, attr in (
        ("num_predict", "max_tokens"), ("num_ctx", "num_ctx"), ("temperature", "temperature"),
        ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"), ("typical_p", "typical_p"),
        ("repeat_penalty", "repeat_penalty"), ("repeat_last_n", "repeat_last_n"),
        ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
        ("seed", "seed"), ("stop", "stop"))}
# Runner and legacy options Ollama accepts; the engine settings decide these here.
_ACCEPTED_OPTIONS = {"num_keep", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock",
                     "num_thread", "numa", "low_vram", "vocab_only", "f16_kv", "logits_all",
                     "embedding_only", "mirostat", "mirostat_tau", "mirostat_eta",
                     "penalize_newline", "tfs_z", "grammar"}


# --- small helpers ---------------------------------------------------------------------------

def rfc3339(ts: float | None = None) -> str:
    """A UTC timestamp as Ollama writes it (``2024-05-01T12:00:00.123456Z``)."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_local(ts: float) -> str:
    """A local timestamp with its offset (``modified_at`` of /api/tags and /api/show)."""
    return datetime.fromtimestamp(ts).astimezone().isoformat()


def ns(ms: float) -> int:
    """Milliseconds → integer nanoseconds."""
    return int(round(ms * 1_000_000))


def require_model(body: dict[str, Any], *keys: str) -> str:
    """The model name from the first present key (``model``, then ``name``); 400 otherwise."""
    for key in keys or ("model", "name"):
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            return value
    raise InvalidRequest("model is required", param="model")



# --- request fields --------------------------------------------------------------------------

def parse_keep_alive(value: Any) -> float | None:
    """``keep_alive`` as seconds: a number is seconds, a string a Go duration (a bare number
    in a string is seconds too); negative means forever (-1); None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequest("'keep_alive' must be a number of seconds or a duration such as "
                             "\"10m\"", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            try:
                seconds = parse_go_duration(value)
            except ValueError:
                raise InvalidRequest(f"invalid keep_alive {value!r}: use seconds or a duration "
                                     f"such as \"10m\" or \"1h30m\"", param="keep_alive") from None
    else:
        raise InvalidRequest("'keep_alive' must be a number of seconds or a duration such as "
                             "\"10m\"", param="keep_alive")
    if math.isnan(seconds):
        raise InvalidRequest("'keep_alive' is not a number", param="keep_alive")
    return FOREVER_S if seconds < 0 else seconds


def parse_think(value: Any) -> bool | None:
    """``think``: true/false, or a level (``low``/``medium``/``high``/``max``) meaning on."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in THINK_LEVELS:
        return True
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    raise InvalidRequest(f"invalid think value: {json.dumps(value)} (use true, false, or one "
                         f"of {', '.join(THINK_LEVELS)})", param="think")


def parse_format(value: Any) -> dict[str, Any] | None:
    """``format``: ``"json"`` → any JSON object ({}), a JSON schema → itself, ``""`` → none."""
    if value is None or value == "" or value == "null":
        return None
    if value == "json":
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except ValueError:
            schema = None
        if isinstance(schema, dict):
            return schema
    raise InvalidRequest(f"invalid format: {json.dumps(value)}; expected \"json\" or a valid "
                         f"JSON schema", param="format")


def _option_number(key: str, value: Any, kind: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"option \"{key}\" must be a number, got {json.dumps(value)}",
                             param="options")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise InvalidRequest(f"option \"{key}\" must be an integer, got {value}",
                                 param="options")
        return int(value)
    return float(value)


def apply_options(options: Any, req: InternalRequest) -> list[str]:
    """Apply an ``options`` object to ``req``; return the keys that were ignored.

    Unknown keys are ignored as Ollama does (it only logs them); a known key with a wrong
    type is a 400. ``num_predict`` -1 (unlimited) and -2 (fill the context) leave the engine's
    default; ``grammar`` (an extension) is a GBNF grammar.
    """
    if options is None:
        return []
    if not isinstance(options, dict):
        raise InvalidRequest("'options' must be an object", param="options")
    ignored = []
    for key, value in options.items():
        if value is None:
            continue
        if key in _SAMPLING_OPTIONS:
            attr, kind = _SAMPLING_OPTIONS[key]
            if kind == "stop":
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                    raise InvalidRequest("option \"stop\" must be a list of strings",
                                         param="options")
                req.stop = [s for s in value if s]
                continue
            number = _option_number(key, value, kind)
            if key == "num_predict" and number < 0:
                number = None  # -1 unlimited, -2 until the context is full
            if key == "num_ctx" and number is not None and number <= 0:
                number = None
            if key == "top_k" and number is not None and number < 0:
                number = 0
            setattr(req, attr, number)
        elif key == "grammar":
            if not isinstance(value, str):
                raise InvalidRequest("option \"grammar\" must be a GBNF string",
                                     param="options")
            req.grammar = value or None
        else:
            ignored.append(key)
    return ignored


def _common(body: dict[str, Any], req: InternalRequest) -> list[str]:
    """Fields /api/generate and /api/chat share; returns ignored option keys."""
    req.stream = get_bool(body, "stream", True)  # Ollama streams unless told otherwise
    req.json_schema = parse_format(body.get("format"))
    req.keep_alive = parse_keep_alive(body.get("keep_alive"))
    ignored = apply_options(body.get("options"), req)
    grammar = body.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str):
            raise InvalidRequest("'grammar' must be a GBNF string", param="grammar")
        req.grammar = grammar or None
    think = parse_think(body.get("think"))
    req.reasoning = think
    if think and body["think"] in THINK_LEVELS:  # checked by parse_think
        # A level: the template's (low/medium/high) and the engine's budget for it.
        req.reasoning_effort = "high" if body["think"] == "max" else body["think"]
    if think is not None:
        # Templates with a thinking switch (Qwen3 and the like) read this variable.
        req.chat_template_kwargs["enable_thinking"] = think
    req.logprobs = get_bool(body, "logprobs", False)
    top = body.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise InvalidRequest("top_logprobs must be between 0 and 20", param="top_logprobs")
        req.top_logprobs = top
        if top:
            req.logprobs = True
    return ignored


def _images(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise InvalidRequest(f"{where} must be a list of base64-encoded images",
                             param="images")
    return list(value)


def ollama_generate_to_internal(body: dict[str, Any], has_chat_template: bool
                                ) -> InternalRequest:
    """A /api/generate body → InternalRequest.

    Without ``raw``, a model with a chat template gets a chat request (system + the prompt as
    a user message), so the engine applies the model's own template; a model without one gets
    the prompt as is, like Ollama's default template ``{{ .Prompt }}``. A ``template`` field is
    rendered here and sent raw. ``suffix`` makes a fill-in-the-middle request.
    """
    model = require_model(body, "model")
    prompt = get_str(body, "prompt") or ""
    system = get_str(body, "system")
    template = get_str(body, "template")
    suffix = get_str(body, "suffix")
    raw = get_bool(body, "raw", False)
    context = body.get("context")
    if context is not None and (not isinstance(context, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in context)):
        raise InvalidRequest("'context' must be a list of token ids", param="context")
    if raw and (template or system or context):
        raise InvalidRequest("raw mode does not support template, system, or context",
                             param="raw")
    images = _images(body.get("images"), "images")
    req = InternalRequest(model=model, dialect="ollama")
    _common(body, req)
    if suffix:
        req.prompt, req.suffix, req.raw = prompt, suffix, True
    elif raw:
        req.prompt, req.raw = prompt, True
    elif template:
        req.prompt = render_go_template(template, {"System": system or "", "Prompt": prompt})
        req.raw = True
    elif has_chat_template or images:
        req.messages = []
        if system:
            req.messages.append(Message(role="system", content=system))
        req.messages.append(Message(role="user", content=prompt, images=images))
    else:
        req.prompt, req.raw = prompt, True
    if images and req.messages is None:
        # Only the chat path carries images to the engine; a raw prompt cannot.
        raise InvalidRequest("images need a chat request: leave out raw, template and suffix",
                             param="images")
    return req


def _tool_arguments(value: Any, where: str) -> str:
    if value is None:
        return "{}"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):  # tolerate a JSON string (OpenAI style)
        return value
    raise InvalidRequest(f"{where}.function.arguments must be an object", param="messages")


def _parse_messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list):
        raise InvalidRequest("'messages' must be a list of messages", param="messages")
    out: list[Message] = []
    calls_by_name: dict[str, str] = {}
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object", param="messages")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"{where}.role must be system, user, assistant or tool; got "
                                 f"{json.dumps(role)}", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string", param="messages")
        msg = Message(role=role, content=content,
                      images=_images(m.get("images"), f"{where}.images"))
        thinking = m.get("thinking")
        if isinstance(thinking, str) and thinking:
            msg.reasoning = thinking
        for j, tc in enumerate(m.get("tool_calls") or []):
            fn = tc.get("function") if isinstance(tc, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise InvalidRequest(f"{where}.tool_calls[{j}] must be "
                                     f"{{function: {{name, arguments}}}}", param="messages")
            call_id = str(tc.get("id") or f"call_{i}_{j}")
            calls_by_name[fn["name"]] = call_id
            msg.tool_calls.append(ToolCall(id=call_id, name=fn["name"], arguments=_tool_arguments(
                fn.get("arguments"), f"{where}.tool_calls[{j}]")))
        if role == "tool":
            msg.name = m.get("tool_name") or m.get("name")
            # Ollama clients name the tool, not the call: link it to that call's id.
            msg.tool_call_id = m.get("tool_call_id") or calls_by_name.get(msg.name or "")
        out.append(msg)
    return out


def ollama_chat_to_internal(body: dict[str, Any]) -> InternalRequest:
    """A /api/chat body → InternalRequest (an empty ``messages`` list is a load request)."""
    req = InternalRequest(model=require_model(body, "model"), dialect="ollama",
                          messages=_parse_messages(body.get("messages") or []))
    _common(body, req)
    req.tools = parse_function_tools(body.get("tools"))
    return req


def is_load_request(body: dict[str, Any], chat: bool) -> bool:
    """True for a chat with no messages or a generate with nothing to complete: Ollama then
    only loads (or, with ``keep_alive: 0``, unloads) the model."""
    if chat:
        return not body.get("messages")
    return not (body.get("prompt") or body.get("images") or body.get("suffix"))


def ollama_embed_inputs(body: dict[str, Any]) -> list[str]:
    """The ``input`` of /api/embed as a list of strings (400 when malformed)."""
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif raw is None:
        inputs = []
    else:
        raise InvalidRequest("invalid input type: 'input' must be a string or a list of "
                             "strings", param="input")
    if any(not x for x in inputs):
        raise InvalidRequest("'input' cannot contain empty strings", param="input")
    return inputs


def embed_dimensions(body: dict[str, Any]) -> int | None:
    """``dimensions`` of /api/embed (a positive integer) or None."""
    dims = body.get("dimensions")
    if dims is None:
        return None
    if isinstance(dims, bool) or not isinstance(dims, int) or dims <= 0:
        raise InvalidRequest("dimensions must be a positive integer", param="dimensions")
    return dims


def normalize(vector: list[float], dims: int | None = None) -> list[float]:
    """Cut to ``dims`` and scale to unit length, as /api/embed returns vectors."""
    if dims is not None:
        vector = vector[:dims]
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else list(vector)


# --- answers ---------------------------------------------------------------------------------

def tool_call_objects(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Ollama ``tool_calls``: arguments as objects (the model's JSON text parsed)."""
    out = []
    for index, call in enumerate(calls):
        try:
            args = json.loads(call.arguments or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):
            # The model wrote arguments that are not a JSON object; keep them readable.
            args = {"arguments": call.arguments}
        out.append({"id": call.id or f"call_{uuid.uuid4().hex[:8]}",
                    "function": {"index": index, "name": call.name, "arguments": args}})
    return out


def logprob_objects(tokens: list[TokenInfo]) -> list[dict[str, Any]]:
    """Ollama ``logprobs`` entries for generated tokens that carry a log probability
    (``top_logprobs`` only when alternatives were asked for: Ollama omits it when empty)."""
    out = []
    for t in tokens:
        if t.logprob is None:
            continue
        entry: dict[str, Any] = {"token": t.text, "logprob": t.logprob,
                                 "bytes": list(t.text.encode())}
        if t.top:
            entry["top_logprobs"] = [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                                     for s, lp, _ in t.top]
        out.append(entry)
    return out


def metrics(finish: Finish, total_s: float) -> dict[str, Any]:
    """The final object's metrics in nanoseconds (engine timings, service load and wall)."""
    u = finish.usage
    return {"total_duration": int(total_s * 1e9), "load_duration": ns(u.load_ms),
            "prompt_eval_count": u.prompt_tokens, "prompt_eval_duration": ns(u.prompt_ms),
            "eval_count": u.completion_tokens, "eval_duration": ns(u.predicted_ms)}


class _OllamaStream:
    """State shared by the generate and chat converters: text so far, tool calls, timing."""

    def __init__(self, model: str, started: float, logprobs: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.started = started
        self.logprobs = logprobs
        self.clock = clock
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.token_ids: list[int | None] = []
        self.all_logprobs: list[dict[str, Any]] = []
        self.tool_calls: list[ToolCall] = []

    def _base(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": rfc3339()}

    def _track(self, event: Event) -> list[dict[str, Any]] | None:
        """Record ``event``; return its logprob objects for a TextDelta."""
        if isinstance(event, TextDelta):
            self.text.append(event.text)
            self.token_ids.extend(t.id for t in event.tokens)
            if self.logprobs:
                lps = logprob_objects(event.tokens)
                self.all_logprobs.extend(lps)
                return lps
        elif isinstance(event, ReasoningDelta):
            self.thinking.append(event.text)
        return None

    @property
    def response_text(self) -> str:
        """What the model wrote (reasoning in its tags, then the answer), for ``context``."""
        thinking = "".join(self.thinking)
        body = "".join(self.text)
        return (f"<think>{thinking}</think>" if thinking else "") + body

    def generated_ids(self) -> list[int] | None:
        """The generated token ids when the engine reported every one (raw prompts)."""
        if self.token_ids and all(i is not None for i in self.token_ids) and not self.thinking:
            return [int(i) for i in self.token_ids if i is not None]
        return None

    def _final(self, finish: Finish) -> dict[str, Any]:
        return {"done": True, "done_reason": DONE_REASONS.get(finish.reason, "stop"),
                **metrics(finish, self.clock() - self.started)}


class OllamaGenerateStream(_OllamaStream):
    """Internal events → /api/generate objects (``response``, ``thinking``, final metrics)."""

    def process(self, event: Event) -> list[dict[str, Any]]:
        """Objects for one event (a Finish gives the final object without ``context``)."""
        if isinstance(event, Finish):
            return [self.finish(event)]
        lps = self._track(event)
        if isinstance(event, TextDelta) and (event.text or lps):
            obj = {**self._base(), "response": event.text, "done": False}
            if lps:
                obj["logprobs"] = lps
            return [obj]
        if isinstance(event, ReasoningDelta) and event.text:
            return [{**self._base(), "response": "", "thinking": event.text, "done": False}]
        return []  # generate has no tool calls; their pieces are collected for the final

    def finish(self, event: Finish, context: list[int] | None = None) -> dict[str, Any]:
        """The final object: empty ``response``, done, done_reason, metrics, ``context``."""
        obj = {**self._base(), "response": "", **self._final(event)}
        if context is not None:
            obj["context"] = context
        return obj

    def whole(self, final: dict[str, Any]) -> dict[str, Any]:
        """One object for ``stream: false``: the final object with everything gathered."""
        obj = {**final, "response": "".join(self.text)}
        if self.thinking:
            obj["thinking"] = "".join(self.thinking)
        if self.logprobs:
            obj["logprobs"] = self.all_logprobs
        order = ["model", "created_at", "response", "thinking", "done", "done_reason",
                 "context"]
        return {k: obj[k] for k in order if k in obj} | {k: v for k, v in obj.items()
                                                         if k not in order}


class OllamaChatStream(_OllamaStream):
    """Internal events → /api/chat objects (``message`` with content, thinking, tool_calls)."""

    def process(self, event: Event) -> list[dict[str, Any]]:
        """Objects for one event; tool calls go out whole, just before the final object."""
        if isinstance(event, Finish):
            return self.finish(event)
        lps = self._track(event)
        if isinstance(event, TextDelta) and (event.text or lps):
            obj = {**self._base(), "message": {"role": "assistant", "content": event.text},
                   "done": False}
            if lps:
                obj["logprobs"] = lps
            return [obj]
        if isinstance(event, ReasoningDelta) and event.text:
            return [{**self._base(), "message": {"role": "assistant", "content": "",
                                                 "thinking": event.text}, "done": False}]
        return []  # ToolCallDelta: Ollama sends each call complete (from the Finish)

    def finish(self, event: Finish) -> list[dict[str, Any]]:
        """The tool-call object (when the model called tools) and the final object."""
        out = []
        self.tool_calls = list(event.tool_calls)
        if self.tool_calls:
            out.append({**self._base(), "message": {
                "role": "assistant", "content": "",
                "tool_calls": tool_call_objects(self.tool_calls)}, "done": False})
        out.append({**self._base(), "message": {"role": "assistant", "content": ""},
                    **self._final(event)})
        return out

    def whole(self, final: dict[str, Any]) -> dict[str, Any]:
        """One object for ``stream: false``."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
        if self.thinking:
            message["thinking"] = "".join(self.thinking)
        if self.tool_calls:
            message["tool_calls"] = tool_call_objects(self.tool_calls)
        obj = {**final, "message": message}
        if self.logprobs:
            obj["logprobs"] = self.all_logprobs
        return obj


def load_response(model: str, chat: bool, unloaded: bool) -> dict[str, Any]:
    """The answer to a load (empty prompt) or unload (plus ``keep_alive: 0``) request."""
    obj: dict[str, Any] = {"model": model, "created_at": rfc3339()}
    if chat:
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj.update(done=True, done_reason="unload" if unloaded else "load")
    return obj


# --- model bodies ----------------------------------------------------------------------------

def tag_entry(info: Any) -> dict[str, Any]:
    """One /api/tags item."""
    return {"name": info.name, "model": info.name, "modified_at": rfc3339_local(info.modified_at),
            "size": info.size, "digest": info.digest, "details": info.details()}


def tags_body(models: list[Any]) -> dict[str, Any]:
    """The /api/tags body: most recently modified first, as Ollama lists them (``ollama ls``
    shows a model just pulled or created at the top)."""
    ordered = sorted(models, key=lambda m: (-m.modified_at, m.name))
    return {"models": [tag_entry(m) for m in ordered]}


def models_body(models: list[Any]) -> dict[str, Any]:
    """The original README's /api/models: each model with its GGUF ``context_size``."""
    return {"models": [{**tag_entry(m), "context_size": m.context_length,
                        "architecture": m.architecture, "embedding_length": m.embedding_length,
                        "capabilities": m.capabilities, "source": m.source}
                       for m in models]}


def model_info_of(info: Any) -> dict[str, Any]:
    """``model_info``: the GGUF header keys (``<arch>.context_length`` among them)."""
    out = dict(info.metadata)
    if info.parameter_count:
        out.setdefault("general.parameter_count", info.parameter_count)
    if info.architecture:
        out.setdefault("general.architecture", info.architecture)
        if info.context_length:
            out[f"{info.architecture}.context_length"] = info.context_length
    return dict(sorted(out.items()))


def show_body(info: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The /api/show body. ``extra`` (from ``ollama show``) fills what the store lacks; the
    GGUF header stays the truth for ``model_info``."""
    extra = extra or {}
    template = info.template or extra.get("template") or info.chat_template or "{{ .Prompt }}"
    system = info.system or extra.get("system") or ""
    params = info.params or extra.get("parameters") or {}
    license_text = "\n".join(info.license) or extra.get("license") or ""
    body: dict[str, Any] = {
        "license": license_text,
        "modelfile": modelfile_text(info, template, system, params, license_text,
                                    info.messages),
        "parameters": parameters_text(params),
        "template": template,
        "system": system,
        "details": info.details(),
        "model_info": model_info_of(info),
        "capabilities": info.capabilities,
        "modified_at": rfc3339_local(info.modified_at),
    }
    if info.messages:
        body["messages"] = info.messages
    if info.projector is not None:
        body["projector_info"] = {"path": str(info.projector)}
    return body


def ps_entry(entry: Any, now_wall: float, now_mono: float) -> dict[str, Any]:
    """One /api/ps item from a LoadedModel.

    ``size_vram`` is the bytes the engine put outside this host's memory (GPUs and RPC
    workers); ``devices`` (ours, Ollama clients ignore it) says where each part went.
    """
    info = entry.info
    if entry.expires_at is not None:
        expires = now_wall + max(0.0, entry.expires_at - now_mono)
    elif entry.keep_alive < 0:
        expires = now_wall + 100 * 365 * 86400.0  # "forever", as Ollama shows a far date
    else:
        expires = now_wall + entry.keep_alive  # busy: the clock starts when it is idle
    report = getattr(getattr(entry, "engine", None), "report", None)
    out = {"name": info.name, "model": info.name, "size": info.size, "digest": info.digest,
           "details": info.details(), "expires_at": rfc3339_local(expires),
           "size_vram": report.offloaded_bytes() if report else 0,
           "context_length": entry.ctx_size}
    if report is not None:
        out["devices"] = report.devices()
        out["offload"] = report.offload()
    settings = getattr(getattr(entry, "engine", None), "settings", None)
    if settings is not None and hasattr(settings, "kv_cache_type"):
        # Ours, like devices: the KV cache's number type and flash attention it runs with.
        out["kv_cache_type"] = settings.kv_cache_type
        out["flash_attention"] = settings.flash_attention
    if settings is not None and hasattr(settings, "cache_ram"):
        # The prompt cache it runs with: shared KV cells, host-memory cache, slot matching.
        out["kv_pool_size"] = kv_pool_cells(settings, entry.ctx_size)
        out["cache_ram"] = settings.cache_ram
        out["slot_prompt_similarity"] = settings.slot_prompt_similarity
    return out


def ps_body(entries: list[Any], now_wall: float | None = None,
            now_mono: float | None = None) -> dict[str, Any]:
    """The /api/ps body (entries already sorted, longest expiry first)."""
    wall = time.time() if now_wall is None else now_wall
    mono = time.monotonic() if now_mono is None else now_mono
    return {"models": [ps_entry(e, wall, mono) for e in entries]}


# --- errors ----------------------------------------------------------------------------------

def ollama_error(exc: ServiceError) -> tuple[dict[str, Any], int]:
    """``{"error": "…"}`` and Ollama's status for ``exc`` (by type, never by message)."""
    if isinstance(exc, ModelNotFound):
        return {"error": f"model '{exc.name}' not found"}, 404
    if isinstance(exc, InvalidRequest):
        return {"error": exc.message}, exc.status if exc.status in (400, 405) else 400
    if isinstance(exc, (NotFound, AuthenticationError, PayloadTooLarge, Overloaded)):
        return {"error": exc.message}, exc.status
    if isinstance(exc, Cancelled):
        return {"error": exc.message}, 499
    return {"error": exc.message}, exc.status if exc.status >= 400 else 500
