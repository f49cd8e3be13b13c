"""The shared run-and-stream path every dialect's blueprint calls (through ``api.handlers``,
which adds what only the HTTP layer knows: the app's services and the caller).

``start_generation`` does everything that can fail before the first byte (resolve the model,
load its engine, send the request and wait for the engine's first result) and returns a
``Generation``: an iterator of internal events with the reasoning splitter applied, tracked in
the RequestTracker, that releases the engine and ends its tracking when the stream ends or is
closed (a client that disconnects closes it, which cancels the generation in the engine).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..core.engine import EngineStream, LLAMAExecutor
from ..core.errors import (
    Cancelled,
    ContextLengthExceeded,
    EngineFailed,
    RequestTimeout,
    ServiceError,
    Unsupported,
)
from ..core.min_tokens import open_stream
from ..core.reasoning import ThinkSplitter, reasoning_mode
from ..core.relay import output_started, pin_to_thread
from ..core.request_tracker import RequestTracker
from ..core.schemas import (
    Event,
    Finish,
    InternalRequest,
    Message,
    PromptInfo,
    ReasoningDelta,
    RequestState,
    TextDelta,
    TokenInfo,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ..core.tool_fallback import ToolCallExtractor, template_supports_tools
from ..core.tool_fallback import prepare as prepare_generic_tools
from ..models.manager import ModelManager
from ..models.schemas import ModelInfo
from .fitting import fit_embedding_inputs, fit_request_to_engine

log = logging.getLogger(__name__)

GONE_CHECK_S = 0.25  # how often an answer that is not streamed looks for a client that hung up


@dataclass
class Services:
    """What the blueprints share: configuration, models and engines, request tracking."""

    config: Config
    manager: ModelManager
    tracker: RequestTracker


@dataclass
class Caller:
    """Who asks, as the HTTP layer knows it. ``gone``: a cheap test of whether the client hung
    up (None where that cannot be told, e.g. outside a request)."""

    request_id: str | None = None  # the id the response carries (X-Request-Id), if any
    key_name: str | None = None  # the API key's name (None: no keys)
    priority: int = 0  # the key's priority class (api_keys): the queue serves higher first
    gone: Callable[[], bool] | None = None


NOBODY = Caller()


@dataclass
class Result:
    """A whole generation, collected (for non-streaming answers)."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    finish: Finish | None = None


def apply_model_defaults(req: InternalRequest, info: ModelInfo) -> None:
    """Fill unset sampling fields from the manifest's params layer (Ollama's defaults)."""
    params = info.params or {}
    simple = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "min_p": "min_p", "typical_p": "typical_p", "repeat_penalty": "repeat_penalty",
              "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
              "frequency_penalty": "frequency_penalty", "seed": "seed"}
    for key, attr in simple.items():
        if key in params and getattr(req, attr) is None:
            setattr(req, attr, params[key])
    if "num_ctx" in params and req.num_ctx is None:
        req.num_ctx = int(params["num_ctx"])
    if "num_predict" in params and req.max_tokens is None and int(params["num_predict"]) > 0:
        req.max_tokens = int(params["num_predict"])  # -1 and -2 leave it unlimited
    if "stop" in params and not req.stop:
        stops = params["stop"]
        req.stop = [stops] if isinstance(stops, str) else list(stops)
    if info.system and req.messages is not None and not any(
            m.role == "system" for m in req.messages):
        req.messages.insert(0, Message(role="system", content=info.system))
    if info.messages and req.messages is not None:
        # The model's own conversation (MESSAGE in a Modelfile) comes after the system prompt
        # and before the request's turns, as Ollama puts it.
        at = next((i for i, m in enumerate(req.messages) if m.role != "system"),
                  len(req.messages))
        req.messages[at:at] = [Message(role=m["role"], content=m["content"])
                               for m in info.messages]


