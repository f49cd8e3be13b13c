"""The Flask app factory: blueprints, request ids, auth, and app-level error handling."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from ..config import Config, ConfigSource
from ..core.errors import (
    InvalidRequest,
    NotFound,
    ServiceError,
)
from ..core.request_tracker import RequestTracker
from ..logs import isolate_request_context, request_id_var
from ..metrics import ServiceMetrics
from ..models.manager import ModelManager
from ..reload import ConfigReloader
from . import anthropic, dashboard, monitoring, ollama, openai, responses, tgi, vllm
from .common import as_service_error, body_too_large, error_response
from .handlers import Services
from .security import (
    check_access,
    hide_worker_endpoints,
    origin_allowed,
    refuse_foreign_request,
)

log = logging.getLogger(__name__)

# One blueprint per dialect, plus monitoring and the dashboard. Order matters only for paths
# two dialects share, which those modules resolve themselves (API-REFERENCE.md §8).
BLUEPRINTS = (openai.bp, monitoring.bp, ollama.bp, anthropic.bp, vllm.bp, tgi.bp, dashboard.bp,
              responses.bp)


def create_app(config: Config, manager: ModelManager | None = None,
               tracker: RequestTracker | None = None,
               source: ConfigSource | None = None, metrics: Any = None) -> Flask:
    """Build the app; ``manager``, ``tracker`` and ``metrics`` may be injected (tests, and a
    worker in front of the engine pool process: shared_pool.py). With ``source`` (where
    ``config`` was read from) the app can reload its configuration (reload.py)."""
    app = Flask(__name__, static_folder=None)  # no static files: not a route to guard
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_body_mb * 1024 * 1024)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    svc = Services(config=config, manager=manager or ModelManager(config),
                   tracker=tracker or RequestTracker())
    app.extensions["ollama_server"] = svc
    # Per-app registry: tests build several apps in one process.
    app.extensions["ollama_server_metrics"] = metrics or ServiceMetrics(svc.tracker, svc.manager)
    app.extensions["ollama_server_reloader"] = ConfigReloader(app, source)
    preload = getattr(svc.manager, "preload", None)  # in the process that owns the engines
    if preload is not None:
        preload()
    # Request ids in logs: one context per request, its streamed body included.
    app.wsgi_app = isolate_request_context(app.wsgi_app)  # type: ignore[method-assign]
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)

    @app.before_request
    def _start() -> Response | None:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        g.request_id = rid
        request_id_var.set(rid)
        # What a web page may have sent on a user's behalf (DNS rebinding, cross-site
        # requests) is refused before anything else, preflights included.
        refused = refuse_foreign_request(app.extensions["ollama_server"].config)
        if refused is not None:
            return refused
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return Response(status=204)  # a CORS preflight: headers added in _finish
        # Every route is in security.ROUTE_ACCESS or needs a key. The services' configuration
        # is read per request: a reload that replaces it applies to the next request.
        check_access(app.extensions["ollama_server"].config)
        return None

    @app.after_request
    def _finish(resp: Response) -> Response:
        resp.headers.setdefault("X-Request-Id", g.get("request_id", ""))
        served_by = app.extensions["ollama_server"].config.instance_name
        if served_by:  # which instance answered, behind a balancer (issue 21)
            resp.headers["X-Served-By"] = served_by
        if request.headers.get("anthropic-version") or request.path.startswith("/v1/messages"):
            # The anthropic SDK reads ``request-id`` (``message._request_id``), on every route
            # it calls (messages, count_tokens, models) and on errors.
            resp.headers.setdefault("request-id", g.get("request_id", ""))
        origin = request.headers.get("Origin")
        if origin and origin_allowed(origin, config.cors_origins):
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
            resp.headers.add("Vary", "Origin")
            if request.method == "OPTIONS":
                resp.headers["Access-Control-Allow-Methods"] = \
                    "GET, POST, PUT, DELETE, HEAD, OPTIONS"
                resp.headers["Access-Control-Allow-Headers"] = request.headers.get(
                    "Access-Control-Request-Headers", "Authorization, Content-Type")
                resp.headers["Access-Control-Max-Age"] = "600"
        svc = app.extensions["ollama_server"]
        hide_worker_endpoints(resp, svc.config, svc.manager.rpc_workers())
        return resp

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError) -> Response:
        if exc.status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc.message)
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        # Unmatched URLs, 405s, bodies too large: shaped for the dialect of the path.
        code = exc.code or 500
        if code == 404:
            err: ServiceError = NotFound(f"{request.method} {request.path} is not a route of "
                                         f"this service")
        elif code == 405:
            err = InvalidRequest(f"method {request.method} is not allowed on {request.path}")
            err.status = 405
        elif code == 413:
            err = body_too_large(config.max_body_mb)
        elif code == 400:
            err = InvalidRequest(exc.description or "bad request")
        else:
            err = ServiceError(exc.description or exc.name)
            err.status = code
        # An unknown /v1 route asked by the anthropic SDK gets Anthropic's error shape.
        anthropic = code == 404 and request.path.startswith("/v1/") and \
            bool(request.headers.get("anthropic-version"))
        resp = error_response(err, "anthropic" if anthropic else None)
        valid = getattr(exc, "valid_methods", None)
        if code == 405 and valid:
            resp.headers["Allow"] = ", ".join(sorted(valid))  # RFC 9110 asks for it
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        return error_response(as_service_error(exc))

    return app
