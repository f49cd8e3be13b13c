"""HTTP helpers shared by every blueprint: body parsing, stream framing, and error shaping.

Each dialect registers one error formatter; app-level handlers (unmatched URLs, 405s, bodies
too large or not JSON) and mid-stream failures pick the formatter by the request's path.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, current_app, g, has_request_context, request

from ..core.errors import InvalidRequest, PayloadTooLarge, ServiceError
from ..core.jsonio import dumps_compact
from ..core.relay import RELAY, relayable
from .validation import parse_json_body

log = logging.getLogger(__name__)

# dialect → (exception → (body, status))
ErrorFormatter = Callable[[ServiceError], tuple[Any, int]]
ERROR_FORMATTERS: dict[str, ErrorFormatter] = {}

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def register_error_formatter(dialect: str, formatter: ErrorFormatter) -> None:
    """Make ``formatter`` shape the errors of ``dialect``."""
    ERROR_FORMATTERS[dialect] = formatter


# OpenAI routes outside /v1/ (clients that leave the /v1 out of their base URL, and Open WebUI's
# /api/chat/completions): their errors are OpenAI's, not Ollama's.
OPENAI_ALIASES = frozenset({"/chat/completions", "/completions", "/embeddings",
                            "/api/chat/completions"})


def dialect_for_request(path: str | None = None, method: str | None = None,
                        headers: Any = None) -> str:
    """Which API a request belongs to, from its path (and a few headers) alone."""
    path = path if path is not None else request.path
    method = method or request.method
    headers = headers if headers is not None else request.headers
    if path.startswith("/v1/messages") or (
            path.startswith("/v1/models") and headers.get("anthropic-version")):
        return "anthropic"
    if path in OPENAI_ALIASES:
        return "openai"
    if path.startswith("/api/"):
        return "ollama"
    if path in ("/generate", "/generate_stream", "/info") or (path == "/" and method == "POST"):
        return "tgi"
    if path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/version"):
        return "openai"
    return "ollama"


def body_too_large(max_body_mb: float) -> PayloadTooLarge:
    """The error of a body over ``max_body_mb`` (the service's and its balancer's)."""
    return PayloadTooLarge(f"the request body is larger than the limit of {max_body_mb:g} MB "
                           f"(max_body_mb)")


def error_response(exc: ServiceError, dialect: str | None = None) -> Response:
    """The error body and status of ``exc`` in the dialect of the current request."""
    dialect = dialect or dialect_for_request()
    formatter = ERROR_FORMATTERS.get(dialect) or ERROR_FORMATTERS.get("openai")
    if formatter is None:
        body, status = {"error": exc.message}, exc.status
    else:
        body, status = formatter(exc)
    if dialect == "anthropic" and has_request_context() and g.get("request_id"):
        body["request_id"] = g.request_id  # Anthropic's error bodies carry it
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    if status >= 500:
        resp.headers["x-should-retry"] = "false" if status == 500 else "true"
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="ollama-server"'
    return resp


def json_body() -> dict[str, Any]:
    """The request body as a JSON object; InvalidRequest with a clear message otherwise."""
    raw = request.get_data(cache=True)
    if not raw or not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    body = parse_json_body(raw, current_app.extensions["ollama_server"].config.max_json_depth)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def client_gone_check() -> Callable[[], bool]:
    """A cheap test, usable while the request waits, of whether its client hung up.

    The request body has been read, so a readable socket that yields no bytes has been
    closed by the client. Without a socket (the Flask test client) it is always False.
    """
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # reset by the peer, or already closed
            return True

    return gone


# Characters that str.splitlines() (and so httpx's iter_lines(), which the ollama client reads
# NDJSON with) takes for line ends; JSON leaves them raw unless escaped (control characters
# below 0x20 are always escaped). U+0085, U+2028, U+2029 in UTF-8:
_LINE_BREAKERS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                  (b"\xe2\x80\xa9", b"\\u2029"))


def dumpb(obj: Any) -> bytes:
    """Compact UTF-8 JSON for frames, on one line for every line splitter.

    orjson: about 20 times faster than the standard encoder on a stream chunk (a frame per
    token makes this the relay's hottest call). What it cannot encode (an integer beyond 64
    bits) goes through the standard one.
    """
    out = dumps_compact(obj)
    if b"\xc2\x85" in out or b"\xe2\x80" in out:
        for raw, escaped in _LINE_BREAKERS:
            out = out.replace(raw, escaped)
    return out


def dumps(obj: Any) -> str:
    """``dumpb`` as text."""
    return dumpb(obj).decode()


def sse_data(obj: Any) -> bytes:
    """One SSE ``data:`` frame."""
    return b"data: " + dumpb(obj) + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    """One SSE frame with an ``event:`` line."""
    return b"event: " + name.encode() + b"\ndata: " + dumpb(obj) + b"\n\n"


def ndjson_line(obj: Any) -> bytes:
    """One NDJSON line."""
    return dumpb(obj) + b"\n"


def _relay_target() -> tuple[socket.socket, bool] | None:
    """The client socket and its chunk framing when this request's stream may be handed to
    the relay thread (core/relay.py) after its first token: served by gunicorn over plain
    TCP, and ``relay_thread`` on. gunicorn frames a body of unknown length in chunks for
    HTTP/1.1 clients (``Response.is_chunked``); the relay frames it the same way."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None or isinstance(sock, ssl.SSLSocket) or request.method == "HEAD" \
            or not current_app.extensions["ollama_server"].config.relay_thread:
        return None
    return sock, request.environ.get("SERVER_PROTOCOL", "HTTP/1.0") != "HTTP/1.0"


def stream_response(frames: Iterable[str | bytes], mimetype: str,
                    headers: dict[str, str] | None = None,
                    on_close: Callable[[], None] | None = None) -> Response:
    """A streamed response over ``frames``; ``on_close`` runs however the stream ends.

    The request's thread sends the frames up to the first token's (and with the first, the
    headers); the rest goes through the relay thread where it can (``_relay_target``, and
    ``core.relay.output_started``), frame for frame the same."""
    target = _relay_target()

    def generate() -> Iterator[str | bytes]:
        try:
            rest = iter(frames)
            for frame in rest:
                yield frame
                if frame and target is not None and relayable():
                    RELAY.run_stream(rest, *target)
                    return
        finally:
            if on_close is not None:
                on_close()

    resp = Response(generate(), mimetype=mimetype)
    resp.headers.update(STREAM_HEADERS)
    if headers:
        resp.headers.update(headers)
    return resp


def as_service_error(exc: BaseException) -> ServiceError:
    """Any exception as a ServiceError (unexpected ones become a 500 with their type)."""
    if isinstance(exc, ServiceError):
        return exc
    log.exception("unexpected error", exc_info=exc)
    return ServiceError(f"internal error: {type(exc).__name__}: {exc}")
