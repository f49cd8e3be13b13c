"""LLAMAExecutor: one llama-server child process per loaded model, and the streaming client to it.

The translation between an ``InternalRequest`` and llama-server's own JSON (chat requests go to
its OpenAI-compatible ``/v1/chat/completions`` with Jinja templates and tool parsing; raw prompts
go to its native ``/completion`` which reports token ids) lives here too: it is the engine's
dialect, and nothing above this module sees it.
"""

from __future__ import annotations

import collections
import enum
import http.client
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .engine_report import LoadReport
from .errors import (
    ContextLengthExceeded,
    EngineFailed,
    EngineUnavailable,
    InsufficientMemory,
    InvalidRequest,
    Overloaded,
    ServiceError,
    Unsupported,
)
from .exits import describe_exit, signal_name
from .relay import RELAY
from .schemas import (
    Event,
    Finish,
    InternalRequest,
    Message,
    PromptInfo,
    TextDelta,
    TokenInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from .spawn import popen_tied

log = logging.getLogger(__name__)

_ERROR_WORDS = ("error", "failed", "fatal", "abort", "cannot", "unable", "invalid", "exception",
                "terminate", "out of memory", "what()")
_ERROR_BYTES = tuple(w.encode() for w in _ERROR_WORDS)


def _error_word_in(text: str | bytes) -> bool:
    """Whether a log line, or a raw block of the engine's log, holds an error word (in any
    case). A lower-cased copy searched once per word: about 45 µs for a request's 5 KB of
    slot lines, where a case-insensitive regex took 570 µs, holding the GIL all the while."""
    low = text.lower()
    words = _ERROR_BYTES if isinstance(low, bytes) else _ERROR_WORDS
    return any(word in low for word in words)


# llama-server's log prefix (uptime and level, "0.07.010.775 I "): dropped in error messages.
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [DIWE] ")
LOG_GATHER_S = 0.05  # a ready engine's log is read at most this often (see _read_stderr)


class EngineState(enum.StrEnum):
    """Life cycle of one llama-server process."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass
class EngineSettings:
    """How to start llama-server; the same for every model unless a model overrides it."""

    binary: Path
    threads: int = 0  # 0: llama-server's own choice
    batch_size: int = 512
    gpu_layers: int | None = None  # None: llama-server's default
    tensor_split: list[float] | None = None
    rpc_servers: list[str] = field(default_factory=list)  # llama.cpp RPC workers, host:port
    main_gpu: int | None = None
    fit_target_mib: int | None = None  # --fit-target (MiB --fit leaves free per device)
    parallel: int = 4  # slots that decode together (continuous batching)
    embeddings: bool = True  # also serve /v1/embeddings from the same process
    startup_timeout: float = 300.0
    request_timeout: float = 600.0
    extra_args: list[str] = field(default_factory=list)


class _NoDelayConnection(http.client.HTTPConnection):
    """An HTTP connection with Nagle's algorithm off: small writes go out at once."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- InternalRequest → llama-server JSON (pure) ----------------------------------------------

def _sampling_fields(req: InternalRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, key in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("min_p", "min_p"), ("typical_p", "typical_p"),
                      ("repeat_penalty", "repeat_penalty"), ("repeat_last_n", "repeat_last_n"),
                      ("presence_penalty", "presence_penalty"),
                      ("frequency_penalty", "frequency_penalty"), ("seed", "seed")):
        value = getattr(req, name)
        if value is not None:
            out[key] = value
    out["n_predict"] = req.max_tokens if req.max_tokens is not None else -1
    if req.stop:
        out["stop"] = list(req.stop)
    if req.ignore_eos:
        out["ignore_eos"] = True
    if req.logit_bias:
        # JSON has no -Infinity: llama-server reads false as "never this token".
        out["logit_bias"] = [[int(k), False if v == float("-inf") else float(v)]
                             for k, v in req.logit_bias.items()]
    if req.grammar:
        out["grammar"] = req.grammar
    elif req.json_schema is not None:
        out["json_schema"] = req.json_schema or {"type": "object"}
    return out


def message_to_engine(msg: Message) -> dict[str, Any]:
    """A neutral message in the OpenAI form llama-server's chat endpoint takes."""
    out: dict[str, Any] = {"role": msg.role}
    if msg.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": msg.content}]
        for image in msg.images:
            url = image if image.startswith("data:") else f"data:image/png;base64,{image}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        out["content"] = parts
    else:
        out["content"] = msg.content
    if msg.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in msg.tool_calls]
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    if msg.name and msg.role == "tool":
        out["name"] = msg.name
    if msg.reasoning:
        out["reasoning_content"] = msg.reasoning
    return out


