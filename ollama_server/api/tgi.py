"""HuggingFace TGI blueprint: ``/generate``, ``/generate_stream``, ``POST /`` (compat), ``/info``,
``/tokenize``; and the shared paths ``/generate`` and ``/tokenize``, told apart by body key
(``inputs`` → TGI, ``prompt``/``messages`` → vLLM; API-REFERENCE.md §8).

TGI routes have no ``model`` field: they serve the default model (``default_model``, or the
first model when it is null). The placeholder model names TGI clients send to
``/v1/chat/completions`` (``tgi``, ``dummy``) are registered as aliases of the default model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from ..adapters import tgi as tg
from ..core.errors import ServiceError
from .common import (
    as_service_error,
    dumpb,
    error_response,
    json_body,
    register_error_formatter,
    stream_response,
)
from .handlers import services, start_generation, with_engine
from .vllm import vllm_generate, vllm_tokenize

bp = Blueprint("tgi", __name__)
register_error_formatter("tgi", tg.tgi_error)

PLACEHOLDER_MODELS = ("tgi", "dummy")


@bp.record_once
def _aliases(state: Any) -> None:
    manager = state.app.extensions["ollama_server"].manager
    for name in PLACEHOLDER_MODELS:
        manager.add_alias(name)


def sse(obj: Any) -> bytes:
    """One TGI SSE frame: ``data:`` without a space, as TGI's router writes it."""
    return b"data:" + dumpb(obj) + b"\n\n"


def _prepare(body: dict[str, Any], stream: bool) -> tuple[tg.TGIRequest, list[dict[str, Any]]]:
    """Validate, tokenize with the engine, apply the length rules and truncation."""
    svc = services()
    model = svc.manager.default_model_name()
    tgi = tg.tgi_generate_to_internal(body, model, stream)
    with with_engine(model) as (engine, info):
        pieces = engine.tokenize(tgi.inputs, add_special=True, with_pieces=True)
        max_total = max(svc.manager.context_for(info), engine.ctx_size)
    tg.check_tgi_lengths(tgi, len(pieces), max_total)
    if tgi.truncate and len(pieces) > tgi.truncate:
        pieces = pieces[-tgi.truncate:]  # TGI keeps the end of the input
        tgi.req.prompt = [int(p["id"]) for p in pieces]
    return tgi, pieces


def _generate(body: dict[str, Any], as_list: bool = False) -> Response:
    started = time.monotonic()
    tgi, pieces = _prepare(body, stream=False)
    gen = start_generation(tgi.req, "/generate")
    result = gen.collect()
    prefill = tg.prefill_tokens(pieces) if tgi.decoder_input_details else None
    out = tg.internal_to_tgi_generate(result, tgi, prefill)
    resp = jsonify([out] if as_list else out)
    usage = result.finish.usage if result.finish else None
    total_ms = (time.monotonic() - started) * 1000.0
    generated = usage.completion_tokens if usage else len(result.tokens)
    resp.headers.update({
        "x-compute-type": "llama.cpp", "x-compute-characters": str(len(tgi.inputs)),
        "x-prompt-tokens": str(usage.prompt_tokens if usage else len(pieces)),
        "x-generated-tokens": str(generated), "x-total-time": str(int(total_ms)),
        "x-inference-time": str(int((usage.prompt_ms + usage.predicted_ms) if usage else 0)),
        "x-time-per-token": str(int(usage.predicted_ms / generated) if usage and generated
                                else 0),
        "x-queue-time": str(int(max(0.0, total_ms - ((usage.prompt_ms + usage.predicted_ms)
                                                     if usage else 0.0))))})
    return resp


def _generate_stream(body: dict[str, Any]) -> Response:
    """SSE of token events. As in TGI, an error — even a validation error — is an event of a
    200 stream: ``data:{"error", "error_type"}``."""
    gen = None
    try:
        tgi, pieces = _prepare(body, stream=True)
        gen = start_generation(tgi.req, "/generate_stream")
    except ServiceError as exc:
        err, _ = tg.tgi_error(exc)
        return stream_response(iter([sse(err)]), "text/event-stream",
                               headers={"x-compute-type": "llama.cpp"})
    converter = tg.TGIStream(tgi, len(pieces))
    generation = gen

    def frames() -> Iterator[str]:
        try:
            for event in generation:
                for obj in converter.process(event):
                    yield sse(obj)
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            err, _ = tg.tgi_error(as_service_error(exc))
            yield sse(err)

    return stream_response(frames(), "text/event-stream", on_close=generation.close,
                           headers={"X-Request-Id": generation.request_id,
                                    "x-compute-type": "llama.cpp",
                                    "x-compute-characters": str(len(tgi.inputs))})


@bp.post("/generate")
def generate() -> Response:
    """TGI ``/generate`` (body with ``inputs``) or vLLM's legacy ``/generate`` (``prompt``)."""
    body = json_body()
    if "inputs" not in body and "prompt" in body:
        try:
            return vllm_generate(body)
        except ServiceError as exc:
            return error_response(exc, "openai")
    return _generate(body)


@bp.post("/generate_stream")
def generate_stream() -> Response:
    """TGI ``/generate_stream``."""
    return _generate_stream(json_body())


@bp.post("/")
def compat_generate() -> Response:
    """TGI's compat route (what the ``text_generation`` and ``huggingface_hub`` clients call):
    ``stream`` → the ``/generate_stream`` SSE, else a JSON array of one ``/generate`` body."""
    body = json_body()
    if body.get("stream") is True:
        return _generate_stream(body)
    return _generate(body, as_list=True)


@bp.get("/info")
def info() -> Response:
    """TGI ``/info`` for the default model."""
    svc = services()
    model = svc.manager.resolve(svc.manager.default_model_name())
    entry = svc.manager.loaded_entry(model.name)
    max_total = max(svc.manager.context_for(model), entry.ctx_size if entry else 0)
    slots = svc.manager.parallel_for(model.name)
    return jsonify(tg.tgi_info(model.name, max_total, slots * 32, model.digest or "", slots))


@bp.post("/tokenize")
def tokenize() -> Response:
    """TGI ``/tokenize`` (``inputs`` → ``[{id, text, start, stop}]``) or vLLM's
    (``prompt``/``messages`` → ``{count, max_model_len, tokens, token_strs}``)."""
    body = json_body()
    if "inputs" not in body:
        return vllm_tokenize(body)
    try:
        inputs = body.get("inputs")
        if not isinstance(inputs, str):
            raise tg.TGIValidation("Failed to deserialize the JSON body into the target type: "
                                   "missing field `inputs`")
        if not inputs:
            raise tg.TGIValidation("`inputs` cannot be empty")
        with with_engine(services().manager.default_model_name()) as (engine, _info):
            pieces = engine.tokenize(inputs, add_special=True, with_pieces=True)
    except ServiceError as exc:
        return error_response(exc, "tgi")
    return jsonify(tg.internal_to_tgi_tokenize(inputs, pieces))
