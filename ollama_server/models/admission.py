"""Admission to a model's slots: at most ``slots`` requests run on a model at once, up to
``max_queue`` more wait for a slot, and any further request is refused at once (QueueFull: the
dialect's overload answer with ``Retry-After``).

Waiting requests are served by priority (the priority class of the caller's API key:
``api_keys`` entries with ``priority``; 0 without one), in arrival order within a class. A
waiting request gains one class every ``AGING_S`` seconds, so a low class is served after a
bounded wait however many higher ones arrive (no starvation). ``positions()`` tells each
waiting request its place in line (/api/progress, the dashboard).

A waiting request leaves the queue when its client goes away (``abandoned()`` turns true), and
gives up with QueueFull when no slot frees within ``timeout``. The limits are passed on every
call (the manager reads them from the live configuration), so a reload applies them at once.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.errors import Cancelled, QueueFull

POLL_S = 0.25  # how often a waiting request checks whether its client is still there
AGING_S = 10.0  # a waiting request gains one priority class per this many seconds


@dataclass(eq=False)
class _Waiter:
    ticket: int
    priority: int
    since: float
    request_id: str | None

    def rank(self, now: float) -> tuple[float, int]:
        """Higher first: the class plus what waiting earned, then the older ticket."""
        return (self.priority + (now - self.since) / AGING_S, -self.ticket)


@dataclass
class _ModelQueue:
    busy: int = 0
    waiting: list[_Waiter] = field(default_factory=list)  # in arrival order
    refused: int = 0
    abandoned: int = 0
    admitted: int = 0
    wait_s: float = 0.0  # total seconds admitted requests waited


class SlotQueue:
    """Per-model slots and a bounded FIFO queue in front of them. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._models: dict[str, _ModelQueue] = {}
        self._tickets = itertools.count()
        self.clock = clock

    def _queue(self, name: str) -> _ModelQueue:
        return self._models.setdefault(name, _ModelQueue())

    def enter(self, name: str, slots: int, max_queue: int, timeout: float,
              abandoned: Callable[[], bool] | None = None, priority: int = 0,
              request_id: str | None = None) -> float:
        """Take a slot of ``name``, waiting in line when all are busy; the seconds waited.

        QueueFull when ``max_queue`` requests already wait (or none may) or the wait passes
        ``timeout``; Cancelled when ``abandoned()`` turns true while waiting. ``priority``
        orders the line (higher first); ``request_id`` names the request in ``positions()``.
        """
        start = self.clock()
        with self._cond:
            q = self._queue(name)
            if q.busy < slots and not q.waiting:
                q.busy += 1
                q.admitted += 1
                return 0.0
            if len(q.waiting) >= max_queue:
                q.refused += 1
                raise QueueFull(name, self._retry_after(q, slots))
            me = _Waiter(next(self._tickets), priority, start, request_id)
            q.waiting.append(me)
            try:
                while not (q.busy < slots and self._head(q) is me):
                    if abandoned is not None and abandoned():
                        q.abandoned += 1
                        raise Cancelled("the client went away while the request was queued")
                    if self.clock() - start > timeout:
                        q.refused += 1
                        raise QueueFull(name, self._retry_after(q, slots))
                    self._cond.wait(POLL_S)
                q.busy += 1
                q.admitted += 1
            finally:
                q.waiting.remove(me)
                self._cond.notify_all()  # the next in line may now be at the head
            waited = self.clock() - start
            q.wait_s += waited
            return waited

    def leave(self, name: str) -> None:
        """Give a slot of ``name`` back."""
        with self._cond:
            q = self._queue(name)
            q.busy = max(0, q.busy - 1)
            self._cond.notify_all()

    def _head(self, q: _ModelQueue) -> _Waiter:
        now = self.clock()
        return max(q.waiting, key=lambda w: w.rank(now))

    def positions(self) -> dict[str, dict[str, int | str]]:
        """Each waiting request (by request id): its model, its place in that model's line
        (1: next to get a slot) and how many wait in all."""
        now = self.clock()
        out: dict[str, dict[str, int | str]] = {}
        with self._cond:
            for name, q in self._models.items():
                line = sorted(q.waiting, key=lambda w: w.rank(now), reverse=True)
                for place, waiter in enumerate(line, 1):
                    if waiter.request_id is not None:
                        out[waiter.request_id] = {"model": name, "position": place,
                                                  "waiting": len(line)}
        return out

    @staticmethod
    def _retry_after(q: _ModelQueue, slots: int) -> int:
        # A rough hint: one second per round of the slots that the queue ahead needs.
        return max(1, math.ceil((len(q.waiting) + 1) / max(1, slots)))

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per model: busy slots, waiting requests, and counts of refused, abandoned and
        admitted requests (with their total wait) since the start."""
        with self._cond:
            return {name: {"busy": q.busy, "waiting": len(q.waiting), "refused": q.refused,
                           "abandoned": q.abandoned, "admitted": q.admitted,
                           "wait_s": round(q.wait_s, 3)}
                    for name, q in sorted(self._models.items())}
