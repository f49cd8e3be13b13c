"""The one exception hierarchy of the service.

Everything below the adapters raises these typed errors; each dialect's blueprint maps the type
(never the message text) to its own error body and status code.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a client.

    ``status`` is the HTTP status most dialects use; ``param`` names the offending field.
    """

    status = 500
    kind = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServiceError):
    """The request body is malformed or a field has a bad value."""

    status = 400
    kind = "invalid_request"


class AuthenticationError(ServiceError):
    """Credentials are required and missing or wrong."""

    status = 401
    kind = "authentication"


class ModelNotFound(ServiceError):
    """No model of that name exists in the store."""

    status = 404
    kind = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' not found", param="model")
        self.name = name


class NotFound(ServiceError):
    """A resource other than a model (a request id, a blob) does not exist."""

    status = 404
    kind = "not_found"


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus what must be generated) does not fit the model's context."""

    kind = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, context_length: int, detail: str = "") -> None:
        msg = (f"the prompt is {prompt_tokens} tokens, more than the model's context of "
               f"{context_length} tokens")
        super().__init__(msg + (f" ({detail})" if detail else ""), param="messages")
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class Unsupported(InvalidRequest):
    """The request asks for something this model or engine cannot do."""

    kind = "unsupported"


class PayloadTooLarge(ServiceError):
    """The request body is over the configured limit."""

    status = 413
    kind = "payload_too_large"


class Overloaded(ServiceError):
    """Too many requests are waiting; the caller should retry later.

    ``retry_after``: seconds the caller should wait (the ``Retry-After`` header).
    """

    status = 503
    kind = "overloaded"

    def __init__(self, message: str, *, param: str | None = None,
                 retry_after: int = 1) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class QueueFull(Overloaded):
    """The model's queue of waiting requests is full (``max_queue``); refused at once."""

    # Ollama's own words for this refusal: its clients may look for them.
    MESSAGE = "server busy, please try again.  maximum pending requests exceeded"

    def __init__(self, model: str, retry_after: int = 1) -> None:
        super().__init__(self.MESSAGE, retry_after=retry_after)
        self.model = model


class RateLimited(ServiceError):
    """This API key already has as many requests in flight as it may (per-key limit)."""

    status = 429
    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(ServiceError):
    """The request ran past ``request_timeout``; its generation was stopped."""

    status = 504
    kind = "timeout"


class EngineUnavailable(ServiceError):
    """Something the engine needs is not there right now (an RPC worker is down); retry later."""

    status = 503
    kind = "unavailable"


class EngineFailed(ServiceError):
    """llama-server could not start, crashed, or answered with an error."""

    status = 500
    kind = "engine_failed"


class InsufficientMemory(EngineFailed):
    """The model (with its context) does not fit in the memory the engine can use."""

    kind = "insufficient_memory"


class Cancelled(ServiceError):
    """The request was cancelled (client went away or an operator stopped it)."""

    status = 499
    kind = "cancelled"
