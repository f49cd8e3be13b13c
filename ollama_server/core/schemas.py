"""The neutral types every dialect translates to and from.

Adapters turn a wire body into one ``InternalRequest``; the executor turns engine output into a
stream of internal events (``TextDelta``, ``ReasoningDelta``, ``ToolCallDelta``, ``Finish``);
adapters turn those events into their own frames. Nothing here knows any dialect.

A request for ``n`` answers (choices) gives one event stream in which each event names its
``choice`` (0 … n-1); each choice ends with its own ``Finish``.
"""

from __future__ import annotations

import enum
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """A complete function call made by the model; ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str = "{}"


@dataclass
class Message:
    """One chat message in neutral form."""

    role: str  # system | user | assistant | tool
    content: str = ""
    images: list[str] = field(default_factory=list)  # base64 payloads or data URLs
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None  # tool name for role "tool"
    reasoning: str | None = None  # earlier reasoning sent back by the client


@dataclass
class Tool:
    """A function the model may call; ``parameters`` is a JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object",
                                                                 "properties": {}})


@dataclass
class InternalRequest:
    """One generation request, whatever dialect it came in.

    Exactly one of ``messages`` (chat) and ``prompt`` (raw text or token ids) is set.
    ``None`` for a sampling field means "the model's or engine's default".
    ``reasoning``: True splits ``<think>`` reasoning into its own channel, False removes it,
    None follows the service's ``preserve_think_tags`` setting.
    """

    model: str
    dialect: str = "openai"
    n: int = 1  # independent answers to generate (OpenAI's and vLLM's ``n``)
    messages: list[Message] | None = None
    prompt: str | list[int] | None = None
    suffix: str | None = None
    raw: bool = False  # prompt is sent as is, without the chat template

    max_tokens: int | None = None
    # End of sequence, stop strings and stop token ids are not honoured before this many
    # tokens (vLLM's ``min_tokens``).
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # also end the answer (vLLM)
    # The stop strings that stand for stop_token_ids (llama-server stops on strings): text →
    # id, so that the answer can name the token (vLLM's stop_reason is then the id).
    stop_token_texts: dict[str, int] = field(default_factory=dict)
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None
    # Whether the caller tells a full context window from a token limit (Anthropic's
    # model_context_window_exceeded): the engine then reports it at the end (verbose).
    wants_context_full: bool = False

    stream: bool = False
    json_schema: dict[str, Any] | None = None  # {} means "any JSON object"
    grammar: str | None = None  # GBNF
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None  # auto | none | required | {"name": …}
    parallel_tool_calls: bool | None = None
    reasoning: bool | None = None
    # How hard to think: a level (OpenAI's reasoning_effort, Ollama's think level) for
    # templates that read one, and a cap on the reasoning's tokens (Anthropic's budget_tokens,
    # or the level's budget: core/engine/payload.EFFORT_BUDGETS) the engine enforces by closing
    # the thinking block when it is spent.
    reasoning_effort: str | None = None
    reasoning_budget: int | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    logprobs: bool = False
    top_logprobs: int = 0
    return_tokens: bool = False

    num_ctx: int | None = None
    keep_alive: float | None = None  # seconds; negative keeps the model loaded forever
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_field: str | None = None  # the body field errors about the prompt name (default:
    #                                  messages or prompt; Responses' input, TGI's inputs)

    @property
    def is_chat(self) -> bool:
        """True for a chat request (messages), False for a raw prompt."""
        return self.messages is not None

    @property
    def prompt_param(self) -> str:
        """The request field that holds the prompt, as errors name it."""
        return self.prompt_field or ("messages" if self.is_chat else "prompt")


@dataclass
class TokenInfo:
    """One generated token as the engine reported it."""

    id: int | None
    text: str
    logprob: float | None = None
    bytes: list[int] | None = None
    top: list[tuple[str, float, int | None]] = field(default_factory=list)  # (text, lp, id)


@dataclass
class TextDelta:
    """Answer text generated since the last event."""

    text: str
    tokens: list[TokenInfo] = field(default_factory=list)
    choice: int = 0


@dataclass
class ReasoningDelta:
    """Reasoning (``<think>``) text generated since the last event."""

    text: str
    choice: int = 0


@dataclass
class PromptInfo:
    """The prompt has been evaluated: its size in tokens, and how many came from the cache.

    Sent once, before the first generated text, so that answers can report the prompt size
    before they end (Anthropic's ``message_start``, live progress).
    """

    prompt_tokens: int
    cached_tokens: int = 0
    choice: int = 0


