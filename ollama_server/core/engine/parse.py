"""llama-server's JSON → internal events (pure), and its error answers → typed errors."""

from __future__ import annotations

import json
from typing import Any

from ..errors import (
    ContextLengthExceeded,
    EngineFailed,
    InvalidRequest,
    Overloaded,
    ServiceError,
    Unsupported,
)
from ..schemas import (
    Event,
    Finish,
    PromptInfo,
    TextDelta,
    TokenInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
)


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


# llama-server's error for every request in progress when no free cell is left in the KV
# cache the slots share (tools/server/server-context.cpp, decode at a batch of one).
KV_CACHE_FULL = "Context size has been exceeded"


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
    if message.startswith(KV_CACHE_FULL):
        # Every request in progress fails at once when the KV cache the slots share is full
        # (each one fits its slot, together they do not): busy, not broken; worth a retry.
        return Overloaded(f"server busy: the model's KV cache is full with the requests in "
                          f"progress ({message}); please try again, or raise kv_pool_size in "
                          f"the service's configuration to run more long requests at once",
                          retry_after=2)
    return EngineFailed(f"llama-server error {status}: {message}" + (f"; {tail}" if tail else ""))
