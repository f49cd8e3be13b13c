"""One thread relays every stream's tokens (after the first) from the engines to the clients.

With a thread per stream, each token wakes its own thread: a futex wake-up, a context switch
and a fight for the GIL per token. At 64 streams that was about a third of the relay's CPU
(``bench/bench_relay.py``: 60-68 µs per token, 45-48 with this thread; README, Performance),
and the ratio to the engine's own rate fell to 0.48-0.63 (0.80-0.83 here).

The request's thread does everything up to the first token's frame (validation, the engine
request, errors with their status, the frames before the first token) and sends it; then it
hands the rest of the stream to the relay thread and waits. The relay
thread waits on every engine and client socket in one ``epoll`` and runs each stream's frame
generator, unchanged, in a greenlet of its own: where the generator would block reading the
engine (``wait_readable``), its greenlet yields to the loop, which resumes it when the socket
has data. One wake-up of the loop serves every stream that has a token ready.

Contract:
- ``Relay.run_stream(frames, sock, chunked)`` (in the request thread): writes what ``frames``
  yields to ``sock`` (HTTP/1.1 chunk framing when ``chunked``) from the relay thread and
  returns when ``frames`` is exhausted; raises the ``OSError`` of a client that went away,
  after closing ``frames`` (which cancels the generation upstream).
- A stream is handed over only once its producer has called ``output_started()`` (in the
  request's context, when its first token comes from the engine): the first token is sent
  by the request thread, without a hand-over in the way.
- Code that runs inside a relayed generator and must block on anything but a socket read
  runs it with ``Relay.call`` (done by the request's own thread, which is idle meanwhile);
  code that cannot be relayed at all calls ``pin_to_thread()`` before the first frame.
- Nothing else changes for the generators: a stream relayed or not yields the same frames.
"""

from __future__ import annotations

import contextvars
import logging
import os
import queue
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import greenlet

log = logging.getLogger(__name__)

_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT

# Where the stream being set up in this context stands: "setup" until its first output,
# "ready" from then on, "pinned" when it must stay on its request thread.
_stage: contextvars.ContextVar[str] = contextvars.ContextVar("relay_stage", default="setup")
_DONE = object()


def pin_to_thread() -> None:
    """Keep the stream being set up in this context on its request thread (its generator
    blocks on something the relay thread cannot wait for, e.g. other threads' queue)."""
    _stage.set("pinned")


def pinned() -> bool:
    """Whether ``pin_to_thread`` was called in this context."""
    return _stage.get() == "pinned"


def output_started() -> None:
    """Mark, in the stream's context, that its first output (a token) is on its way.

    The frames up to the one that carries it are sent by the request thread itself, so the
    first token never waits for a hand-over (an eventfd write and a thread switch, 0.1-0.2 ms
    of time to first token on a 2-core machine: bench/bench_request_cost.py); the relay
    thread takes the stream after it. A stream that never marks it stays on its thread."""
    if _stage.get() == "setup":
        _stage.set("ready")


def relayable() -> bool:
    """Whether the stream of this context may be handed to the relay thread now."""
    return _stage.get() == "ready"


class _Job:
    __slots__ = ("frames", "sock", "chunked", "ctx", "calls", "error")

    def __init__(self, frames: Iterator[bytes | str], sock: socket.socket, chunked: bool,
                 ctx: contextvars.Context) -> None:
        self.frames = frames
        self.sock = sock
        self.chunked = chunked
        self.ctx = ctx
        self.calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.error: BaseException | None = None


