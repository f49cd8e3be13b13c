"""OpenAI API blueprint: chat completions, completions, models, embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from ..adapters import openai as oa
from .common import (
    as_service_error,
    json_body,
    register_error_formatter,
    sse_data,
    stream_response,
)
from .handlers import Generation, run_embeddings, services, start_generation

bp = Blueprint("openai", __name__)
register_error_formatter("openai", oa.openai_error)


def sse_stream(gen: Generation, converter: Any) -> Response:
    """Stream ``gen`` through an OpenAI stream converter as SSE, ending with ``[DONE]``.

    An error after the first byte becomes a ``data: {"error": …}`` frame, then ``[DONE]``.
    """

    def frames() -> Iterator[str]:
        try:
            for chunk in converter.start() if hasattr(converter, "start") else []:
                yield sse_data(chunk)
            for event in gen:
                for chunk in converter.process(event):
                    yield sse_data(chunk)
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            body, _ = oa.openai_error(as_service_error(exc))
            yield sse_data(body)
        yield "data: [DONE]\n\n"

    return stream_response(frames(), "text/event-stream", on_close=gen.close,
                           headers={"X-Request-Id": gen.request_id})


@bp.post("/v1/chat/completions")
@bp.post("/api/chat/completions")
@bp.post("/chat/completions")
def chat_completions() -> Response:
    """OpenAI chat completions, streamed or not."""
    body = json_body()
    req = oa.openai_chat_to_internal(body)
    gen = start_generation(req, "/v1/chat/completions")
    if req.stream:
        return sse_stream(gen, oa.OpenAIChatStream(body["model"], oa.include_usage(body),
                                                   req.logprobs, n=req.n,
                                                   continuous_usage=oa.continuous_usage(body),
                                                   functions=oa.legacy_functions(body),
                                                   named_tool=oa.named_tool_choice(body)))
    return jsonify(oa.internal_to_openai_chat(gen.collect_choices(), body["model"],
                                              req.logprobs,
                                              functions=oa.legacy_functions(body),
                                              named_tool=oa.named_tool_choice(body)))


@bp.post("/v1/completions")
@bp.post("/completions")
def completions() -> Response:
    """OpenAI legacy completions, streamed or not."""
    body = json_body()
    req = oa.openai_completion_to_internal(body)
    echo = body.get("echo") is True and isinstance(req.prompt, str)
    gen = start_generation(req, "/v1/completions")
    prompt = req.prompt if echo else None
    if req.stream:
        return sse_stream(gen, oa.OpenAICompletionStream(
            body["model"], oa.include_usage(body), req.logprobs, prompt, n=req.n,
            continuous_usage=oa.continuous_usage(body)))
    return jsonify(oa.internal_to_openai_completion(gen.collect_choices(), body["model"],
                                                    prompt, req.logprobs))


@bp.get("/v1/models")
def list_models() -> Response:
    """Every model, as OpenAI model objects (Anthropic's page with ``anthropic-version``)."""
    if request.headers.get("anthropic-version"):
        from ..adapters import anthropic

        return jsonify(anthropic.anthropic_models_page(services().manager.list_models(),
                                                    request.args))
    return jsonify({"object": "list",
                    "data": [oa.model_card(m) for m in services().manager.list_models()]})


@bp.get("/v1/models/<path:model_id>")
def get_model(model_id: str) -> Response:
    """One model object (404 model_not_found when unknown)."""
    if request.headers.get("anthropic-version"):
        from ..adapters import anthropic

        return jsonify(anthropic.anthropic_model(services().manager.resolve(model_id)))
    return jsonify(oa.model_card(services().manager.resolve(model_id)))


@bp.post("/v1/embeddings")
@bp.post("/embeddings")
def embeddings() -> Response:
    """Embeddings as float lists or base64 little-endian float32."""
    body = json_body()
    model = oa.require_model(body)
    inputs, fmt, dims = oa.openai_embeddings_inputs(body)
    vectors, tokens, _, _ = run_embeddings(model, inputs, "/v1/embeddings", "openai")
    return jsonify(oa.internal_to_openai_embeddings(vectors, model, tokens, fmt, dims))

