"""Ollama API blueprint: generate, chat, embeddings, and the model endpoints (tags, show, ps,
copy, delete, blobs, create, pull, push), plus the original README's ``/api/models``.

The views validate, call the shared run path (``handlers``) and frame NDJSON; every
translation is in ``adapters.ollama``. Store writes (blobs, manifests) are atomic: a temp file,
its digest checked, then renamed; create/copy/delete/pull hold the store's lock so a delete never
removes a blob that a manifest being written is about to use.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from ..adapters import ollama as ol
from ..adapters.fields import get_bool
from ..core.errors import InvalidRequest, NotFound, ServiceError, Unsupported
from ..core.schemas import Finish, InternalRequest
from ..models import registry
from ..models.create import CreatePlan
from ..models.inspection import inspect_model
from ..models.schemas import ModelInfo
from ..models.store import DamagedModel, ModelName, digest_to_hex
from .common import (
    as_service_error,
    json_body,
    ndjson_line,
    register_error_formatter,
    stream_response,
)
from .handlers import (
    Generation,
    Services,
    apply_model_defaults,
    check_token_ids,
    run_embeddings,
    services,
    start_generation,
    with_engine,
)

log = logging.getLogger(__name__)

bp = Blueprint("ollama", __name__)
register_error_formatter("ollama", ol.ollama_error)

NDJSON = "application/x-ndjson"


def ndjson_response(objects: Iterable[dict[str, Any]], on_close: Any = None,
                    headers: dict[str, str] | None = None) -> Response:
    """Stream ``objects`` as NDJSON; an error after the first byte is an ``{"error"}`` line."""

    def frames() -> Iterator[str]:
        try:
            for obj in objects:
                yield ndjson_line(obj)
        except Exception as exc:  # noqa: BLE001 - reported in the stream, status stays 200
            body, _ = ol.ollama_error(as_service_error(exc))
            yield ndjson_line(body)

    return stream_response(frames(), NDJSON, headers=headers, on_close=on_close)


# --- generate / chat -------------------------------------------------------------------------

def _load_or_unload(model: str, info: ModelInfo, req: InternalRequest, chat: bool,
                    svc: Services) -> Response:
    """Ollama's empty request: load the model (``load``) or, with keep_alive 0, unload it."""
    manager = svc.manager
    apply_model_defaults(req, info)
    if req.keep_alive == 0:
        entry = manager.loaded_entry(info.name)
        if entry is not None:
            if entry.in_flight == 0:
                manager.unload(info.name)
            else:
                # Busy: unload when the last request ends instead of cutting it off.
                manager.acquire(info)
                manager.release(info.name, 0)
        return jsonify(ol.load_response(model, chat, unloaded=True))
    manager.acquire(info, req.num_ctx)
    manager.release(info.name, req.keep_alive)
    return jsonify(ol.load_response(model, chat, unloaded=False))


def _prepend_context(req: InternalRequest, context: list[int], svc: Services) -> None:
    """The deprecated ``context`` field: earlier tokens go before this prompt, sent raw."""
    with with_engine(req.model, svc, template_of=req) as (engine, info):
        apply_model_defaults(req, info)
        text = engine.apply_template(req) if req.is_chat else str(req.prompt or "")
        req.prompt = engine.detokenize(check_token_ids(context, info, "context")) + text
        req.messages = None
        req.raw = True


def _context_ids(gen: Generation, conv: ol.OllamaGenerateStream) -> list[int] | None:
    """Token ids of prompt + answer, with the model's tokenizer, for the final ``context``.

    Called while the engine is still held (at the Finish event). The prompt is the text the
    engine built (chat template applied); the answer's ids are the engine's own when it
    reported them (raw prompts), else the answer text tokenized.
    """
    req, engine = gen.req, gen.engine
    try:
        if isinstance(req.prompt, list):
            prompt_ids = list(req.prompt)
        else:
            text = engine.apply_template(req) if req.is_chat else str(req.prompt or "")
            prompt_ids = [int(t) for t in engine.tokenize(text, add_special=True)]
        answer_ids = conv.generated_ids()
        if answer_ids is None:
            answer_ids = [int(t) for t in engine.tokenize(conv.response_text,
                                                          add_special=False)]
        return prompt_ids + answer_ids
    except ServiceError as exc:
        log.warning("no context for request %s: %s", req.request_id, exc.message)
        return None


def _check_think(req: InternalRequest, model: str, info: ModelInfo) -> None:
    """``think`` on (true or a level) for a model that cannot reason: Ollama's 400, which
    clients use to find out whether a model thinks."""
    if req.reasoning is True and "thinking" not in info.capabilities:
        raise Unsupported(f"\"{model}\" does not support thinking")