def fit_tools_to_template(req: InternalRequest, info: ModelInfo) -> list[Tool] | None:
    """For a chat template that does not render tools, describe them in the prompt instead
    (core/tool_fallback.py); the tools whose calls must then be read out of the answer, or
    None. Everything that builds the prompt (generation, token counts) goes through here, so
    a count is the count of what is generated."""
    if req.tools and not template_supports_tools(info.chat_template):
        return prepare_generic_tools(req)
    return None


def _check_capabilities(req: InternalRequest, info: ModelInfo) -> None:
    if info.is_embedding_only:
        raise Unsupported(f"\"{info.name}\" does not support generate")
    _check_images(req, info)


def _check_images(req: InternalRequest, info: ModelInfo) -> None:
    # Before any template or generation: llama-server fails with a 500 on images it cannot see.
    wants_images = any(m.images for m in req.messages or [])
    if wants_images and info.projector is None:
        raise Unsupported(f"\"{info.name}\" does not support images: the model has no vision "
                          f"projector")


class _ChoiceDone:
    """Queue marker: one choice's events are all out."""


class Generation:
    """A started generation. Iterate for events (once); ``close()`` cancels it.

    With ``req.n`` > 1 each choice is its own engine stream in its own slot (the first one
    opened before the first byte, the others in their threads, with the seed moved by the
    choice's index so that seeded choices differ and stay reproducible); their events come out
    interleaved as they are generated, each tagged with its ``choice``. Each choice has its own
    reasoning splitter and tool-call extractor; ``finish`` is then the whole request's, with
    the usage of every choice (prompt once, generated tokens summed).
    """

    def __init__(self, svc: Services, req: InternalRequest, info: ModelInfo,
                 engine: LLAMAExecutor, stream: EngineStream, load_s: float,
                 cancel: Any, started: float,
                 extract_tools: list[Tool] | None = None, caller: Caller = NOBODY) -> None:
        self.svc = svc
        self.req = req
        self.info = info
        self.engine = engine
        self.load_s = load_s
        self.started = started
        self._streams: list[Any] = [stream]
        self._lock = threading.Lock()
        self._cancel = cancel
        self._closed = False
        self._mode = reasoning_mode(req.reasoning, svc.config.preserve_think_tags)
        self._extract_tools = extract_tools
        self.finish: Finish | None = None
        self.finishes: dict[int, Finish] = {}
        # request_timeout bounds the whole generation, not only the engine's silences.
        self._timeout = svc.config.request_timeout
        self._deadline = time.monotonic() + self._timeout
        # A client that hangs up is noticed by a stream's next write; an answer that is not
        # streamed writes nothing until the end, so its generation looks for the hang-up.
        self._client_gone = None if req.stream else caller.gone
        if req.n > 1:
            # The choices meet in a queue, which the relay thread cannot wait on; pinned here,
            # in the request's context, before a stream's first frame can be sent.
            pin_to_thread()

    @property
    def request_id(self) -> str:
        """The tracked request id."""
        return self.req.request_id

    def _timed_out(self) -> RequestTimeout:
        return RequestTimeout(f"the generation ran past request_timeout ({self._timeout:g} s) "
                              f"and was stopped; ask for fewer tokens, or raise "
                              f"request_timeout in the service's configuration")

    def _tracked(self, stream: Any) -> Iterator[Event]:
        """The engine's events, counted in the tracker, within request_timeout."""
        tracker = self.svc.tracker
        add_tokens = tracker.add_tokens
        rid = self.req.request_id
        cancel = self._cancel
        deadline = self._deadline
        monotonic = time.monotonic
        first = True
        try:
            for event in stream:
                if cancel.is_set():
                    raise Cancelled("the request was cancelled")
                kind = type(event)
                if kind is TextDelta:
                    add_tokens(rid, len(event.tokens) or 1)
                elif kind is ToolCallDelta:
                    add_tokens(rid, 1)
                elif kind is PromptInfo:
                    tracker.set_prompt_tokens(rid, event.prompt_tokens)
                elif kind is Finish:
                    event.usage.load_ms = self.load_s * 1000.0
                    if (self.req.include_stop_str_in_output and event.reason == "stop_sequence"
                            and event.stop_sequence):
                        yield TextDelta(event.stop_sequence)  # the engine cuts it off the text
                if first and (kind is TextDelta or kind is ToolCallDelta):
                    first = False
                    output_started()  # the frames after this token's may be relayed
                yield event
                if monotonic() > deadline:
                    raise self._timed_out()
        except EngineFailed as exc:
            # The engine went silent for request_timeout: the read timed out.
            if monotonic() >= deadline:
                raise self._timed_out() from exc
            raise

    def _choice(self, index: int, stream: Any) -> Iterator[Event]:
        """One choice's events: reasoning split, tool calls extracted, tagged ``index``."""
        splitter = ThinkSplitter(self._mode, starts_in_reasoning=self.engine.prompt_opens_think)
        events = splitter.process(self._tracked(stream))
        if self._extract_tools:
            events = ToolCallExtractor(self._extract_tools).process(events)
        for event in events:
            event.choice = index
            if isinstance(event, Finish):
                event.usage.reasoning_tokens = splitter.reasoning_chunks
                if event.reason == "stop_sequence":
                    event.stop_token = self.req.stop_token_texts.get(event.stop_sequence or "")
            yield event

    def _choice_request(self, index: int) -> InternalRequest:
        seed = None if self.req.seed is None else self.req.seed + index
        return dataclasses.replace(self.req, seed=seed)

    def _parallel(self) -> Iterator[Event]:
        """The events of all ``n`` choices, interleaved as their threads produce them."""
        out: queue.Queue[Any] = queue.Queue()

        def run(index: int) -> None:
            try:
                if index == 0:
                    stream = self._streams[0]
                else:
                    stream = open_stream(self.engine, self._choice_request(index))
                    with self._lock:
                        closed = self._closed
                        if not closed:
                            self._streams.append(stream)
                    if closed:
                        stream.close()
                        return
                for event in self._choice(index, stream):
                    out.put(event)
                out.put(_ChoiceDone())
            except BaseException as exc:  # noqa: BLE001 - raised in the consuming thread
                out.put(exc)

        for index in range(self.req.n):
            threading.Thread(target=run, args=(index,), daemon=True,
                             name=f"choice-{index}-{self.req.request_id[:8]}").start()
        remaining = self.req.n
        while remaining:
            item = out.get()
            if isinstance(item, _ChoiceDone):
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def __iter__(self) -> Iterator[Event]:
        state, error = RequestState.CANCELLED, "client disconnected"
        gone, check_at = self._client_gone, 0.0
        try:
            events = self._choice(0, self._streams[0]) if self.req.n == 1 else self._parallel()
            for event in events:
                if gone is not None and (now := time.monotonic()) >= check_at:
                    check_at = now + GONE_CHECK_S
                    if gone():
                        raise Cancelled("client disconnected")
                if isinstance(event, Finish):
                    self.finishes[event.choice] = event
                    self.finish = event
                yield event
            if self.req.n > 1:
                ordered = [self.finishes[i] for i in sorted(self.finishes)]
                self.finish = Finish(reason=ordered[0].reason,
                                     usage=Usage.of_choices([f.usage for f in ordered]))
            state, error = RequestState.COMPLETED, None
        except Cancelled as exc:
            state, error = RequestState.CANCELLED, exc.message
            raise
        except ServiceError as exc:
            state, error = RequestState.FAILED, exc.message
            raise
        except GeneratorExit:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client by the adapter
            state, error = RequestState.FAILED, f"{type(exc).__name__}: {exc}"
            raise
        finally:
            usage = self.finish.usage if self.finish else None
            self._end(state, error, usage)

    def _end(self, state: RequestState, error: str | None, usage: Any) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            stream.close()
        self.svc.manager.release(self.info.name, self.req.keep_alive)
        self.svc.tracker.finish(
            self.req.request_id, state=state, error=error,
            finish_reason=self.finish.reason if self.finish else None,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None)
        status = self.svc.tracker.get(self.req.request_id)
        caller = status.caller if status is not None else None
        log.info("request %s %s%s: %s", self.req.request_id, state.value,
                 f" (key {caller})" if caller else "",
                 error or (self.finish.reason if self.finish else ""))

    def close(self) -> None:
        """Stop the generation (client gone); releases the engine. Idempotent."""
        self._end(RequestState.CANCELLED, "client disconnected", None)

    def collect_choices(self) -> list[Result]:
        """Run to the end and gather each choice's text, reasoning, tool calls and finish."""
        results = [Result() for _ in range(self.req.n)]
        texts: list[list[str]] = [[] for _ in results]
        reasoning: list[list[str]] = [[] for _ in results]
        for event in self:
            result = results[event.choice]
            if isinstance(event, TextDelta):
                texts[event.choice].append(event.text)
                result.tokens.extend(event.tokens)
            elif isinstance(event, ReasoningDelta):
                reasoning[event.choice].append(event.text)
            elif isinstance(event, Finish):
                result.finish = event
                result.tool_calls = event.tool_calls
        for result, text, thought in zip(results, texts, reasoning, strict=True):
            result.text = "".join(text)
            result.reasoning = "".join(thought)
        return results

    def collect(self) -> Result:
        """Run to the end and gather text, reasoning, tool calls and the finish (the first
        choice's; ``collect_choices`` has them all)."""
        return self.collect_choices()[0]