class Relay:
    """The relay thread of this process (started on first use, after gunicorn's fork)."""

    SCAN_S = 0.5  # how often waits with a timeout are checked for expiry

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._hub: greenlet.greenlet | None = None
        self._inbox: deque[Any] = deque()
        self._efd = -1
        self._ep: select.epoll | None = None
        self._waiting: dict[int, greenlet.greenlet] = {}  # fd → the greenlet waiting on it
        self._watched: set[int] = set()  # engine sockets, edge-triggered for their life
        self._ready: dict[int, int] = {}  # watched fd → events that came while unawaited
        self._deadlines: dict[greenlet.greenlet, float] = {}  # of waits with a timeout
        self._jobs: dict[greenlet.greenlet, _Job] = {}
        self.streams = 0  # streams handed over so far
        # Called on the request thread as each stream is handed over (a worker of several
        # tells the engine pool, whose /metrics counts every worker's).
        self.on_stream: Callable[[], None] | None = None

    # --- the request thread's side -------------------------------------------------------

    def run_stream(self, frames: Iterator[bytes | str], sock: socket.socket,
                   chunked: bool) -> None:
        """Relay the rest of ``frames`` to ``sock`` from the relay thread; return when done."""
        job = _Job(frames, sock, chunked, contextvars.copy_context())
        if self.on_stream is not None:
            self.on_stream()
        self._post(job)
        while True:
            item = job.calls.get()
            if item is _DONE:
                break
            fn, args, waiter = item  # a blocking call asked for by the relayed generator
            try:
                result: tuple[Any, BaseException | None] = (fn(*args), None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the generator
                result = (None, exc)
            self._post((waiter, result))
        if job.error is not None:
            raise job.error

    def in_relay(self) -> bool:
        """Whether the caller is a relayed generator (running on the relay thread)."""
        return threading.current_thread() is self._thread and \
            greenlet.getcurrent() is not self._hub

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` run by the stream's request thread; from a relayed generator only."""
        me = greenlet.getcurrent()
        self._jobs[me].calls.put((fn, args, me))
        result, exc = self._to_hub()
        if exc is not None:
            raise exc
        return result

    def _post(self, item: Any) -> None:
        self._start()
        self._inbox.append(item)
        os.eventfd_write(self._efd, 1)

    def _start(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._ep = select.epoll()
            self._ep.register(self._efd, _EPOLLIN)
            self._waiting.clear()
            self._watched.clear()
            self._ready.clear()
            self._deadlines.clear()
            self._thread = threading.Thread(target=self._loop, name="relay", daemon=True)
            self._thread.start()
            self._pid = os.getpid()

    # --- the relay thread ----------------------------------------------------------------

    def _loop(self) -> None:
        self._hub = greenlet.getcurrent()
        ep, efd, waiting, watched, ready = (self._ep, self._efd, self._waiting, self._watched,
                                            self._ready)
        assert ep is not None
        scan_at = 0.0
        while True:
            try:
                for fd, events in ep.poll(self.SCAN_S if self._deadlines else -1):
                    if fd == efd:
                        os.eventfd_read(efd)
                        self._take_inbox()
                        continue
                    runner = waiting.pop(fd, None)
                    if runner is not None:
                        runner.switch(events)
                    elif fd in watched:
                        # Its reader is busy: it finds them when it next waits.
                        ready[fd] = ready.get(fd, 0) | events
                if self._deadlines and time.monotonic() >= scan_at:
                    scan_at = time.monotonic() + self.SCAN_S
                    self._expire()
            except Exception:  # noqa: BLE001 - the loop serves every stream: keep it going
                log.exception("relay loop error")

    def _take_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, _Job):
                runner = greenlet.greenlet(self._drive)
                runner.gr_context = item.ctx
                self._jobs[runner] = item
                self.streams += 1
                runner.switch(item)
            else:
                waiter, result = item
                waiter.switch(result)

    def _expire(self) -> None:
        """Wake the waits past their deadline with TimeoutError (``_suspend`` cleans up)."""
        now = time.monotonic()
        for runner, deadline in list(self._deadlines.items()):
            if deadline <= now and runner in self._deadlines:
                runner.throw(TimeoutError("timed out"))

    def _to_hub(self) -> Any:
        assert self._hub is not None
        return self._hub.switch()

    def _suspend(self, fd: int, timeout: float | None) -> int:
        me = greenlet.getcurrent()
        self._waiting[fd] = me
        if timeout is not None:
            self._deadlines[me] = time.monotonic() + timeout
        try:
            return self._to_hub()
        finally:
            self._deadlines.pop(me, None)
            if self._waiting.get(fd) is me:
                del self._waiting[fd]

    def watch(self, sock: socket.socket) -> None:
        """Watch an engine socket from now until ``unwatch`` (edge-triggered: its reader
        reads until a short read or EAGAIN before it waits)."""
        fd = sock.fileno()
        assert self._ep is not None
        self._ep.register(fd, _EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._watched.add(fd)

    def unwatch(self, sock: socket.socket) -> None:
        """Stop watching ``sock``; before it is closed (its number may be reused)."""
        fd = sock.fileno()
        if fd in self._watched:
            self._watched.discard(fd)
            self._ready.pop(fd, None)
            try:
                assert self._ep is not None
                self._ep.unregister(fd)
            except OSError:
                pass

    def wait_readable(self, sock: socket.socket, timeout: float | None) -> int:
        """Wait, inside a relayed generator, until the watched ``sock`` has new data
        (``TimeoutError`` after ``timeout`` seconds); the epoll events that came."""
        fd = sock.fileno()
        events = self._ready.pop(fd, 0)
        return events or self._suspend(fd, timeout)

    def _wait_writable(self, fd: int) -> None:
        ep = self._ep
        assert ep is not None
        try:
            ep.modify(fd, _EPOLLOUT | select.EPOLLONESHOT)
        except FileNotFoundError:
            ep.register(fd, _EPOLLOUT | select.EPOLLONESHOT)
        self._suspend(fd, None)

    def _drive(self, job: _Job) -> None:
        sock, chunked = job.sock, job.chunked
        fd = sock.fileno()
        send = sock.send
        try:
            for frame in job.frames:
                if not frame:
                    continue
                if isinstance(frame, str):
                    frame = frame.encode()
                data = b"%X\r\n%s\r\n" % (len(frame), frame) if chunked else frame
                while True:
                    try:
                        sent = send(data, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    if sent == len(data):
                        break
                    data = data[sent:]
                    self._wait_writable(fd)
        except BaseException as exc:  # noqa: BLE001 - raised again in the request thread
            job.error = exc
            try:
                close = getattr(job.frames, "close", None)
                if close is not None:
                    close()
            except Exception:  # noqa: BLE001 - the client is gone either way
                log.exception("error while closing a relayed stream")
        finally:
            del self._jobs[greenlet.getcurrent()]
            job.calls.put(_DONE)


RELAY = Relay()