@bp.post("/api/generate")
def generate() -> Response:
    """Ollama generate: NDJSON by default, one object with ``stream: false``."""
    body = json_body()
    svc = services()
    model = ol.require_model(body, "model")
    info = svc.manager.resolve(model)
    req = ol.ollama_generate_to_internal(body, info.has_chat_template)
    if req.suffix is not None and "insert" not in info.capabilities:
        raise Unsupported(f"\"{model}\" does not support insert")
    _check_think(req, model, info)
    if ol.is_load_request(body, chat=False):
        return _load_or_unload(model, info, req, chat=False, svc=svc)
    if body.get("context"):
        _prepend_context(req, body["context"], svc)
    want_context = not body.get("raw")
    gen = start_generation(req, "/api/generate", svc)
    conv = ol.OllamaGenerateStream(model, gen.started, req.logprobs)

    def objects() -> Iterator[dict[str, Any]]:
        for event in gen:
            if isinstance(event, Finish):
                yield conv.finish(event, _context_ids(gen, conv) if want_context else None)
            else:
                yield from conv.process(event)

    return _answer(gen, conv, objects(), req.stream)


@bp.post("/api/chat")
def chat() -> Response:
    """Ollama chat: NDJSON by default, one object with ``stream: false``."""
    body = json_body()
    svc = services()
    model = ol.require_model(body, "model")
    info = svc.manager.resolve(model)
    req = ol.ollama_chat_to_internal(body)
    _check_think(req, model, info)
    if ol.is_load_request(body, chat=True):
        return _load_or_unload(model, info, req, chat=True, svc=svc)
    gen = start_generation(req, "/api/chat", svc)
    conv = ol.OllamaChatStream(model, gen.started, req.logprobs)

    objects = (obj for event in gen for obj in conv.process(event))
    return _answer(gen, conv, objects, req.stream)


def _answer(gen: Generation, conv: Any, objects: Iterator[dict[str, Any]],
            stream: bool) -> Response:
    """NDJSON of ``objects``, or (``stream: false``) the final object made whole."""
    if stream:
        return ndjson_response(objects, on_close=gen.close,
                               headers={"X-Request-Id": gen.request_id})
    try:
        final = list(objects)[-1]
    finally:
        gen.close()
    return jsonify(conv.whole(final))


# --- embeddings ------------------------------------------------------------------------------

@bp.post("/api/embed")
def embed() -> Response:
    """``{model, embeddings, total_duration, load_duration, prompt_eval_count}``; vectors are
    unit length (cut to ``dimensions`` first when asked)."""
    started = time.monotonic()
    body = json_body()
    model = ol.require_model(body, "model")
    inputs = ol.ollama_embed_inputs(body)
    dims = ol.embed_dimensions(body)
    keep_alive = ol.parse_keep_alive(body.get("keep_alive"))
    if body.get("truncate") is not None and not isinstance(body["truncate"], bool):
        raise InvalidRequest("'truncate' must be a boolean", param="truncate")
    svc = services()
    if not inputs:
        info = svc.manager.resolve(model)
        svc.manager.acquire(info)
        svc.manager.release(info.name, keep_alive)
        return jsonify({"model": model, "embeddings": []})
    vectors, tokens, _, load_s = run_embeddings(model, inputs, "/api/embed", "ollama",
                                                keep_alive, svc,
                                                truncate=body.get("truncate") is not False)
    return jsonify({"model": model, "embeddings": [ol.normalize(v, dims) for v in vectors],
                    "total_duration": int((time.monotonic() - started) * 1e9),
                    "load_duration": int(load_s * 1e9), "prompt_eval_count": tokens})


@bp.post("/api/embeddings")
def embeddings() -> Response:
    """The legacy ``{model, prompt}`` → ``{embedding}`` (an empty prompt gives ``[]``)."""
    body = json_body()
    model = ol.require_model(body, "model")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string", param="prompt")
    keep_alive = ol.parse_keep_alive(body.get("keep_alive"))
    svc = services()
    if not prompt:
        svc.manager.resolve(model)
        return jsonify({"embedding": []})
    vectors, _, _, _ = run_embeddings(model, [prompt], "/api/embeddings", "ollama",
                                      keep_alive, svc, truncate=True)
    return jsonify({"embedding": vectors[0]})


# --- model endpoints -------------------------------------------------------------------------

@bp.get("/")
def root() -> Response:
    """``Ollama is running`` (clients probe this)."""
    return Response("Ollama is running", mimetype="text/plain")


@bp.get("/api/version")
def version() -> Response:
    """The Ollama version whose API this service speaks."""
    return jsonify({"version": ol.OLLAMA_VERSION})


@bp.get("/api/tags")
def tags() -> Response:
    """Every model, as Ollama lists them."""
    return jsonify(ol.tags_body(services().manager.list_models()))


@bp.get("/api/models")
def models() -> Response:
    """The original README's list: each model with its GGUF ``context_size``."""
    return jsonify(ol.models_body(services().manager.list_models()))


@bp.post("/api/show")
def show() -> Response:
    """Model details; ``model_info`` carries the GGUF header (``<arch>.context_length``)."""
    body = json_body()
    name = ol.require_model(body, "model", "name")
    svc = services()
    info = svc.manager.resolve(name)
    extra = inspect_model(info.name, info.digest, svc.config.enable_model_inspection,
                          own_port=svc.config.port)
    return jsonify(ol.show_body(info, extra))


