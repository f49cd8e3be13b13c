"""Reasoning (``<think>…</think>``) handling shared by every dialect.

``ThinkSplitter`` consumes streamed answer text and sends reasoning and content to their own
channels. Reasoning is only recognised at the start of the answer (leading whitespace allowed),
as Ollama and llama.cpp do; a template that opens ``<think>`` inside the prompt makes the
answer start inside the block, so only ``</think>`` appears in the output.

Modes:
- ``split``: reasoning → ReasoningDelta, the rest → TextDelta.
- ``strip``: reasoning is dropped, only the answer is kept.
- ``keep``: everything stays in the content, tags included (an opening tag the template put in
  the prompt is added back so the content is well formed).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from .schemas import Event, PromptInfo, ReasoningDelta, TextDelta

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

SPLIT, STRIP, KEEP = "split", "strip", "keep"


def reasoning_mode(requested: bool | None, preserve_think_tags: bool) -> str:
    """The splitter mode for a request's ``reasoning`` flag and the service setting."""
    if requested is True:
        return SPLIT
    if requested is False:
        return STRIP
    return KEEP if preserve_think_tags else SPLIT


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Stateful splitter: ``feed(text)`` returns events, ``flush()`` returns what was held."""

    def __init__(self, mode: str = SPLIT, starts_in_reasoning: bool = False) -> None:
        self.mode = mode
        self._state = "think" if starts_in_reasoning else "start"
        self._buf = ""
        self._prefix_open = starts_in_reasoning and mode == KEEP
        self.reasoning_chunks = 0

    def _emit(self, out: list[Event], kind: str, text: str) -> None:
        if not text:
            return
        if kind == "think":
            self.reasoning_chunks += 1
            if self.mode == SPLIT:
                out.append(ReasoningDelta(text))
            elif self.mode == KEEP:
                out.append(TextDelta(text))
        else:
            out.append(TextDelta(text))

    def feed(self, text: str) -> list[Event]:
        """Events for a piece of streamed answer text."""
        out: list[Event] = []
        if self._prefix_open:
            self._prefix_open = False
            out.append(TextDelta(OPEN_TAG))
        self._buf += text
        while self._buf:
            if self._state == "content":
                out.append(TextDelta(self._buf))
                self._buf = ""
            elif self._state == "after":
                self._buf = self._buf.lstrip("\n")
                if self._buf:
                    self._state = "content"
            elif self._state == "start":
                stripped = self._buf.lstrip()
                if not stripped:
                    break  # only whitespace so far: wait
                if stripped.startswith(OPEN_TAG):
                    lead = self._buf[: len(self._buf) - len(stripped)]
                    if self.mode == KEEP:
                        out.append(TextDelta(lead + OPEN_TAG))
                    self._buf = stripped[len(OPEN_TAG):]
                    self._state = "think"
                elif OPEN_TAG.startswith(stripped):
                    break  # could still become <think>: wait
                else:
                    self._state = "content"
            else:  # think
                idx = self._buf.find(CLOSE_TAG)
                if idx >= 0:
                    self._emit(out, "think", self._buf[:idx])
                    rest = self._buf[idx + len(CLOSE_TAG):]
                    self._buf = rest
                    if self.mode == KEEP:
                        out.append(TextDelta(CLOSE_TAG))
                        self._state = "content"
                    else:
                        # The blank line after </think> is not part of the answer; it may
                        # arrive in a later chunk, so the "after" state waits for it.
                        self._state = "after"
                    if not rest:
                        break
                else:
                    hold = _partial_suffix(self._buf, CLOSE_TAG)
                    self._emit(out, "think", self._buf[: len(self._buf) - hold])
                    self._buf = self._buf[len(self._buf) - hold:]
                    break
        return out

    def flush(self) -> list[Event]:
        """What is still held at the end of the stream."""
        out: list[Event] = []
        if self._buf:
            self._emit(out, "think" if self._state == "think" else "content", self._buf)
            self._buf = ""
        return out

    def process(self, events: Iterable[Event]) -> Iterator[Event]:
        """Apply the splitter to an event stream; non-text events pass through in order."""
        for event in events:
            if type(event) is TextDelta and self._state == "content" and not self._buf \
                    and not self._prefix_open:
                yield event  # past any reasoning: text goes through as it is (the hot path)
                continue
            if isinstance(event, TextDelta):
                parts = self.feed(event.text)
                if event.tokens:
                    # Token details (logprobs) stay with the text they came with.
                    texts = [p for p in parts if isinstance(p, TextDelta)]
                    if texts:
                        texts[-1].tokens = event.tokens
                    elif not parts:
                        parts = [TextDelta("", tokens=event.tokens)] if self.mode == KEEP \
                            else []
                yield from parts
            elif isinstance(event, PromptInfo):
                yield event  # no text can be held yet, and none must be cut by it
            else:
                yield from self.flush()
                yield event
        yield from self.flush()


def split_think(text: str, starts_in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a complete answer."""
    splitter = ThinkSplitter(SPLIT, starts_in_reasoning)
    events = splitter.feed(text) + splitter.flush()
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    return reasoning, content
