"""Who may call which route: the one table of public routes, and API-key authentication.

Every route of the app is listed in ``ROUTE_ACCESS`` with a decision; a route missing from the
table needs a key (a test fails on any rule of ``app.url_map`` that the table does not name).
Keys come in ``Authorization: Bearer <key>``, ``x-api-key`` or ``api-key``; they are compared
in constant time against every configured key, and the caller is known by the key's *name*
(logs, /api/requests and metrics show the name, never the key). The keys are read from the
configuration object on each request, so a reload of the configuration takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from flask import g, request

from ..config import Config, ConfigError
from ..core.errors import AuthenticationError, ServiceError

log = logging.getLogger(__name__)

PUBLIC = "public"  # anyone, keys or not
KEY = "key"  # a valid key when keys are configured
METRICS = "metrics"  # public unless ``metrics_require_key``

# "METHOD rule" → who may call it. HEAD follows GET; CORS preflights are answered before this.
ROUTE_ACCESS: dict[str, str] = {
    # Liveness and versions: no data, no model work.
    "GET /health": PUBLIC,
    "GET /": PUBLIC,  # "Ollama is running"
    "GET /api/version": PUBLIC,
    "GET /version": PUBLIC,
    "GET /ping": PUBLIC,  # vLLM's health probe: an empty 200
    "POST /ping": PUBLIC,
    "GET /metrics": METRICS,
    # The dashboard page holds no data; it asks for the key and sends it with each poll.
    "GET /dashboard": PUBLIC,
    "GET /dashboard/": PUBLIC,
    "GET /dashboard/data": KEY,
    # Everything that runs a model, reads requests or model files, or changes the store.
    "POST /v1/chat/completions": KEY,
    "POST /api/chat/completions": KEY,
    "POST /chat/completions": KEY,
    "POST /v1/completions": KEY,
    "POST /completions": KEY,
    "POST /v1/embeddings": KEY,
    "POST /embeddings": KEY,
    "POST /v1/responses": KEY,
    "GET /v1/models": KEY,
    "GET /v1/models/<path:model_id>": KEY,
    "POST /v1/messages": KEY,
    "POST /v1/messages/count_tokens": KEY,
    "POST /api/generate": KEY,
    "POST /api/chat": KEY,
    "POST /api/embed": KEY,
    "POST /api/embeddings": KEY,
    "GET /api/tags": KEY,
    "GET /api/models": KEY,
    "POST /api/show": KEY,
    "GET /api/ps": KEY,
    "POST /api/copy": KEY,
    "DELETE /api/delete": KEY,
    "POST /api/create": KEY,
    "POST /api/pull": KEY,
    "POST /api/push": KEY,
    "HEAD /api/blobs/<digest>": KEY,
    "POST /api/blobs/<digest>": KEY,
    "GET /api/progress/<request_id>": KEY,
    "GET /api/requests": KEY,
    "POST /": KEY,  # TGI's compat generate
    "POST /generate": KEY,
    "POST /generate_stream": KEY,
    "GET /info": KEY,
    "POST /tokenize": KEY,
    "POST /detokenize": KEY,
}

KEY_HEADERS = ("x-api-key", "api-key")


def route_access(rule: str, method: str, config: Config) -> str:
    """PUBLIC or KEY for one request to ``rule`` (a url_map rule); unknown routes need a key."""
    if method == "OPTIONS":
        return PUBLIC  # Flask's automatic answer: the allowed methods, no data
    access = ROUTE_ACCESS.get(f"{'GET' if method == 'HEAD' else method} {rule}")
    if access is None and method == "HEAD":
        access = ROUTE_ACCESS.get(f"HEAD {rule}")
    if access == METRICS:
        return KEY if config.metrics_require_key else PUBLIC
    return access or KEY


def presented_keys(headers: object) -> list[str]:
    """The keys a request carries, in every form clients send them."""
    found = []
    auth = headers.get("Authorization", "")  # type: ignore[attr-defined]
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        found.append(token.strip())
    for name in KEY_HEADERS:
        value = headers.get(name, "").strip()  # type: ignore[attr-defined]
        if value:
            found.append(value)
    return found


def _digest(key: str) -> bytes:
    # Equal-length digests: the comparison's time says nothing about a key's length.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def caller_for(keys: dict[str, str], presented: list[str]) -> str | None:
    """The name of the configured key among ``presented``, None when none matches.

    Every pair is compared, in constant time, whatever matches first.
    """
    found = None
    for given in presented:
        given_digest = _digest(given)
        for name, key in keys.items():
            if hmac.compare_digest(given_digest, _digest(key)) and found is None:
                found = name
    return found


def check_access(config: Config) -> None:
    """Authenticate the current request when its route needs a key; sets ``g.caller``.

    Raises AuthenticationError (401 in the caller's dialect) for a missing or wrong key.
    """
    g.caller = None
    if not config.auth_enabled:
        return
    rule = request.url_rule.rule if request.url_rule is not None else None
    if rule is None:
        return  # no such route: the 404/405 answer gives nothing away
    presented = presented_keys(request.headers)
    try:
        keys = config.api_key_entries()
    except ConfigError as exc:
        log.error("cannot check API keys: %s", exc)
        raise ServiceError(f"the service cannot read its API keys: {exc}") from None
    caller = caller_for(keys, presented) if presented else None
    if caller is not None:
        g.caller = caller
        return
    if route_access(rule, request.method, config) == PUBLIC:
        return
    if not presented:
        raise AuthenticationError(
            "missing API key: send it as 'Authorization: Bearer <key>' or in the 'x-api-key' "
            "header")
    log.warning("rejected a wrong API key for %s %s from %s", request.method, request.path,
                request.remote_addr)
    raise AuthenticationError("invalid API key: the key sent is not one of this service's "
                              "keys; check it with the service's administrator")