def _bigger_context(info: ModelInfo, prompt_tokens: int, max_tokens: int | None) -> int:
    need = prompt_tokens + (max_tokens if max_tokens and max_tokens > 0 else 512)
    ctx = 1024
    while ctx < need:
        ctx *= 2
    return min(ctx, info.context_length) if info.context_length else ctx


def _adopt_request_id(req: InternalRequest, svc: Services, caller: Caller) -> None:
    """Track the request under the id its response carries (X-Request-Id), when unused."""
    rid = caller.request_id
    if rid and svc.tracker.get(rid) is None:
        req.request_id = rid


def _abandoned(cancel: threading.Event, caller: Caller) -> Callable[[], bool]:
    """True once the request is cancelled or its client hung up (checked while it queues)."""
    gone = caller.gone or (lambda: False)
    return lambda: cancel.is_set() or gone()


def _finish_failed(tracker: RequestTracker, rid: str, exc: BaseException) -> None:
    """End the tracking of a request that failed before its answer began."""
    message = exc.message if isinstance(exc, ServiceError) else str(exc)
    state = RequestState.CANCELLED if isinstance(exc, Cancelled) else RequestState.FAILED
    tracker.finish(rid, state=state, error=message)


def start_generation(req: InternalRequest, endpoint: str, svc: Services,
                     caller: Caller = NOBODY) -> Generation:
    """Resolve, load, send, and wait for the engine's first result; raise typed errors."""
    started = time.monotonic()
    _adopt_request_id(req, svc, caller)
    info = svc.manager.resolve(req.model)
    apply_model_defaults(req, info)
    _check_capabilities(req, info)
    fit_request_to_engine(req, info, svc.config)
    extract_tools = fit_tools_to_template(req, info)
    tracker = svc.tracker
    cancel = tracker.start(req.request_id, info.name, req.dialect, endpoint=endpoint,
                           stream=req.stream,
                           max_tokens=req.max_tokens * req.n if req.max_tokens else None,
                           caller=caller.key_name,
                           caller_limit=svc.config.max_requests_per_key)
    acquired = False
    try:
        engine, load_s = svc.manager.acquire(
            info, req.num_ctx, abandoned=_abandoned(cancel, caller),
            admitted=lambda: tracker.set_state(req.request_id, RequestState.LOADING),
            priority=caller.priority, request_id=req.request_id)
        acquired = True
        tracker.set_state(req.request_id, RequestState.PROCESSING)
        if req.stop_token_ids:
            # llama-server stops on strings: a stop token becomes the text of that token.
            texts = {i: engine.detokenize([i]) for i in req.stop_token_ids}
            req.stop_token_texts = {t: i for i, t in texts.items() if t and t not in req.stop}
            req.stop = list(dict.fromkeys([*req.stop, *req.stop_token_texts]))
        try:
            stream = open_stream(engine, req)
        except ContextLengthExceeded as exc:
            # The model was trained for more than it runs with: reload it bigger, once.
            if not (info.context_length and exc.prompt_tokens < info.context_length
                    and engine.ctx_size < info.context_length):
                limit = max(engine.ctx_size, info.context_length)
                raise ContextLengthExceeded(exc.prompt_tokens, limit) from None
            svc.manager.release(info.name)
            acquired = False
            engine, more_s = svc.manager.acquire(
                info, _bigger_context(info, exc.prompt_tokens, req.max_tokens))
            acquired = True
            load_s += more_s
            stream = open_stream(engine, req)
    except BaseException as exc:
        if acquired:
            svc.manager.release(info.name, req.keep_alive)
        _finish_failed(tracker, req.request_id, exc)
        if isinstance(exc, ContextLengthExceeded):
            exc.param = req.prompt_param  # the field the caller sent its prompt in
        raise
    return Generation(svc, req, info, engine, stream, load_s, cancel, started, extract_tools,
                      caller)


