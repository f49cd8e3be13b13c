"""vLLM's ``min_tokens`` on llama-server, which has no minimum length: one answer made of two
engine requests.

llama-server's sampling parameters have no minimum length, and its ``logit_bias`` holds for
the whole generation, so "no end before N tokens" cannot be said in one request. Instead:

1. **The first ``min_tokens`` tokens**: the prompt's token ids with ``n_predict = min_tokens``,
   ``ignore_eos`` (llama-server then biases every end-of-generation token to -inf), no stop
   strings, and the request's ``stop_token_ids`` biased to -inf: nothing can end these tokens,
   which is vLLM's rule (end of sequence, stop strings and stop token ids are not honoured
   before ``min_tokens``).
2. **The rest**: the same prompt ids followed by the ids just generated, with the request's
   own stopping and what is left of ``max_tokens``. The slot's prompt cache already holds all
   of it, so the engine goes on where it stopped instead of reading the prompt again.

Both parts go to the native ``/completion`` endpoint as token ids (a chat request's prompt is
the engine's own rendering of its chat template, tokenized the way llama-server tokenizes it),
so the second part continues exactly the token sequence of the first: nothing is re-rendered
or re-tokenized from text. The client sees one answer: the events of both parts, the prompt
size of the first, and usage counting every generated token.

Not combinable (a clear 400, see ``check_min_tokens``): grammars and JSON schemas (a grammar's
state cannot be carried from one request to the next), tools and images (the chat endpoint's
tool parsing and image handling are not used), and infill (``suffix``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

from .errors import EngineFailed, Unsupported
from .schemas import Event, Finish, InternalRequest, PromptInfo, TextDelta, Usage

NEVER = float("-inf")  # a logit bias that bans a token


def check_min_tokens(req: InternalRequest) -> None:
    """Unsupported when ``min_tokens`` is combined with what the two-part generation cannot
    carry; nothing when ``min_tokens`` is unset or 0."""
    if not req.min_tokens:
        return
    conflicts = [name for name, used in (
        ("a grammar or JSON schema (guided decoding, response_format)",
         req.grammar is not None or req.json_schema is not None),
        ("tools", bool(req.tools)),
        ("images", any(m.images for m in req.messages or [])),
        ("suffix (infill)", req.suffix is not None)) if used]
    if conflicts:
        raise Unsupported(f"'min_tokens' cannot be combined with {' or '.join(conflicts)}: "
                          f"llama.cpp has no minimum length, and the two-part generation "
                          f"that provides it cannot carry them; drop one of the two",
                          param="min_tokens")


def open_stream(engine: Any, req: InternalRequest) -> Any:
    """The engine stream for ``req``: ``engine.open_stream``, or the two-part generation when
    ``min_tokens`` is set. Errors before the first token raise here, as with open_stream."""
    if not req.min_tokens:
        return engine.open_stream(req)
    check_min_tokens(req)
    return MinTokensStream(engine, req)


class MinTokensStream:
    """The events of a ``min_tokens`` request (see the module); ``close()`` cancels it."""

    def __init__(self, engine: Any, req: InternalRequest) -> None:
        self._engine = engine
        self._req = req
        self._lock = threading.Lock()
        self.closed = False
        if req.is_chat:
            text = engine.apply_template(req)
            self._prompt = [int(t) for t in engine.tokenize(text, add_special=True)]
        elif isinstance(req.prompt, list):
            self._prompt = list(req.prompt)
        else:
            self._prompt = [int(t) for t in engine.tokenize(str(req.prompt or ""),
                                                            add_special=True)]
        first = min(req.min_tokens or 0, req.max_tokens) if req.max_tokens is not None \
            else req.min_tokens
        bias = dict(req.logit_bias or {})
        bias.update({int(i): NEVER for i in req.stop_token_ids})
        self._first_tokens = int(first or 0)
        self._first = engine.open_stream(self._part(self._prompt, self._first_tokens,
                                                    stop=[], ignore_eos=True, logit_bias=bias))
        self._second: Any = None

    def _part(self, prompt: list[int], max_tokens: int | None, **changes: Any
              ) -> InternalRequest:
        """A raw token-id request with the sampling of ``req``."""
        return dataclasses.replace(self._req, messages=None, prompt=prompt, raw=True,
                                   suffix=None, min_tokens=None, max_tokens=max_tokens,
                                   stop_token_ids=[], n=1, **changes)

    def __iter__(self) -> Iterator[Event]:
        generated: list[int] = []
        first_finish: Finish | None = None
        for event in self._first:
            if isinstance(event, Finish):
                first_finish = event
                continue
            if isinstance(event, TextDelta):
                generated += [t.id for t in event.tokens]
            yield event
        if first_finish is None or self.closed:
            return
        left = None if self._req.max_tokens is None else self._req.max_tokens - len(generated)
        if len(generated) < self._first_tokens or left == 0:
            yield first_finish  # the context is full, or min_tokens == max_tokens
            return
        if any(i is None for i in generated):
            raise EngineFailed("llama-server did not name the ids of the generated tokens")
        second = self._engine.open_stream(self._part(self._prompt + generated, left))
        with self._lock:
            self._second = second
            closed = self.closed
        if closed:
            second.close()
            return
        for event in second:
            if isinstance(event, PromptInfo):
                continue  # the client's prompt is the first part's
            if isinstance(event, Finish):
                event.usage = _joined(first_finish.usage, event.usage)
            yield event

    def close(self) -> None:
        """Stop whichever part is running. Idempotent."""
        with self._lock:
            self.closed = True
            second = self._second
        self._first.close()
        if second is not None:
            second.close()


def _joined(first: Usage, second: Usage) -> Usage:
    """Usage of the whole answer: the first part's prompt, the tokens of both parts."""
    return Usage(prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens,
                 completion_tokens=first.completion_tokens + second.completion_tokens,
                 prompt_ms=first.prompt_ms,
                 predicted_ms=first.predicted_ms + second.prompt_ms + second.predicted_ms)