def build_chat_payload(req: InternalRequest) -> dict[str, Any]:
    """llama-server ``/v1/chat/completions`` body for a chat request (always streamed)."""
    payload: dict[str, Any] = {
        "messages": [message_to_engine(m) for m in req.messages or []],
        "stream": True,
        "stream_options": {"include_usage": True},
        "verbose": True,  # the last chunk then says which stop string matched
        # The prompt's size (and how much came from the cache) arrives before the first
        # token; per-token timings would double the size of every token's chunk.
        "return_progress": True,
        "cache_prompt": True,
        "reasoning_format": "none",  # <think> splitting is ours (utils.response_processing)
    }
    payload.update(_sampling_fields(req))
    if req.tools:
        tools = req.tools
        choice = req.tool_choice
        if isinstance(choice, dict):
            # llama-server reads an object tool_choice as "auto": force the named tool by
            # offering only it, with a call required.
            tools = [t for t in tools if t.name == choice.get("name")] or tools
            choice = "required"
        payload["tools"] = [{"type": "function",
                             "function": {"name": t.name, "description": t.description,
                                          "parameters": t.parameters}} for t in tools]
        if choice is not None:
            payload["tool_choice"] = choice
        if req.parallel_tool_calls is not None:
            payload["parallel_tool_calls"] = req.parallel_tool_calls
    if req.chat_template_kwargs:
        payload["chat_template_kwargs"] = req.chat_template_kwargs
    if not req.add_generation_prompt:
        payload["add_generation_prompt"] = False
    if req.continue_final_message:
        payload["continue_final_message"] = True
    if req.logprobs or req.top_logprobs:
        # With top_logprobs 0, llama-server computes no probabilities at all: ask for one
        # alternative and drop it (ChatChunkParser's top_n).
        payload["logprobs"] = True
        payload["top_logprobs"] = max(1, req.top_logprobs)
    return payload


def build_completion_payload(req: InternalRequest) -> tuple[str, dict[str, Any]]:
    """(path, body) for a raw-prompt request: native ``/completion``, or ``/infill``."""
    payload: dict[str, Any] = {"stream": True, "cache_prompt": True,
                               "return_tokens": True}
    payload.update(_sampling_fields(req))
    if req.logprobs or req.top_logprobs:
        payload["n_probs"] = max(1, req.top_logprobs)
    if req.suffix is not None:
        payload["input_prefix"] = req.prompt or ""
        payload["input_suffix"] = req.suffix
        payload["prompt"] = ""
        return "/infill", payload
    payload["prompt"] = req.prompt if req.prompt is not None else ""
    return "/completion", payload


# --- llama-server JSON → internal events (pure) -----------------------------------------------

def _token_infos(probs: list[dict[str, Any]] | None, top_n: int | None = None
                 ) -> list[TokenInfo]:
    out = []
    for p in probs or []:
        top = [(t.get("token", ""), float(t.get("logprob", 0.0)), t.get("id"))
               for t in (p.get("top_logprobs") or [])[:top_n]]
        out.append(TokenInfo(id=p.get("id"), text=p.get("token", ""),
                             logprob=p.get("logprob"), bytes=p.get("bytes"), top=top))
    return out


def _usage_from(timings: dict[str, Any] | None, prompt_tokens: int, completion_tokens: int,
                cached: int) -> Usage:
    timings = timings or {}
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 cached_tokens=cached, prompt_ms=float(timings.get("prompt_ms") or 0.0),
                 predicted_ms=float(timings.get("predicted_ms") or 0.0))


def _finish_reason(reason: str | None, stop_type: str | None, word: str | None) -> str:
    if reason == "tool_calls":
        return "tool_calls"
    if stop_type == "word" and word:
        return "stop_sequence"
    if reason == "length" or stop_type == "limit":
        return "length"
    return "stop"