@dataclass
class ToolCallDelta:
    """A piece of a tool call: the first piece of each call carries ``id`` and ``name``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    choice: int = 0


@dataclass
class Usage:
    """Token counts and engine timings of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    load_ms: float = 0.0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of_choices(cls, usages: list["Usage"]) -> "Usage":
        """The usage of a request with several choices: the prompt counted once, generated
        tokens summed (as OpenAI and vLLM report ``n`` > 1); times of parallel work: longest."""
        if not usages:
            return cls()
        first = usages[0]
        return cls(prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens,
                   completion_tokens=sum(u.completion_tokens for u in usages),
                   reasoning_tokens=sum(u.reasoning_tokens for u in usages),
                   prompt_ms=first.prompt_ms, load_ms=first.load_ms,
                   predicted_ms=max(u.predicted_ms for u in usages))


@dataclass
class Finish:
    """The end of a generation.

    ``reason``: ``stop`` (end of sequence), ``stop_sequence`` (``stop_sequence`` holds the
    matched string), ``length`` (max tokens or context), ``tool_calls``. ``context_full``:
    a ``length`` that came from the context window, not from the token limit.
    """

    reason: str
    usage: Usage = field(default_factory=Usage)
    stop_sequence: str | None = None
    stop_token: int | None = None  # the stop_token_ids entry that ended it (vLLM)
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens_ids: list[int] | None = None
    choice: int = 0
    context_full: bool = False


Event = TextDelta | ReasoningDelta | ToolCallDelta | PromptInfo | Finish


class RequestState(enum.StrEnum):
    """Life cycle of a tracked request."""

    QUEUED = "queued"
    LOADING = "loading"
    PROCESSING = "processing"  # prompt evaluation, before the first token
    GENERATING = "generating"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class RequestStatus:
    """What the tracker knows about one request; ``to_dict`` is the /api/progress body."""

    id: str
    model: str
    dialect: str
    endpoint: str = ""
    stream: bool = False
    state: RequestState = RequestState.QUEUED
    created: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    processing_at: float | None = None  # left the queue (and any model load)
    finished_at: float | None = None
    prompt_tokens: int = 0
    tokens_generated: int = 0
    max_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    caller: str | None = None  # the name of the API key it came with (never the key)
    worker: int = field(default_factory=os.getpid)  # the process serving it

    @property
    def ttft_ms(self) -> float | None:
        """Time to first token in milliseconds, once known."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000.0

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed since the first token."""
        if self.first_token_at is None or self.tokens_generated < 2:
            return None
        end = self.finished_at or time.monotonic()
        elapsed = end - self.first_token_at
        return (self.tokens_generated - 1) / elapsed if elapsed > 0 else None

    @property
    def queue_s(self) -> float | None:
        """Seconds from arrival to leaving the queue (model load included), once known."""
        return None if self.processing_at is None else self.processing_at - self.started

    @property
    def time_per_output_token_s(self) -> float | None:
        """Mean seconds between generated tokens, for a finished request with two or more."""
        speed = self.tokens_per_second if self.finished_at is not None else None
        return 1.0 / speed if speed else None

    @property
    def elapsed_s(self) -> float:
        """Seconds since the request arrived (until it finished)."""
        return (self.finished_at or time.monotonic()) - self.started

    @property
    def done(self) -> bool:
        """True once the request reached a final state."""
        return self.state in (RequestState.COMPLETED, RequestState.FAILED,
                              RequestState.CANCELLED)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the progress API and the dashboard."""
        progress = None
        if self.max_tokens:
            progress = min(1.0, self.tokens_generated / self.max_tokens)
        if self.state == RequestState.COMPLETED:
            progress = 1.0
        return {
            "id": self.id,
            "model": self.model,
            "dialect": self.dialect,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "state": self.state.value,
            "created": self.created,
            "elapsed_s": round(self.elapsed_s, 4),
            "prompt_tokens": self.prompt_tokens,
            "tokens_generated": self.tokens_generated,
            "max_tokens": self.max_tokens,
            "progress": progress,
            "queue_ms": None if self.queue_s is None else round(self.queue_s * 1000.0, 2),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "tokens_per_second": (None if self.tokens_per_second is None
                                  else round(self.tokens_per_second, 2)),
            "finish_reason": self.finish_reason,
            "error": self.error,
            "caller": self.caller,
            "worker": self.worker,
        }
