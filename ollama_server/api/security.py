"""Who may call which route: the one table of public routes, and API-key authentication.

Every route of the app is listed in ``ROUTE_ACCESS`` with a decision; a route missing from the
table needs a key (a test fails on any rule of ``app.url_map`` that the table does not name).
Keys come in ``Authorization: Bearer <key>``, ``x-api-key`` or ``api-key``; they are compared
in constant time against every configured key, and the caller is known by the key's *name*
(logs, /api/requests and metrics show the name, never the key). The keys are read from the
configuration object on each request, so a reload of the configuration takes effect at once.

Before any of that, ``refuse_foreign_request`` turns away what a web page in a victim's browser
could send: a ``Host`` that is not one of this machine's names (DNS rebinding, CVE-2024-28224)
and a cross-site request that changes something (an ``Origin`` not in ``cors_origins``).
``hide_worker_endpoints`` keeps the address of each RPC worker (an unauthenticated
ggml-rpc-server) from callers who are not known to be the operator.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket

from flask import Response, g, request

from ..config import Config, ConfigError
from ..core.engine.rpc import is_private_address
from ..core.errors import AuthenticationError, ServiceError
from .common import error_response

log = logging.getLogger(__name__)

PUBLIC = "public"  # anyone, keys or not
KEY = "key"  # a valid key when keys are configured
METRICS = "metrics"  # public unless ``metrics_require_key``

# "METHOD rule" → who may call it. HEAD follows GET; CORS preflights are answered before this.
ROUTE_ACCESS: dict[str, str] = {
    # Liveness and versions: no data, no model work.
    "GET /health": PUBLIC,
    "GET /health/live": PUBLIC,  # liveness and readiness, for balancers and orchestrators
    "GET /health/ready": PUBLIC,
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


# --- where a request comes from: DNS rebinding and cross-site requests -----------------------

# Names a DNS-rebinding page cannot own, as Ollama's allowedHost lists them: ``localhost``,
# this machine's host name, and the local-only top-level domains.
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Browser extensions talk to local model servers from their own origins (Ollama allows them:
# gin-contrib/cors AllowBrowserExtensions); no web page can send such an Origin.
EXTENSION_SCHEMES = ("chrome-extension://", "moz-extension://", "safari-web-extension://",
                     "safari-extension://", "ms-browser-extension://")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # no side effects; a foreign page cannot read them


class Forbidden(ServiceError):
    """The request comes from somewhere this service does not answer (403)."""

    status = 403
    kind = "forbidden"


def origin_allowed(origin: str, patterns: list[str]) -> bool:
    """True when a browser ``Origin`` matches one of the allowed glob patterns."""
    return any(fnmatch.fnmatchcase(origin, pattern) for pattern in patterns)


def host_name(header: str) -> str:
    """The host of a ``Host`` header: no port, no IPv6 brackets, lower case, no final dot."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        header = header.partition(":")[0]
    return header.rstrip(".")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def loopback_bind(bind: str) -> bool:
    """True when the service listens on loopback only (``127.0.0.1``, ``::1``, ``localhost``)."""
    name = host_name(bind) if bind.startswith("[") else bind.strip().lower().rstrip(".")
    ip = _ip(name)
    if ip is not None:
        return ip.is_loopback
    return name == "localhost" or name.endswith(".localhost")


def local_host(name: str) -> bool:
    """True for a host name no rebinding page can be served from: a name of this machine, a
    local-only domain, or an address literal (loopback, private, link-local, unspecified)."""
    if name in ("", "localhost") or name.endswith(LOCAL_SUFFIXES):
        return True
    ip = _ip(name)
    if ip is not None:
        return ip.is_unspecified or is_private_address(name)
    return name == socket.gethostname().lower()


def host_check_applies(config: Config) -> bool:
    """Whether ``Host`` is checked: on a loopback bind, or whenever ``allowed_hosts`` names
    hosts; never with ``*``. A service bound to another address is reached by names and
    addresses the operator chose, so Ollama (and this service) accepts any ``Host`` there."""
    if "*" in config.allowed_hosts:
        return False
    return bool(config.allowed_hosts) or loopback_bind(config.host)


