"""OpenAI Responses API blueprint: ``POST /v1/responses``, streamed or not.

Errors before the first byte are OpenAI error bodies (the "openai" formatter covers /v1/);
after it they are an ``error`` SSE event followed by ``response.failed``.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, jsonify

from ..adapters import responses as rs
from .common import as_service_error, json_body, sse_event, stream_response
from .handlers import Generation, start_generation

bp = Blueprint("responses", __name__)


def sse_stream(gen: Generation, converter: rs.ResponsesStream) -> Response:
    """Stream ``gen`` as Responses API events (``event: <type>`` + ``data:`` frames)."""

    def frames() -> Iterator[str]:
        try:
            for kind, data in converter.start():
                yield sse_event(kind, data)
            for event in gen:
                for kind, data in converter.process(event):
                    yield sse_event(kind, data)
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            for kind, data in converter.error(as_service_error(exc)):
                yield sse_event(kind, data)

    return stream_response(frames(), "text/event-stream", on_close=gen.close,
                           headers={"X-Request-Id": gen.request_id})


@bp.post("/v1/responses")
def create_response() -> Response:
    """Create a model response (OpenAI Responses API)."""
    body = json_body()
    req = rs.responses_to_internal(body)
    gen = start_generation(req, "/v1/responses")
    # After start_generation: the envelope echoes the sampling values the model's defaults set.
    envelope = rs.response_envelope(body, gen.req)
    if req.stream:
        return sse_stream(gen, rs.ResponsesStream(envelope, req.logprobs))
    result = gen.collect()
    return jsonify(rs.internal_to_response(result, envelope, req.logprobs))