class ChatChunkParser:
    """Turns llama-server chat stream chunks into internal events; keeps per-stream state."""

    def __init__(self, prefill: str | None = None, top_n: int | None = None) -> None:
        self.top_n = top_n  # alternatives kept per token (the engine sends at least one)
        self.finish_reason: str | None = None
        self.stop_type: str | None = None
        self.stopping_word: str | None = None
        self.truncated = False  # the engine ran out of context
        self.tool_calls: dict[int, ToolCall] = {}
        # llama-server repeats an assistant prefill (the last message) at the start of its
        # answer; clients expect only the continuation.
        self._prefill = prefill or None
        self._held = ""
        self._prompt_sent = False

    def _strip_prefill(self, content: str) -> str:
        if self._prefill is None or not content:
            return content
        self._held += content
        if len(self._held) < len(self._prefill) and self._prefill.startswith(self._held):
            return ""  # still inside the echoed prefill
        held, prefill = self._held, self._prefill
        self._prefill, self._held = None, ""
        return held[len(prefill):] if held.startswith(prefill) else held

    def process(self, chunk: dict[str, Any]) -> list[Event]:
        """Events for one decoded ``data:`` object."""
        if self._prompt_sent and self._prefill is None and len(chunk) == 6:
            # The hot path: a chunk with one token of content and nothing else (id, model,
            # created, object, system_fingerprint and choices are its six keys).
            choices = chunk.get("choices")
            if choices and len(choices) == 1:
                choice = choices[0]
                delta = choice.get("delta")
                if (delta and len(delta) == 1 and len(choice) == 3
                        and choice.get("finish_reason") is None):
                    content = delta.get("content")
                    if content:
                        return [TextDelta(text=content)]
        events: list[Event] = []
        if not self._prompt_sent:
            progress = chunk.get("prompt_progress")
            timings = chunk.get("timings")
            if progress:
                self._prompt_sent = True
                events.append(PromptInfo(int(progress.get("total") or 0),
                                         int(progress.get("cache") or 0)))
            elif timings and "prompt_n" in timings:
                self._prompt_sent = True
                cached = int(timings.get("cache_n") or 0)
                events.append(PromptInfo(int(timings["prompt_n"]) + cached, cached))
        verbose = chunk.get("__verbose")
        if verbose:
            self.stop_type = verbose.get("stop_type")
            self.stopping_word = verbose.get("stopping_word") or None
            self.truncated = verbose.get("truncated") is True
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            tokens = _token_infos((choice.get("logprobs") or {}).get("content"), self.top_n)
            content = self._strip_prefill(delta.get("content") or "")
            if content or tokens:
                events.append(TextDelta(text=content or "", tokens=tokens))
            for tc in delta.get("tool_calls") or []:
                index = int(tc.get("index", 0))
                fn = tc.get("function") or {}
                call = self.tool_calls.get(index)
                if call is None:
                    call = self.tool_calls[index] = ToolCall(id=tc.get("id") or "",
                                                             name=fn.get("name") or "",
                                                             arguments="")
                    events.append(ToolCallDelta(index=index, id=call.id, name=call.name,
                                                arguments=fn.get("arguments") or ""))
                else:
                    events.append(ToolCallDelta(index=index,
                                                arguments=fn.get("arguments") or ""))
                call.arguments += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if usage:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            reason = _finish_reason(self.finish_reason, self.stop_type, self.stopping_word)
            events.append(Finish(
                reason=reason,
                usage=_usage_from(chunk.get("timings"), usage.get("prompt_tokens", 0),
                                  usage.get("completion_tokens", 0), cached),
                stop_sequence=self.stopping_word if reason == "stop_sequence" else None,
                tool_calls=[self.tool_calls[i] for i in sorted(self.tool_calls)],
                context_full=reason == "length" and self.truncated))
        return events


class CompletionChunkParser:
    """Turns native ``/completion`` stream chunks into internal events."""

    def __init__(self) -> None:
        self._prompt_sent = False

    def process(self, chunk: dict[str, Any]) -> list[Event]:
        """Events for one decoded ``data:`` object."""
        events: list[Event] = []
        if not self._prompt_sent and chunk.get("tokens_evaluated") is not None:
            self._prompt_sent = True
            events.append(PromptInfo(int(chunk["tokens_evaluated"])))
        content = chunk.get("content") or ""
        ids = chunk.get("tokens") or []
        tokens = _token_infos(chunk.get("completion_probabilities"))
        if not tokens and ids:
            # Without logprobs the engine still names the ids; the text goes on the last one.
            tokens = [TokenInfo(id=i, text="") for i in ids]
            tokens[-1].text = content
        if content or tokens:
            events.append(TextDelta(text=content, tokens=tokens))
        if chunk.get("stop"):
            stop_type = chunk.get("stop_type")
            word = chunk.get("stopping_word") or None
            reason = _finish_reason(None, stop_type, word)
            timings = chunk.get("timings") or {}
            prompt_tokens = int(chunk.get("tokens_evaluated") or 0)
            events.append(Finish(
                reason=reason,
                usage=_usage_from(timings, prompt_tokens, int(chunk.get("tokens_predicted") or 0),
                                  int(timings.get("cache_n") or 0)),
                stop_sequence=word if reason == "stop_sequence" else None))
        return events