@bp.get("/api/ps")
def ps() -> Response:
    """Loaded models, the one that expires last first."""
    return jsonify(ol.ps_body(services().manager.loaded()))


def _store_name(name: str, svc: Services, what: str) -> ModelName:
    """The store name of an existing model (resolved like any request: case, defaults)."""
    info = svc.manager.resolve(name)
    if info.source != "ollama":
        raise InvalidRequest(f"{what}: '{name}' is a plain GGUF file, not a model in the "
                             f"Ollama store", param="model")
    return ModelName.parse(info.name)


@bp.post("/api/copy")
def copy() -> Response:
    """Copy a model's manifest to a new name (blobs are shared); 200 with no body."""
    body = json_body()
    source = body.get("source")
    destination = body.get("destination")
    if not isinstance(source, str) or not source or not isinstance(destination, str) \
            or not destination:
        raise InvalidRequest("'source' and 'destination' are required", param="source")
    svc = services()
    dst = ModelName.parse(destination)
    with svc.manager.store.lock:
        src = _store_name(source, svc, "copy")
        svc.manager.store.copy(src, dst)
    return Response(status=200)


@bp.delete("/api/delete")
def delete() -> Response:
    """Delete a model: its manifest, and the blobs no other manifest uses; 200, no body."""
    body = json_body()
    name = ol.require_model(body, "model", "name")
    svc = services()
    with svc.manager.store.lock:
        try:
            target = _store_name(name, svc, "delete")
        except DamagedModel:
            target = ModelName.parse(name)  # its manifest is there: deleting it is the fix
        short = target.short
        entry = svc.manager.loaded_entry(short)
        if entry is not None and entry.in_flight == 0:
            svc.manager.unload(short)
        if not svc.manager.store.delete(target):
            raise NotFound(f"model '{name}' not found")
    return Response(status=200)


@bp.route("/api/blobs/<digest>", methods=["HEAD"])
def blob_exists(digest: str) -> Response:
    """200 when the blob is in the store, 404 otherwise."""
    path = services().manager.store.blob_path(digest)
    return Response(status=200 if path.is_file() else 404)


@bp.post("/api/blobs/<digest>")
def blob_upload(digest: str) -> Response:
    """Store the raw body as a blob: 201, or 400 when its sha256 is not ``digest``.

    The body goes to a temp file and is renamed only when its digest matches: a mismatched
    or interrupted upload leaves nothing behind.
    """
    store = services().manager.store
    hex_digest = digest_to_hex(digest)
    if store.blob_path(digest).is_file():
        return Response(status=200)
    # Model files are bigger than any JSON body limit, and Ollama takes blobs of any size.
    # (None would fall back to the app's MAX_CONTENT_LENGTH: Flask reads it that way.)
    request.max_content_length = 1 << 62
    store.write_blob(request.stream, hex_digest)
    return Response(status=201)


# --- create ----------------------------------------------------------------------------------

def _status_answer(body: dict[str, Any], objects: Iterator[dict[str, Any]]) -> Response:
    """Status objects as NDJSON (Ollama's default), or with ``stream: false`` the last one
    once all is done (an error then answers with its status instead)."""
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    if stream:
        return ndjson_response(objects)
    return jsonify(collections.deque(objects, maxlen=1).pop())


@bp.post("/api/create")
def create() -> Response:
    """Create a model from an uploaded GGUF blob (``files``) or another model (``from``), or
    a legacy ``modelfile``; streams status objects unless ``stream: false``."""
    body = json_body()
    svc = services()
    plan = CreatePlan(body, ol.require_model(body, "model", "name"), svc.manager.store,
                      svc.manager.resolve)  # every 400/404 before the first byte
    return _status_answer(body, plan.run())


# --- pull / push (OCI registries) ------------------------------------------------------------

@bp.post("/api/pull")
def pull() -> Response:
    """Pull a model from its registry (Ollama's, or any OCI registry such as a private one):
    ``{model, insecure?, stream?}``; Ollama's progress objects, ending ``success``."""
    body = json_body()
    name = ModelName.parse(ol.require_model(body, "model", "name"))
    insecure = get_bool(body, "insecure")
    svc = services()
    settings = registry.RegistrySettings.from_config(svc.config)
    return _status_answer(body, registry.pull_model(svc.manager.store, name, settings,
                                                    insecure))


@bp.post("/api/push")
def push() -> Response:
    """Push a local model to the registry its name says (``host/namespace/model:tag``; names
    without a host go to the configured ``registry``): ``{model, insecure?, stream?}``."""
    body = json_body()
    model = ol.require_model(body, "model", "name")
    insecure = get_bool(body, "insecure")
    svc = services()
    name = _store_name(model, svc, "push")  # 404 before the first byte when it is not here
    settings = registry.RegistrySettings.from_config(svc.config)
    return _status_answer(body, registry.push_model(svc.manager.store, name, settings,
                                                    insecure))
