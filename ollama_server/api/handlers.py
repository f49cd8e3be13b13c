"""What the blueprints call to run a request: ``service.generation`` with what only the HTTP
layer knows, the app's services and the caller (its request id, API key name, and a test of
whether it hung up)."""

from __future__ import annotations

from typing import Any

from flask import current_app, g, has_request_context

from ..core.schemas import InternalRequest
from ..models.schemas import ModelInfo
from ..service import generation
from ..service.fitting import check_token_ids  # noqa: F401 (the blueprints' names)
from ..service.generation import (  # noqa: F401 (the blueprints' names)
    Generation,
    Result,
    Services,
    apply_model_defaults,
    fit_tools_to_template,
)
from .common import client_gone_check


def services() -> Services:
    """The Services of the current Flask app."""
    return current_app.extensions["ollama_server"]


def caller() -> generation.Caller:
    """The current request's caller (nobody outside a request)."""
    if not has_request_context():
        return generation.NOBODY
    key = g.get("caller")
    return generation.Caller(request_id=g.get("request_id"), key_name=key,
                             priority=services().config.key_priority(key),
                             gone=client_gone_check())


def start_generation(req: InternalRequest, endpoint: str, svc: Services | None = None
                     ) -> Generation:
    """``generation.start_generation`` for the current request."""
    return generation.start_generation(req, endpoint, svc or services(), caller())


def run_embeddings(model: str, inputs: list[Any], endpoint: str, dialect: str,
                   keep_alive: float | None = None, svc: Services | None = None,
                   truncate: bool = False) -> tuple[list[list[float]], int, ModelInfo, float]:
    """``generation.run_embeddings`` for the current request."""
    return generation.run_embeddings(model, inputs, endpoint, dialect, svc or services(),
                                     keep_alive, truncate, caller())


def with_engine(model: str, svc: Services | None = None, num_ctx: int | None = None,
                template_of: InternalRequest | None = None) -> Any:
    """``with with_engine(name) as (engine, info):`` (``generation.with_engine``)."""
    return generation.with_engine(model, svc or services(), num_ctx, template_of)