def engine_error(status: int, body: bytes | str, tail: str = "") -> ServiceError:
    """Map an error answer of llama-server to the service's typed errors (by type, not text)."""
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        data = {}
    err = data.get("error", data) if isinstance(data, dict) else {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    message = str(err.get("message") or body or f"HTTP {status}")
    kind = err.get("type")
    if kind == "exceed_context_size_error":
        return ContextLengthExceeded(int(err.get("n_prompt_tokens") or 0),
                                     int(err.get("n_ctx") or 0))
    if kind == "not_supported_error" or status == 501:
        return Unsupported(message)
    if status == 400 or kind == "invalid_request_error":
        return InvalidRequest(message)
    if status == 503:
        return Overloaded(f"engine unavailable: {message}")
    return EngineFailed(f"llama-server error {status}: {message}" + (f"; {tail}" if tail else ""))


_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class SSEPayloads:
    """The ``data:`` payloads of a llama-server stream, read in bulk straight off its socket.

    ``http.client``'s ``readline`` on a chunked body costs several Python calls and a buffer
    copy per line; with one token per line that was most of the relay's time. This reads
    whatever the socket has, undoes the chunked framing itself and splits lines with
    ``bytes.split``: a handful of operations per token. ``head`` is the body's start, read
    with the headers.
    """

    def __init__(self, sock: socket.socket, chunked: bool, head: bytes = b"",
                 length: int | None = None) -> None:
        self._sock = sock
        self._chunked = chunked
        self._length = length  # Content-Length of a body that is not chunked
        self._timeout: float | None = None
        self._relayed = False
        self._more = True  # the last relayed read filled its buffer: more may be waiting
        self._hup = False  # the engine hung up (its end of file is still to be read)
        self._raw = b""  # transport bytes not decoded yet (a partial chunk-size line)
        self._left = 0  # bytes left in the current chunk
        self._crlf = False  # the CRLF after a chunk's data is still to come
        self._text = b""  # body bytes not yet split into lines
        self.done = False  # the body ended (last chunk, its length, or the connection closed)
        self._feed(head)

    def _feed(self, data: bytes) -> None:
        if self._chunked:
            self._decode(data)
        else:
            self._text += data
            if self._length is not None and len(self._text) >= self._length:
                self._text = self._text[:self._length]
                self.done = True

    def _decode(self, data: bytes) -> None:
        if not (self._raw or self._left or self._crlf):
            # The common case, a read of exactly one whole chunk (a token): no loop.
            eol = data.find(b"\r\n")
            if 0 < eol < 9:
                try:
                    size = int(data[:eol], 16)
                except ValueError:  # a chunk extension: the general path
                    size = 0
                if size and len(data) == eol + size + 4 and data.endswith(b"\r\n"):
                    self._text += data[eol + 2:eol + 2 + size]
                    return
        buf = self._raw + data if self._raw else data
        pos, end, out = 0, len(buf), []
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                self._crlf = not self._left
            elif self._crlf:
                if end - pos < 2:
                    break
                pos += 2
                self._crlf = False
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self.done = True
                    break
                self._left = size
        self._raw = buf[pos:]
        self._text += b"".join(out)

    def _read_relayed(self) -> bytes:
        """The next bytes, read on the relay thread off the non-blocking socket, yielding to
        the relay loop while there are none (see core/relay.py); b"" at the end. A silent
        engine times out as in blocking mode."""
        sock = self._sock
        if not self._relayed:
            self._relayed = True
            self._timeout = sock.gettimeout()
            sock.setblocking(False)
            RELAY.watch(sock)
        elif not self._more:
            # The last read was short, so the socket was drained: new data comes as an edge.
            self._events(RELAY.wait_readable(sock, self._timeout))
        while True:
            try:
                data = sock.recv(65536)
                # A full read may have left more; so may a hang-up seen with the data (its
                # end of file is not signalled again).
                self._more = len(data) == 65536 or self._hup
                return data
            except BlockingIOError:
                self._events(RELAY.wait_readable(sock, self._timeout))

    def _events(self, events: int) -> None:
        if events & _HANGUP:
            self._hup = True

    def read_body(self) -> bytes:
        """The whole body (an error answer), to its end."""
        while not self.done:
            data = self._sock.recv(65536)
            if not data:
                break
            self._feed(data)
        return self._text

    def unwatch(self) -> None:
        """Leave the relay loop (before the socket is closed)."""
        if self._relayed:
            RELAY.unwatch(self._sock)

    def next_batch(self) -> list[bytes]:
        """The payloads of every complete ``data:`` line available (waits for at least one);
        [] when the body has ended."""
        while True:
            if b"\n" in self._text:
                *lines, self._text = self._text.split(b"\n")
                batch = [line[6:].strip() for line in lines if line.startswith(b"data: ")]
                if batch:
                    return batch
            if self.done:
                return []
            data = self._read_relayed() if RELAY.in_relay() else self._sock.recv(65536)
            if not data:
                self.done = True
                return []
            self._feed(data)


def dumps_compact(obj: Any) -> bytes:
    """Compact UTF-8 JSON: orjson, or the standard encoder for what orjson refuses (an integer
    beyond 64 bits)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes) -> Any:
    """JSON from the engine: orjson, or the standard parser for what orjson refuses (an
    escaped lone surrogate)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class EngineStream:
    """The events of one streamed llama-server answer; ``close()`` cancels it in the engine."""

    def __init__(self, executor: "LLAMAExecutor", sock: socket.socket, payloads: SSEPayloads,
                 parser: ChatChunkParser | CompletionChunkParser) -> None:
        self._executor = executor
        self._sock = sock
        self._parser = parser
        self._payloads = payloads
        self.closed = False

    def __iter__(self) -> Iterator[Event]:
        completion = isinstance(self._parser, CompletionChunkParser)
        process = self._parser.process
        try:
            while True:
                try:
                    batch = self._payloads.next_batch()
                except (OSError, ValueError, AttributeError) as exc:
                    if self.closed:
                        return
                    raise self._executor.failure(
                        f"connection to llama-server lost: {exc}") from exc
                if not batch:
                    if self.closed:
                        return
                    raise self._executor.failure("llama-server closed the stream early")
                for data in batch:
                    if data == b"[DONE]":
                        return
                    chunk = loads(data)
                    if "error" in chunk and isinstance(chunk["error"], dict):
                        err = chunk["error"]
                        raise engine_error(int(err.get("code") or 500), json.dumps(chunk),
                                           self._executor.stderr_tail())
                    finished = False
                    for event in process(chunk):
                        finished = finished or isinstance(event, Finish)
                        yield event
                    if finished and completion:
                        return
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection; llama-server then stops generating for this request."""
        if self.closed:
            return
        self.closed = True
        self._payloads.unwatch()
        try:
            self._sock.close()
        except OSError:
            pass


class LLAMAExecutor:
    """One llama-server process serving one model.

    Contract: a state machine ``stopped → starting → ready → stopping → stopped``, with
    ``failed`` after a start that did not succeed or a crash. Only methods holding ``_lock``
    change the state (one writer). ``ensure_ready()`` is idempotent: it returns at once when
    the process is up, restarts it after a crash, and raises EngineFailed (with the tail of
    llama-server's stderr) when it cannot start. ``stop()`` sends SIGTERM to the process group,
    waits, then SIGKILL, and always reaps. Callers never inspect the state before calling.
    A start that fails twice in a row is not tried again on every request: ``ensure_ready()``
    repeats the last error until a pause (10 s, doubling up to 5 min) has passed.
    """

    START_FAILURES_BEFORE_PAUSE = 2
    FIRST_PAUSE = 10.0
    MAX_PAUSE = 300.0

    def __init__(self, model_path: Path, settings: EngineSettings, ctx_size: int, *,
                 name: str = "", pooling: str | None = None, projector: Path | None = None,
                 popen: Callable[..., subprocess.Popen] = popen_tied) -> None:
        self.model_path = Path(model_path)
        self.settings = settings
        self.ctx_size = int(ctx_size)
        self.name = name or self.model_path.stem
        self.pooling = pooling
        self.projector = projector
        self._popen = popen
        self._lock = threading.RLock()
        self._state = EngineState.STOPPED
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=400)
        self._errors: collections.deque[str] = collections.deque(maxlen=20)
        self._reader: threading.Thread | None = None
        self.port: int | None = None
        self.started_at: float | None = None
        self.restarts = 0  # starts after the first one (crash recovery, context changes)
        self._starts = 0
        self.prompt_opens_think = False
        # Crash-loop guard: after START_FAILURES_BEFORE_PAUSE failed starts in a row, the next
        # start waits out a pause (doubling up to MAX_PAUSE) instead of running on every request.
        self.failed_starts = 0
        self.last_error: str | None = None
        self.last_exit: int | None = None
        self._retry_at = 0.0
        self._clock: Callable[[], float] = time.monotonic
        self.report = LoadReport()  # where the model went (devices, buffers, --fit)

    # --- state ---------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        """The current state (a dead process reads as failed)."""
        with self._lock:
            if self._state == EngineState.READY and self._proc and self._proc.poll() is not None:
                return EngineState.FAILED
            return self._state

    @property
    def pid(self) -> int | None:
        """The llama-server process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def command(self, port: int) -> list[str]:
        """The llama-server command line for this model."""
        s = self.settings
        # -lv 4: the engine then reports each device, its buffers and what --fit chose
        # (LoadReport reads it); it adds a few lines per request, no per-token output.
        cmd = [str(s.binary), "-m", str(self.model_path), "--host", "127.0.0.1",
               "--port", str(port), "-c", str(self.ctx_size), "--parallel", str(s.parallel),
               "--kv-unified", "--jinja", "--reasoning-format", "none", "--no-webui",
               "-b", str(s.batch_size), "--metrics", "-lv", "4"]
        if s.threads:
            cmd += ["--threads", str(s.threads)]
        if s.rpc_servers:
            cmd += ["--rpc", ",".join(s.rpc_servers)]
        if s.gpu_layers is not None:
            cmd += ["-ngl", str(s.gpu_layers)]
        if s.tensor_split:
            cmd += ["--tensor-split", ",".join(f"{x:g}" for x in s.tensor_split)]
        if s.main_gpu is not None:
            cmd += ["--main-gpu", str(s.main_gpu)]
        if s.fit_target_mib is not None:
            cmd += ["--fit-target", str(s.fit_target_mib)]
        if s.embeddings:
            cmd += ["--embeddings", "--pooling", self.pooling or "mean"]
        if self.projector is not None:
            cmd += ["--mmproj", str(self.projector)]
        return cmd + list(s.extra_args)

    def stderr_tail(self, n: int = 8) -> str:
        """The last error-looking lines of llama-server's stderr (or its last lines)."""
        lines = list(self._errors)[-n:] or list(self._stderr)[-n:]
        return " | ".join(_LOG_PREFIX.sub("", line).strip() for line in lines)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        """Keep llama-server's log: its last lines, its error lines, the load report.

        The engine logs a few lines per slot for every request (at 32 slots, about 60 lines as
        a request starts). Handled line by line in Python, that holds the GIL for milliseconds
        just when the request's first token is being relayed. So the log is read in blocks,
        and a block with no error word, read after the engine is up and with debug logging
        off, costs a decode, a split and a search for the error words, all in C."""
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        pending = b""
        while True:
            try:
                block = os.read(fd, 65536)
            except OSError:
                block = b""
            if not block:
                if pending:
                    self._take_lines(pending, each=True)
                return
            block = pending + block
            cut = block.rfind(b"\n") + 1
            if not cut and len(block) < 65536:
                pending = block
                continue
            cut = cut or len(block)
            block, pending = block[:cut], block[cut:]
            each = (self._state == EngineState.STARTING or log.isEnabledFor(logging.DEBUG)
                    or _error_word_in(block))
            self._take_lines(block, each=each)
            if not each:
                # A request's burst of slot lines arrives in many small writes: let them
                # gather in the pipe (64 KiB) instead of waking up for each one while the
                # engine works on the request. failure() waits for the last lines.
                time.sleep(LOG_GATHER_S)

    def _take_lines(self, block: bytes, each: bool) -> None:
        lines = block.decode("utf-8", errors="replace").splitlines()
        self._stderr.extend(lines)
        if not each:
            return
        for line in lines:
            line = line.rstrip()
            if self._state == EngineState.STARTING:
                self.report.feed(line)
            if _error_word_in(line):
                self._errors.append(line)
            log.debug("[%s] %s", self.name, line)

    def _await_last_lines(self, proc: subprocess.Popen) -> None:
        """Once ``proc`` has exited, wait (briefly) until its log reader has taken every line
        it wrote: the reader may be sleeping between blocks (LOG_GATHER_S)."""
        reader = self._reader
        if reader is not None and proc.poll() is not None:
            reader.join(timeout=2 * LOG_GATHER_S + 0.5)

    def failure(self, message: str) -> EngineFailed:
        """An EngineFailed for ``message``, noting a crash so the next request restarts it."""
        proc = self._proc
        if self._state in (EngineState.STOPPING, EngineState.STOPPED):
            # Not a crash: stop() ended it (shutdown past shutdown_timeout, unload, restart).
            return EngineFailed(f"{message}: the service stopped this engine (it is shutting "
                                f"down, or unloaded or restarted the model)")
        if proc is not None:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                with self._lock:
                    if self._proc is proc:
                        self._state = EngineState.FAILED
                        self.last_exit = code
                message += f" (llama-server {describe_exit(code)})"
                if code < 0:
                    log.error("llama-server for %s was killed by %s: %s", self.name,
                              signal_name(code), describe_exit(code))
            down = self.unusable_workers(timeout=0.5) if self.settings.rpc_servers else []
            if down:
                message += (f"; RPC worker {', '.join(down)} went away: the next request "
                            f"loads the model again once it is back")
        if proc is not None:
            self._await_last_lines(proc)
        tail = self.stderr_tail()
        return EngineFailed(message + (f"; llama-server said: {tail}" if tail else ""))

    # --- life cycle ----------------------------------------------------------------------

    def ensure_ready(self) -> float:
        """Start llama-server if it is not running; return the seconds spent loading."""
        with self._lock:
            if (self._state == EngineState.READY and self._proc is not None
                    and self._proc.poll() is None):
                return 0.0
            began = time.monotonic()
            wait = self.retry_in()
            if wait > 0:
                raise EngineFailed(f"{self.last_error} [not retried for another {wait:.0f}s "
                                   f"after {self.failed_starts} failed starts in a row]")
            if self._proc is not None:
                log.warning("llama-server for %s is not running (state %s); restarting",
                            self.name, self._state.value)
                self._stop_locked()
            last: EngineFailed | None = None
            for _ in range(3):  # a port taken between free_port() and bind() is retried
                try:
                    self._start_locked()
                    self.failed_starts, self.last_error, self._retry_at = 0, None, 0.0
                    return time.monotonic() - began
                except EngineFailed as exc:
                    last = exc
                    if "bind" not in str(exc).lower():
                        break
            assert last is not None
            self.failed_starts += 1
            self.last_error = last.message
            if self.failed_starts >= self.START_FAILURES_BEFORE_PAUSE:
                pause = min(self.MAX_PAUSE, self.FIRST_PAUSE * 2 ** (
                    self.failed_starts - self.START_FAILURES_BEFORE_PAUSE))
                self._retry_at = self._clock() + pause
                log.error("llama-server for %s failed to start %d times in a row; next try in "
                          "%.0fs", self.name, self.failed_starts, pause)
            raise last

    def retry_in(self) -> float:
        """Seconds until a failed engine may be started again (0: now)."""
        return max(0.0, self._retry_at - self._clock()) if self._retry_at else 0.0

    def unusable_workers(self, timeout: float = 2.0) -> list[str]:
        """``endpoint: why`` for each configured RPC worker this engine cannot use now."""
        from .workers import hello

        out = []
        for endpoint in self.settings.rpc_servers:
            status = hello(endpoint, timeout=timeout)
            if not status.usable:
                out.append(f"{endpoint} ({status.describe()})")
        return out

    def _start_locked(self) -> None:
        down = self.unusable_workers()
        if down:
            # Not a failed start (nothing ran): the pause for crash loops does not apply.
            self._state = EngineState.FAILED
            raise EngineUnavailable(
                f"cannot load {self.name}: RPC worker {', '.join(down)}. Start it (`make "
                f"rpc-worker` on that host) or free it, or remove it from rpc_servers; the next "
                f"request loads the model again")
        port = free_port()
        cmd = self.command(port)
        log.info("starting llama-server for %s on port %d (ctx %d): %s", self.name, port,
                 self.ctx_size, " ".join(cmd))
        self._stderr.clear()
        self._errors.clear()
        self.report = LoadReport()
        self._state = EngineState.STARTING
        try:
            # GGML_NO_BACKTRACE: an abort (a lost RPC worker, say) exits at once with its
            # message instead of attaching gdb for a backtrace first.
            proc = self._popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        except OSError as exc:
            self._state = EngineState.FAILED
            raise EngineFailed(f"cannot run llama-server {self.settings.binary}: {exc}") from exc
        self._proc = proc
        self.port = port
        if self._starts:
            self.restarts += 1
        self._starts += 1
        self._reader = threading.Thread(target=self._read_stderr, args=(proc,), daemon=True,
                                        name=f"llama-stderr-{self.name}")
        self._reader.start()
        deadline = time.monotonic() + self.settings.startup_timeout
        delay = 0.02
        while True:
            code = proc.poll()
            if code is not None:
                self._await_last_lines(proc)
                self._state = EngineState.FAILED
                self.last_exit = code
                self._reap(proc)
                if code < 0:
                    log.error("llama-server for %s was killed by %s while loading: %s",
                              self.name, signal_name(code), describe_exit(code))
                if self.report.memory_error:
                    raise InsufficientMemory(self._memory_message())
                raise EngineFailed(f"llama-server for {self.name} {describe_exit(code)} "
                                   f"(while loading the model); llama-server said: "
                                   f"{self.stderr_tail() or 'nothing'}")
            status = self._health(port)
            if status == 200:
                break
            if time.monotonic() > deadline:
                self._kill(proc)
                self._state = EngineState.FAILED
                raise EngineFailed(f"llama-server for {self.name} did not become ready in "
                                   f"{self.settings.startup_timeout:.0f}s: {self.stderr_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        self.started_at = time.time()
        self._state = EngineState.READY
        offload = self.report.offload()
        log.info("%s loaded: %s layers of %s offloaded, context %s; devices: %s%s", self.name,
                 offload["layers"], offload["layers_total"], offload["context_length"],
                 "; ".join(f"{d['name']}{'[' + d['endpoint'] + ']' if d['endpoint'] else ''} "
                           f"weights {d['weights_mib']} MiB, KV {d['kv_mib']} MiB, compute "
                           f"{d['compute_mib']} MiB" for d in self.report.devices()) or "-",
                 f"; --fit: {offload['fit_layers']}" if offload["fit_layers"] else "")
        self.prompt_opens_think = self._detect_open_think()
        log.info("llama-server for %s ready (pid %d, port %d)", self.name, proc.pid, port)

    def _memory_message(self) -> str:
        """Ollama's words for a model that does not fit, with what the engine could not get."""
        from ..utils.system import available_memory_bytes

        need = self.report.memory_error or "more"
        free_dev = [d for d in self.report.devices_by_key.values()
                    if d.free_mib is not None and not d.is_host]
        avail = available_memory_bytes() / 2**30
        where = ("; free on the devices: " + ", ".join(
            f"{d.endpoint or d.name} {d.free_mib / 1024:.1f} GiB" for d in free_dev)
            if free_dev else "")
        return (f"model requires more system memory ({need} more for {self.name} with a "
                f"context of {self.ctx_size}) than is available ({avail:.1f} GiB{where}). Use "
                f"a smaller context (num_ctx / default_context_size), fewer parallel slots, "
                f"or spread the model over more devices (rpc_servers, tensor_split)")

    def _health(self, port: int) -> int | None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _detect_open_think(self) -> bool:
        """True when the chat template's generation prompt opens a ``<think>`` block itself."""
        try:
            out = self.call_json("POST", "/apply-template",
                                 {"messages": [{"role": "user", "content": "x"}]}, timeout=10)
        except ServiceError:
            return False
        return str(out.get("prompt", "")).rstrip().endswith("<think>")

    def stop(self) -> None:
        """Stop llama-server (SIGTERM, then SIGKILL) and reap it. Idempotent."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        proc = self._proc
        if proc is None:
            self._state = EngineState.STOPPED
            return
        self._state = EngineState.STOPPING
        self._kill(proc)
        self._proc = None
        self.port = None
        self._state = EngineState.STOPPED
        log.info("llama-server for %s stopped", self.name)

    @staticmethod
    def _kill(proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        LLAMAExecutor._reap(proc)

    @staticmethod
    def _reap(proc: subprocess.Popen) -> None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if proc.stderr is not None:
            try:
                proc.stderr.close()
            except OSError:
                pass

    # --- requests ------------------------------------------------------------------------

    def _running_port(self) -> int:
        port = self.port
        if port is None:
            raise self.failure(f"llama-server for {self.name} is not running")
        return port

    def _connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return _NoDelayConnection("127.0.0.1", self._running_port(),
                                  timeout=timeout or self.settings.request_timeout)

    def call_json(self, method: str, path: str, body: Any = None,
                  timeout: float | None = None) -> Any:
        """One JSON request to llama-server; typed errors on failure."""
        if RELAY.in_relay():  # inside a relayed stream (an Ollama final ``context``)
            return RELAY.call(self.call_json, method, path, body, timeout)
        conn = self._connect(timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self.failure(f"llama-server request {path} failed: {exc}") from exc
        finally:
            conn.close()
        if resp.status != 200:
            raise engine_error(resp.status, raw, self.stderr_tail())
        return json.loads(raw) if raw else {}

    def open_stream(self, req: InternalRequest) -> EngineStream:
        """Send a generation request and wait for its first result.

        Everything that can fail before the first token (a prompt over the context, a bad
        grammar, a dead engine) raises here, before the caller has sent a byte.
        """
        if RELAY.in_relay():  # the second part of a min_tokens generation
            return RELAY.call(self.open_stream, req)
        parser: ChatChunkParser | CompletionChunkParser
        if req.is_chat:
            path, payload = "/v1/chat/completions", build_chat_payload(req)
            last = req.messages[-1] if req.messages else None
            parser = ChatChunkParser(last.content if last and last.role == "assistant"
                                     and not last.tool_calls else None, req.top_logprobs)
        else:
            path, payload = build_completion_payload(req)
            parser = CompletionChunkParser()
        try:
            sock, status, payloads = self._post_stream(path, payload)
        except TimeoutError as exc:
            raise EngineFailed(f"llama-server did not answer within "
                               f"{self.settings.request_timeout:.0f}s") from exc
        except (OSError, ValueError) as exc:
            raise self.failure(f"llama-server request failed: {exc}") from exc
        if status != 200:
            try:
                raw = payloads.read_body()
            except OSError:
                raw = b""
            finally:
                sock.close()
            raise engine_error(status, raw, self.stderr_tail())
        return EngineStream(self, sock, payloads, parser)

    def _post_stream(self, path: str, payload: dict[str, Any]
                     ) -> tuple[socket.socket, int, SSEPayloads]:
        """POST ``payload`` to the engine on a plain socket; the socket, the status and the
        body's reader once the headers are in.

        ``http.client`` parses the headers with the ``email`` package and resolves the
        address each time: about 0.4 ms of Python per request, on the way to the first token.
        llama-server's answer needs none of it: a status line and a few headers.
        """
        port = self._running_port()
        body = dumps_compact(payload)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.settings.request_timeout)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (path.encode(), port, len(body), body))
            data = b""
            while (end := data.find(b"\r\n\r\n")) < 0:
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError("the connection closed before the answer's headers")
                data += more
            status_line, *lines = data[:end].split(b"\r\n")
            status = int(status_line.split(None, 2)[1])
            headers = {}
            for line in lines:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            chunked = headers.get(b"transfer-encoding") == b"chunked"
            length = None if chunked or b"content-length" not in headers \
                else int(headers[b"content-length"])
            return sock, status, SSEPayloads(sock, chunked, data[end + 4:], length)
        except BaseException:
            sock.close()
            raise

    def embed(self, inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
        """(vectors, prompt tokens) for each input, from llama-server's embeddings endpoint."""
        if not self.settings.embeddings:
            raise Unsupported("embeddings are turned off in this service's configuration")
        out = self.call_json("POST", "/v1/embeddings",
                             {"input": inputs, "encoding_format": "float"})
        data = sorted(out.get("data", []), key=lambda d: d.get("index", 0))
        return ([d["embedding"] for d in data],
                int((out.get("usage") or {}).get("prompt_tokens", 0)))

    def tokenize(self, text: str, add_special: bool = True,
                 with_pieces: bool = False) -> list[Any]:
        """Token ids (or ``{id, piece}`` objects) of ``text`` with the model's tokenizer."""
        out = self.call_json("POST", "/tokenize", {"content": text, "add_special": add_special,
                                                   "with_pieces": with_pieces})
        return out.get("tokens", [])

    def detokenize(self, tokens: list[int]) -> str:
        """Text of a list of token ids."""
        return self.call_json("POST", "/detokenize", {"tokens": tokens}).get("content", "")

    def apply_template(self, req: InternalRequest) -> str:
        """The prompt text the engine would build for a chat request."""
        payload = build_chat_payload(req)
        body = {k: payload[k] for k in ("messages", "tools", "tool_choice",
                                        "chat_template_kwargs", "add_generation_prompt")
                if k in payload}
        return self.call_json("POST", "/apply-template", body).get("prompt", "")
