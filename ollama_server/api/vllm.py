"""vLLM's routes beside the OpenAI ones: tokenize, detokenize, version, ping, legacy generate.

vLLM's extra request fields on ``/v1/chat/completions`` and ``/v1/completions`` are read by the
OpenAI adapter (``adapters.vllm.apply_vllm_extras``). ``POST /generate`` and ``POST /tokenize``
are shared with TGI and dispatched by body key in ``api/tgi.py``; the vLLM halves live here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from ..adapters import vllm as vl
from ..core.schemas import Finish
from .common import as_service_error, json_body, ndjson_line, stream_response
from .handlers import (
    check_token_ids,
    fit_tools_to_template,
    services,
    start_generation,
    with_engine,
)

bp = Blueprint("vllm", __name__)


def vllm_tokenize(body: dict[str, Any]) -> Response:
    """vLLM ``/tokenize``: ``prompt`` or chat ``messages`` → ``{count, max_model_len, tokens,
    token_strs}``, with the model's own tokenizer and chat template."""
    svc = services()
    tok = vl.vllm_tokenize_request(body, svc.manager.default_model_name())
    with with_engine(tok.model, template_of=tok.chat) as (engine, info):
        if tok.chat is not None:
            fit_tools_to_template(tok.chat, info)
        text = engine.apply_template(tok.chat) if tok.chat is not None else tok.prompt
        pieces = engine.tokenize(text or "", add_special=tok.add_special_tokens,
                                 with_pieces=True)
        max_len = engine.ctx_size
    return jsonify(vl.internal_to_vllm_tokenize(pieces, max_len, tok.return_token_strs))


@bp.post("/detokenize")
def detokenize() -> Response:
    """vLLM ``/detokenize``: ``{model?, tokens}`` → ``{prompt}``."""
    body = json_body()
    tokens = vl.vllm_detokenize_tokens(body)
    model = body.get("model") or services().manager.default_model_name()
    with with_engine(model) as (engine, info):
        return jsonify({"prompt": engine.detokenize(check_token_ids(tokens, info, "tokens"))})


@bp.get("/version")
def version() -> Response:
    """vLLM ``/version``."""
    return jsonify({"version": vl.VLLM_VERSION})


@bp.route("/ping", methods=["GET", "POST"])
def ping() -> Response:
    """vLLM (SageMaker) ``/ping``: 200 with an empty body while the service can take work."""
    services().manager.list_models()  # the store is readable
    return Response(status=200)


def vllm_generate(body: dict[str, Any]) -> Response:
    """vLLM's legacy demo ``/generate``: ``{"text": [prompt + output]}``; streamed as one
    JSON object per line with the cumulative text."""
    svc = services()
    model = body.get("model") or svc.manager.default_model_name()
    req = vl.vllm_generate_to_internal(body, model)
    stream = body.get("stream") is True
    req.stream = stream
    gen = start_generation(req, "/generate")
    prompt = req.prompt if isinstance(req.prompt, str) else ""
    if not stream:
        return jsonify({"text": [prompt + r.reasoning + r.text for r in gen.collect_choices()]})
    converter = vl.VLLMGenerateStream(prompt, req.n)

    def lines() -> Iterator[str]:
        try:
            for event in gen:
                if isinstance(event, Finish):
                    continue
                for obj in converter.process(event):
                    yield ndjson_line(obj)
        except Exception as exc:  # noqa: BLE001 - reported in the stream
            err = as_service_error(exc)
            yield ndjson_line({"error": err.message})

    return stream_response(lines(), "application/x-ndjson", on_close=gen.close,
                           headers={"X-Request-Id": gen.request_id})
