"""Anthropic Messages API blueprint: ``/v1/messages`` and ``/v1/messages/count_tokens``.

``GET /v1/models`` in Anthropic's shape lives with the OpenAI routes (one path, two dialects:
an ``anthropic-version`` header picks this shape, API-REFERENCE.md §8). Credentials
(``x-api-key`` or ``Authorization: Bearer``) are checked app-wide; ``anthropic-version`` and
``anthropic-beta`` are accepted whatever their value.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, jsonify

from ..adapters import anthropic as an
from .common import (
    as_service_error,
    json_body,
    register_error_formatter,
    sse_event,
    stream_response,
)
from .handlers import (
    Generation,
    apply_model_defaults,
    fit_tools_to_template,
    start_generation,
    with_engine,
)

bp = Blueprint("anthropic", __name__)
register_error_formatter("anthropic", an.anthropic_error)


def anthropic_frames(gen: Generation, converter: an.AnthropicStream) -> Iterator[str]:
    """SSE frames (``event:`` + ``data:``) of ``gen``; a failure mid-stream is ``event: error``."""
    try:
        # message_start goes out with the first engine event (the prompt size), not before.
        for event in gen:
            for name, data in converter.process(event):
                yield sse_event(name, data)
    except Exception as exc:  # noqa: BLE001 - reported in the stream, the status is sent
        for name, data in converter.start() + converter.error(as_service_error(exc)):
            yield sse_event(name, data)


@bp.post("/v1/messages")
def messages() -> Response:
    """Create a message, streamed (SSE events) or not."""
    body = json_body()
    req = an.anthropic_messages_to_internal(body)
    message_id = an.new_message_id()
    gen = start_generation(req, "/v1/messages")
    model = body["model"]
    if req.stream:
        converter = an.AnthropicStream(model, message_id)
        return stream_response(anthropic_frames(gen, converter), "text/event-stream",
                               on_close=gen.close, headers={"X-Request-Id": gen.request_id})
    result = gen.collect()
    return jsonify(an.internal_to_anthropic_message(result, model, message_id))


@bp.post("/v1/messages/count_tokens")
def count_tokens() -> Response:
    """``{input_tokens}``: the model's tokenizer over the prompt the engine would build."""
    body = json_body()
    req = an.anthropic_messages_to_internal(body, require_max_tokens=False)
    with with_engine(req.model, template_of=req) as (engine, info):
        apply_model_defaults(req, info)  # the model's system prompt is part of what it sees
        fit_tools_to_template(req, info)  # and the tools, as generation would give them
        prompt = engine.apply_template(req)
        tokens = engine.tokenize(prompt, add_special=True)
    return jsonify({"input_tokens": len(tokens)})