def host_allowed(header: str, config: Config) -> bool:
    """True when a request with this ``Host`` header may be answered."""
    if not host_check_applies(config):
        return True
    name = host_name(header)
    return local_host(name) or any(fnmatch.fnmatchcase(name, pattern.strip().lower())
                                   for pattern in config.allowed_hosts)


def cross_site(origin: str, host: str, config: Config) -> bool:
    """True when ``origin`` is a page of another site than this service and not allowed."""
    if origin in (f"http://{host}", f"https://{host}"):
        return False  # the service's own pages (the dashboard)
    return not (origin.startswith(EXTENSION_SCHEMES) or
                origin_allowed(origin, config.cors_origins))


def _forbidden(message: str) -> Response:
    resp = error_response(Forbidden(message))
    if resp.status_code != Forbidden.status:  # TGI's shape has no 403 of its own
        resp = Response(json.dumps({"error": message, "error_type": "forbidden"}),
                        status=Forbidden.status, mimetype="application/json")
    return resp


def refuse_foreign_request(config: Config) -> Response | None:
    """A 403 in the caller's dialect for a request a web page may have sent on a user's
    behalf, else None.

    A ``Host`` that is not a local name means the browser reached this service through an
    attacker's DNS name (DNS rebinding); an ``Origin`` of another site on a request that is
    not a plain read is a cross-site request the page should not be able to make.
    """
    host = request.headers.get("Host", "")
    if not host_allowed(host, config):
        log.warning("refused %s %s with Host %r from %s (not a local name; see allowed_hosts)",
                    request.method, request.path, host, request.remote_addr)
        return _forbidden(
            f"the Host {host_name(host)!r} is not a name of this service: requests through "
            f"other names are refused (DNS rebinding protection). To reach the service "
            f"through it (a reverse proxy), add it to allowed_hosts "
            f"(OLLAMA_SERVER_ALLOWED_HOSTS)")
    origin = request.headers.get("Origin")
    if origin and request.method not in SAFE_METHODS and cross_site(origin, host, config):
        log.warning("refused %s %s from the web page at %r (not in cors_origins)",
                    request.method, request.path, origin)
        return _forbidden(
            f"requests from web pages at {origin!r} are refused (cross-site request "
            f"protection). To let that site call this service, add it to cors_origins "
            f"(OLLAMA_ORIGINS)")
    return None


# --- RPC worker endpoints ---------------------------------------------------------------------

def may_see_workers(config: Config) -> bool:
    """Whether this caller may learn where the RPC workers are: a caller with a valid key when
    keys are configured; without keys, a caller on this machine (loopback). A worker answers
    anyone who can reach it and runs what it is sent, so its address is the operator's."""
    if config.auth_enabled:
        return g.get("caller") is not None
    ip = _ip(request.remote_addr or "")
    return ip is not None and (ip.is_loopback or (
        ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback))


def worker_alias(index: int) -> str:
    """What callers who may not see an RPC worker's address see instead (1-based)."""
    return f"rpc-worker-{index}"


def hide_worker_endpoints(resp: Response, config: Config, endpoints: list[str]) -> None:
    """Replace each of ``endpoints`` (``host:port``) in a buffered response body by its alias
    (``rpc-worker-1``…) when this caller may not see them.

    One pass over the finished body covers every place an endpoint shows (health, /api/ps,
    the dashboard's data, metric labels, error messages) without each having to remember.
    Streamed bodies are left alone: their errors are raised before the first byte.
    """
    if not endpoints or resp.is_streamed or resp.direct_passthrough or \
            may_see_workers(config):
        return
    body = resp.get_data()
    wanted = {ep.encode(): worker_alias(i).encode() for i, ep in enumerate(endpoints, 1)}
    if not any(ep in body for ep in wanted):
        return
    # Longest first, and never inside a longer address or port ("10.0.0.1:5005" in
    # "110.0.0.1:50052").
    pattern = re.compile(rb"(?<![\w.])(" + b"|".join(
        re.escape(ep) for ep in sorted(wanted, key=len, reverse=True)) + rb")(?![\w.])")
    resp.set_data(pattern.sub(lambda m: wanted[m.group(1)], body))