def run_embeddings(model: str, inputs: list[Any], endpoint: str, dialect: str, svc: Services,
                   keep_alive: float | None = None, truncate: bool = False,
                   caller: Caller = NOBODY) -> tuple[list[list[float]], int, ModelInfo, float]:
    """(vectors, prompt tokens, model, load seconds) for a list of inputs, tracked.

    An input longer than the engine can embed is cut to fit with ``truncate``, else a 400.
    """
    info = svc.manager.resolve(model)
    rid = uuid.uuid4().hex
    cancel = svc.tracker.start(rid, info.name, dialect, endpoint=endpoint,
                               caller=caller.key_name,
                               caller_limit=svc.config.max_requests_per_key)
    try:
        engine, load_s = svc.manager.acquire(info, abandoned=_abandoned(cancel, caller),
                                             priority=caller.priority, request_id=rid)
        try:
            vectors, tokens = engine.embed(fit_embedding_inputs(inputs, engine, truncate))
        finally:
            svc.manager.release(info.name, keep_alive)
    except BaseException as exc:
        _finish_failed(svc.tracker, rid, exc)
        raise
    svc.tracker.finish(rid, prompt_tokens=tokens, completion_tokens=0)
    return vectors, tokens, info, load_s


def with_engine(model: str, svc: Services, num_ctx: int | None = None,
                template_of: InternalRequest | None = None) -> "_EngineUse":
    """``with with_engine(name) as (engine, info):`` for tokenize, templates and counts.

    ``template_of``: a chat request whose template will be applied; refused (400) first when
    it holds images the model cannot see.
    """
    return _EngineUse(svc, model, num_ctx, template_of)


class _EngineUse:
    def __init__(self, svc: Services, model: str, num_ctx: int | None,
                 template_of: InternalRequest | None) -> None:
        self.svc = svc
        self.model = model
        self.num_ctx = num_ctx
        self.template_of = template_of
        self.info: ModelInfo | None = None

    def __enter__(self) -> tuple[LLAMAExecutor, ModelInfo]:
        info = self.svc.manager.resolve(self.model)
        if self.template_of is not None:
            _check_images(self.template_of, info)
        self.info = info
        engine, _ = self.svc.manager.acquire(self.info, self.num_ctx, slot=False)
        return engine, self.info

    def __exit__(self, *exc: Any) -> None:
        if self.info is not None:
            self.svc.manager.release(self.info.name, slot=False)
