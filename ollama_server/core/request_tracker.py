"""Live tracking of every request: state, tokens so far, time to first token, tokens/s.

The tracker keeps active requests and a bounded list of finished ones, a cancel handle per
request, and notifies observers (metrics) on each transition. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from .errors import RateLimited
from .schemas import RequestState, RequestStatus

Observer = Callable[[str, RequestStatus], None]  # (event name, status)


class RequestTracker:
    """Records requests from arrival to their end; ``get(id)`` serves /api/progress/<id>."""

    def __init__(self, history: int = 200) -> None:
        self._lock = threading.Lock()
        self._active: OrderedDict[str, RequestStatus] = OrderedDict()
        self._cancel: dict[str, threading.Event] = {}
        self._recent: deque[RequestStatus] = deque(maxlen=history)
        self._recent_ids: dict[str, RequestStatus] = {}  # the newest finished one of each id
        self._observers: list[Observer] = []
        self.totals = {"requests": 0, "errors": 0, "prompt_tokens": 0, "generated_tokens": 0}

    def subscribe(self, observer: Observer) -> None:
        """Call ``observer(event, status)`` on start, first_token, finish and refused (over the
        per-key limit) events."""
        self._observers.append(observer)

    def _notify(self, event: str, status: RequestStatus) -> None:
        for observer in self._observers:
            try:
                observer(event, status)
            except Exception:  # noqa: BLE001 - an observer must never break a request
                pass

    def start(self, request_id: str, model: str, dialect: str, *, endpoint: str = "",
              stream: bool = False, max_tokens: int | None = None, caller: str | None = None,
              caller_limit: int = 0) -> threading.Event:
        """Register a request; return its cancel handle.

        With ``caller_limit`` > 0, RateLimited when ``caller`` (an API key's name) already has
        that many requests active; the check and the registration are one step.
        """
        return self.adopt(RequestStatus(id=request_id, model=model, dialect=dialect,
                                        endpoint=endpoint, stream=stream, max_tokens=max_tokens,
                                        caller=caller), caller_limit)

    def adopt(self, status: RequestStatus, caller_limit: int = 0) -> threading.Event:
        """Register ``status`` as it is (start(), or a request another process started)."""
        cancel = threading.Event()
        caller = status.caller
        with self._lock:
            refused = caller is not None and caller_limit > 0 and sum(
                1 for s in self._active.values() if s.caller == caller) >= caller_limit
            if not refused:
                self._active[status.id] = status
                self._cancel[status.id] = cancel
                self.totals["requests"] += 1
        if refused:
            self._notify("refused", status)
            raise RateLimited(f"the API key '{caller}' already has {caller_limit} requests "
                              f"in flight (max_requests_per_key); wait for one to finish")
        self._notify("start", status)
        return cancel

    def mirror(self, request_id: str, **fields: object) -> None:
        """Take values another process measured for an active request (its state, prompt
        size, tokens so far, first token time): a first token time set here counts as the
        request's first token."""
        first = None
        with self._lock:
            status = self._active.get(request_id)
            if status is None:
                return
            if fields.get("first_token_at") is not None and status.first_token_at is None:
                first = status
            for key, value in fields.items():
                setattr(status, key, value)
        if first is not None:
            self._notify("first_token", first)

    def set_state(self, request_id: str, state: RequestState) -> None:
        """Move a request to a non-final state (loading, processing)."""
        with self._lock:
            status = self._active.get(request_id)
            if status is not None and not status.done:
                status.state = state
                if state == RequestState.PROCESSING and status.processing_at is None:
                    status.processing_at = time.monotonic()

    def set_prompt_tokens(self, request_id: str, n: int) -> None:
        """Record the prompt size once the engine reports it."""
        with self._lock:
            status = self._active.get(request_id)
            if status is not None:
                status.prompt_tokens = n

    def add_tokens(self, request_id: str, n: int = 1) -> None:
        """Count generated tokens; the first call marks the time to first token."""
        first = None
        with self._lock:
            status = self._active.get(request_id)
            if status is None:
                return
            if status.first_token_at is None:
                status.first_token_at = time.monotonic()
                first = status
            status.state = RequestState.GENERATING
            status.tokens_generated += n
        if first is not None:
            self._notify("first_token", first)

    def finish(self, request_id: str, *, state: RequestState = RequestState.COMPLETED,
               finish_reason: str | None = None, error: str | None = None,
               prompt_tokens: int | None = None, completion_tokens: int | None = None) -> None:
        """End a request (idempotent): it moves from active to recent."""
        with self._lock:
            status = self._active.pop(request_id, None)
            self._cancel.pop(request_id, None)
            if status is None:
                return
            status.state = state
            status.finished_at = time.monotonic()
            status.finish_reason = finish_reason
            status.error = error
            if prompt_tokens is not None:
                status.prompt_tokens = prompt_tokens
            if completion_tokens is not None:
                status.tokens_generated = completion_tokens
            self.totals["prompt_tokens"] += status.prompt_tokens
            self.totals["generated_tokens"] += status.tokens_generated
            if state == RequestState.FAILED:
                self.totals["errors"] += 1
            if self._recent.maxlen:
                if len(self._recent) == self._recent.maxlen:
                    oldest = self._recent[-1]  # about to drop out of the history
                    if self._recent_ids.get(oldest.id) is oldest:
                        del self._recent_ids[oldest.id]
                self._recent.appendleft(status)
                self._recent_ids[request_id] = status
        self._notify("finish", status)

    def totals_now(self) -> dict[str, int]:
        """The running totals (requests, errors, prompt and generated tokens)."""
        with self._lock:
            return dict(self.totals)

    def cancel(self, request_id: str) -> bool:
        """Ask a running request to stop; False when it is not active."""
        with self._lock:
            event = self._cancel.get(request_id)
        if event is None:
            return False
        event.set()
        return True

    def get(self, request_id: str) -> RequestStatus | None:
        """The status of an active or recently finished request."""
        with self._lock:
            status = self._active.get(request_id)
            if status is not None:
                return status
            return self._recent_ids.get(request_id)

    def active(self) -> list[RequestStatus]:
        """Requests still running, oldest first."""
        with self._lock:
            return list(self._active.values())

    def recent(self, limit: int = 50) -> list[RequestStatus]:
        """Finished requests, newest first."""
        with self._lock:
            return list(self._recent)[:limit]

    def count_active(self, model: str | None = None) -> int:
        """How many requests are in flight (for one model, or all)."""
        with self._lock:
            values: Iterable[RequestStatus] = self._active.values()
            return sum(1 for s in values if model is None or s.model == model)
