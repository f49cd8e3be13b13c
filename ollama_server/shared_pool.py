"""Several worker processes in front of one engine pool (the ``workers`` setting).

gunicorn's master starts the **pool process** before its workers. The pool builds the service
as a single worker would (``create_app``: catalogue, ``EnginePool``, ``RequestTracker``,
``ServiceMetrics``, ``ConfigReloader``) but serves no HTTP: it answers its workers on a Unix
socket in a folder only this user can open. The llama-server engines are its children.

Each **worker** builds its app with ``RemoteManager``, ``SharedTracker`` and ``RemoteMetrics``
in place of the in-process pieces. It resolves model names and reads the store itself, and asks
the pool for:

- **an engine**: ``acquire`` takes one of the model's slots (admission is the pool's, so
  ``parallel`` and ``max_queue`` hold across workers), loads the model if needed and answers
  with the engine's port; the worker then streams from the engine itself, with its own relay
  thread. The lease *is* the connection: ``release`` ends it, and so does the worker's death
  (the kernel closes its socket), so a worker killed with ``kill -9`` gives its slots back.
- **one view of the requests**: a request's start travels with its acquire (or is a call of
  its own where a per-key limit must be checked across workers); the pool sets its queued,
  loading and processing states itself, its end is sent as it happens, and its first token time
  and token count every ``FLUSH_S``. /api/progress, /api/requests, the dashboard and /metrics
  read the pool's tracker (a request of another worker is at most ``FLUSH_S`` behind). A
  cancel goes to the worker that runs the request, over that worker's channel.

Messages are Python objects on ``multiprocessing.connection`` (length-prefixed pickles). None
is sent per token: a stream costs the pool one round trip before its first token (acquire)
and, after it, a release and a note (its end) besides the periodic counts (docs/performance.adoc,
"Several worker processes", has what the messages cost).

Why one module of about 850 lines: it is both ends of one protocol (the worker's
``PoolClient``, ``RemoteManager``, ``SharedTracker``, ``RemoteMetrics``; the pool's
``PoolServer`` and ``PoolProcess``): every message one side sends, the other reads, and a change
to one is a change to both.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from .config import Config, ConfigSource
from .core.engine import EngineSettings
from .core.engine.report import LoadReport
from .core.engine.transport import EngineClient
from .core.errors import Cancelled, EngineFailed, EngineUnavailable
from .core.relay import RELAY
from .core.request_tracker import RequestTracker
from .core.schemas import RequestState, RequestStatus
from .gpu import quiet_no_gpu
from .models.catalogue import ModelCatalogue
from .models.pool import EngineRules, LoadedModel
from .models.schemas import ModelInfo
from .models.store import OllamaStore

log = logging.getLogger(__name__)

ADDRESS_ENV = "OLLAMA_SERVER_POOL_SOCKET"  # set by the master for its workers
PID_ENV = "OLLAMA_SERVER_POOL_PID"
FLUSH_S = 0.25  # how often a worker sends the token counts of its running requests
POLL_S = 0.25  # how often a worker waiting for a slot checks that its client is still there
QUERY_TIMEOUT_S = 1.0  # how long the pool waits for a worker's fresh view of its request
IDLE_CONNECTIONS = 64  # connections a worker keeps open to the pool between calls
RECONNECT_S = 0.5  # how often a worker whose pool died tries to register with the next


def resolve_workers(setting: str) -> int:
    """The number of worker processes for the ``workers`` setting (``auto``: one per core
    this process may run on)."""
    if setting == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, int(setting))


# --- errors cross as their class and state -------------------------------------------------

def _pack_error(exc: BaseException) -> tuple[type, tuple, dict]:
    return type(exc), exc.args, dict(getattr(exc, "__dict__", {}))


def _unpack_error(packed: tuple[type, tuple, dict]) -> BaseException:
    cls, args, state = packed
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


# --- what a worker sees of an engine --------------------------------------------------------

@dataclass
class EngineView:
    """A running engine as the pool describes it to a worker (for /api/ps, /health)."""

    name: str
    state: Any
    pid: int | None
    port: int | None
    restarts: int
    ctx_size: int
    settings: EngineSettings | None
    prompt_opens_think: bool
    report: LoadReport = field(default_factory=LoadReport)

    @classmethod
    def of(cls, engine: Any) -> EngineView:
        return cls(name=engine.name, state=getattr(engine, "state", None),
                   pid=getattr(engine, "pid", None), port=engine.port,
                   restarts=getattr(engine, "restarts", 0), ctx_size=engine.ctx_size,
                   settings=getattr(engine, "settings", None),
                   prompt_opens_think=bool(getattr(engine, "prompt_opens_think", False)),
                   report=getattr(engine, "report", None) or LoadReport())


class RemoteEngine(EngineClient):
    """An engine of the pool, called by a worker directly on its port (EngineClient's
    requests); a failure is judged by the pool, which owns the process."""

    def __init__(self, view: EngineView, client: PoolClient, streams: _Streams) -> None:
        self.view = view
        self.name, self.port, self.ctx_size = view.name, view.port, view.ctx_size
        self.settings = view.settings
        self.prompt_opens_think = view.prompt_opens_think
        self.pid, self.report = view.pid, view.report
        self._client = client
        self._streams = streams

    def _post_stream(self, path: str, payload: dict[str, Any]) -> Any:
        answer = super()._post_stream(path, payload)
        self._streams.add(answer[0])
        return answer

    def failure(self, message: str) -> EngineFailed:
        if self._streams.cut:
            return EngineFailed(f"{message}: the service stopped this engine (it is shutting "
                                f"down past shutdown_timeout)")
        try:
            return self._client.call("engine_failure", self.name, message)
        except EngineUnavailable as exc:
            return EngineFailed(f"{message}; {exc.message}")

    def stderr_tail(self, n: int = 8) -> str:
        try:
            return self._client.call("engine_tail", self.name, n)
        except EngineUnavailable:
            return ""


class _Streams:
    """The engine connections of a worker's streams, cut when the worker stops past
    shutdown_timeout (its engines live on in the pool for the other workers)."""

    def __init__(self) -> None:
        self._socks: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.cut = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)

    def cut_all(self) -> None:
        """End every stream still reading: each ends with the dialect's error frame."""
        self.cut = True
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# --- the worker's side -----------------------------------------------------------------------

class PoolClient:
    """A worker's connections to the pool: calls on pooled connections, leases that hold one,
    and the worker's channel (notes out, cancels in)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._idle: list[Connection] = []
        self._idle_lock = threading.Lock()
        self._channel: Connection | None = None
        self._channel_lock = threading.Lock()
        self._closed = False
        # Requests tracked here whose start the pool has not heard yet: it goes with their
        # acquire (one message less before the first token), or before their end.
        self.unadopted: dict[str, RequestStatus] = {}
        self.on_cancel: Callable[[str], None] = lambda rid: None
        self.on_query: Callable[[str], Any] = lambda rid: None

    def _connect(self) -> Connection:
        try:
            return Client(self.address, family="AF_UNIX")
        except OSError as exc:
            raise EngineUnavailable(
                f"the engine pool process does not answer on {self.address} ({exc}); the "
                f"service restarts it, retry in a moment (see the log)") from None

    def _take(self) -> Connection:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _give(self, conn: Connection) -> None:
        with self._idle_lock:
            if len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _exchange(self, message: tuple) -> tuple[Connection, Any]:
        """Send ``message`` and read the answer; a pooled connection the pool has closed (it
        restarted) is replaced once."""
        for attempt in (0, 1):
            conn = self._take() if attempt == 0 else self._connect()
            try:
                conn.send(message)
                return conn, conn.recv()
            except (OSError, EOFError) as exc:
                conn.close()
                if attempt:
                    raise EngineUnavailable(f"the engine pool process went away ({exc}); "
                                            f"retry in a moment") from None
        raise AssertionError("unreachable")

    def call(self, method: str, *args: Any) -> Any:
        """``method(*args)`` in the pool; its answer, or its error raised here."""
        conn, (kind, value) = self._exchange(("call", method, args))
        self._give(conn)
        if kind == "err":
            raise _unpack_error(value)
        return value

    def lease(self, info: ModelInfo, num_ctx: int | None, slot: bool,
              abandoned: Callable[[], bool] | None,
              admitted: Callable[[], None] | None, priority: int = 0,
              request_id: str | None = None) -> tuple[Connection, EngineView, float]:
        """Acquire an engine in the pool; the connection is held until end_lease()."""
        conn = self._take()
        adopt = self.unadopted.pop(request_id, None) if request_id else None
        message = ("acquire", info, num_ctx, slot, priority, request_id, adopt, os.getpid())
        try:
            conn.send(message)
        except OSError:
            conn.close()
            conn = self._connect()
            conn.send(message)
        try:
            while True:
                while not conn.poll(POLL_S):
                    if abandoned is not None and abandoned():
                        conn.close()  # the pool sees it and leaves the queue
                        raise Cancelled("the client went away while the request was queued")
                kind, value = conn.recv()
                if kind == "admitted":
                    if admitted is not None:
                        admitted()
                    continue
                break
        except (OSError, EOFError) as exc:
            conn.close()
            raise EngineUnavailable(f"the engine pool process went away ({exc}); retry in a "
                                    f"moment") from None
        if kind == "err":
            self._give(conn)
            raise _unpack_error(value)
        view, load_s = value
        return conn, view, load_s

    def end_lease(self, conn: Connection, keep_alive: float | None) -> None:
        try:
            conn.send(("release", keep_alive))
        except OSError:
            conn.close()
            return
        self._give(conn)

    # the worker's channel

    def note(self, *message: Any) -> None:
        """Send a note to the pool on this worker's channel (no answer)."""
        with self._channel_lock:
            for _ in (0, 1):
                if self._channel is None:
                    try:
                        self._channel = self._connect()
                        self._channel.send(("channel", os.getpid()))
                    except (EngineUnavailable, OSError):
                        self._channel = None
                        return  # the pool is gone: its view of this request is lost
                    threading.Thread(target=self._listen, args=(self._channel,), daemon=True,
                                     name="pool-channel").start()
                try:
                    self._channel.send(message)
                    return
                except OSError:
                    self._channel.close()
                    self._channel = None

    def register(self) -> None:
        """Open this worker's channel now, so that the pool lists the worker (``/health``)
        and can reach it before it has a request."""
        self.note("hello")

    def _listen(self, conn: Connection) -> None:
        while True:
            try:
                kind, value = conn.recv()
            except (OSError, EOFError):
                break
            if kind == "cancel":
                self.on_cancel(value)
            elif kind == "query":
                query_id, request_id = value
                self.note("answer", query_id, self.on_query(request_id))
        # The pool went away (the master starts a new one): register with the next pool.
        with self._channel_lock:
            if self._channel is conn:
                self._channel = None
        conn.close()
        while not self._closed:
            self.register()
            with self._channel_lock:
                if self._channel is not None:
                    return
            time.sleep(RECONNECT_S)

    def close(self) -> None:
        self._closed = True
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        with self._channel_lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


class _RemoteQueue:
    def __init__(self, client: PoolClient) -> None:
        self._client = client

    def snapshot(self) -> dict[str, dict[str, float]]:
        return self._client.call("queue_snapshot")

    def positions(self) -> dict[str, dict[str, int | str]]:
        return self._client.call("queue_positions")


class RemoteManager:
    """ModelManager's surface for a worker: models from the store it reads itself, engines
    and their state from the pool."""

    def __init__(self, config: Config, client: PoolClient) -> None:
        self.config = config
        self.client = client
        self.catalogue = ModelCatalogue(config)
        self.rules = EngineRules(config)
        cat, rules = self.catalogue, self.rules
        self.list_models, self.resolve = cat.list_models, cat.resolve
        self.default_model_name, self.add_alias = cat.default_model_name, cat.add_alias
        self.engine_settings, self.parallel_for = rules.engine_settings, rules.parallel_for
        self.rpc_workers, self.context_for = rules.rpc_workers, rules.context_for
        self.queue = _RemoteQueue(client)
        self.streams = _Streams()
        # A damaged model is logged once for the service, by the pool.
        cat.log_problem = lambda path, problem: client.note("problem", path, problem)
        self._leases: dict[tuple[str, bool], list[Connection]] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> OllamaStore:
        return self.catalogue.store

    def acquire(self, info: ModelInfo, num_ctx: int | None = None, *, slot: bool = True,
                abandoned: Callable[[], bool] | None = None,
                admitted: Callable[[], None] | None = None, priority: int = 0,
                request_id: str | None = None) -> tuple[RemoteEngine, float]:
        conn, view, load_s = self.client.lease(info, num_ctx, slot, abandoned, admitted,
                                               priority, request_id)
        with self._lock:
            self._leases.setdefault((info.name, slot), []).append(conn)
        return RemoteEngine(view, self.client, self.streams), load_s

    def release(self, name: str, keep_alive: float | None = None, *,
                slot: bool = True) -> None:
        with self._lock:
            held = self._leases.get((name, slot))
            conn = held.pop() if held else None
        if conn is not None:
            self.client.end_lease(conn, keep_alive)

    def unload(self, name: str) -> bool:
        return self.client.call("unload", name)

    def loaded(self) -> list[LoadedModel]:
        return self.client.call("loaded")

    def loaded_entry(self, name: str) -> LoadedModel | None:
        return self.client.call("loaded_entry", name)

    def failed_models(self) -> list[dict[str, Any]]:
        return self.client.call("failed_models")

    def preloading(self) -> list[str]:
        return self.client.call("preloading")

    def workers_in_use(self) -> dict[str, list[str]]:
        return self.client.call("workers_in_use")

    def pool_status(self) -> dict[str, Any]:
        """The pool process: its pid and its configuration's reload status."""
        return self.client.call("pool_status")

    def apply_config(self) -> None:
        """A reload in this worker: the model folders (the pool reloads its own engines)."""
        self.catalogue.apply_config()

    def shutdown(self) -> None:
        """The worker stops (past shutdown_timeout): its streams end with an error frame; the
        engines are the pool's and serve on."""
        self.streams.cut_all()


class SharedTracker(RequestTracker):
    """A worker's tracker: its own requests tracked here (cancel handles, tokens counted per
    token at no cost), mirrored to the pool, whose tracker answers for every worker's."""

    def __init__(self, client: PoolClient) -> None:
        super().__init__()
        self._client = client
        self._flushed: dict[str, int] = {}
        client.on_cancel = self._cancel_here
        client.on_query = super().get
        threading.Thread(target=self._flush_loop, daemon=True, name="tracker-flush").start()

    def _cancel_here(self, request_id: str) -> None:
        super().cancel(request_id)

    def adopt(self, status: RequestStatus, caller_limit: int = 0) -> threading.Event:
        if caller_limit > 0:  # the pool counts the key's requests of every worker: ask it
            self._client.call("track_start", status, caller_limit, os.getpid())
        else:  # nothing to refuse: the pool hears of it with its acquire
            self._client.unadopted[status.id] = status
        return super().adopt(status)

    # set_state: local only. The states a request passes through here (queued, loading,
    # processing) are the pool's own doing: it sets them in its tracker as it admits.

    def set_prompt_tokens(self, request_id: str, n: int) -> None:
        super().set_prompt_tokens(request_id, n)
        self._client.note("mirror", request_id, {"prompt_tokens": n})

    # add_tokens: local only; the first token's time and the counts go every FLUSH_S (and
    # with the end), not on the way to the client.

    def finish(self, request_id: str, **kwargs: Any) -> None:
        status = super().get(request_id)
        super().finish(request_id, **kwargs)
        self._flushed.pop(request_id, None)
        if status is not None and status.done:
            unadopted = self._client.unadopted.pop(request_id, None)
            if unadopted is not None:  # it ended before asking for an engine
                self._client.note("adopt", unadopted)
            self._client.note("finish", request_id, _progress(status), {
                "state": status.state, "finish_reason": status.finish_reason,
                "error": status.error})

    def _flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            with self._lock:
                changed = [s for rid, s in self._active.items()
                           if s.tokens_generated != self._flushed.get(rid, 0)]
            firsts = [s for s in changed if s.id not in self._flushed]
            for s in firsts:
                self._client.note("mirror", s.id, {"state": s.state,
                                                   "first_token_at": s.first_token_at})
            if changed:
                counts = {s.id: s.tokens_generated for s in changed}
                self._flushed.update(counts)
                self._client.note("tokens", counts)

    # Reads: this worker's own requests from here (the freshest), the rest from the pool.

    def cancel(self, request_id: str) -> bool:
        return super().cancel(request_id) or self._client.call("track_cancel", request_id)

    def get(self, request_id: str) -> RequestStatus | None:
        return super().get(request_id) or self._client.call("track_get", request_id)

    def active(self) -> list[RequestStatus]:
        return self._client.call("track_active")

    def recent(self, limit: int = 50) -> list[RequestStatus]:
        return self._client.call("track_recent", limit)

    def count_active(self, model: str | None = None) -> int:
        return self._client.call("track_count", model)

    def totals_now(self) -> dict[str, int]:
        return self._client.call("track_totals")


def _progress(status: RequestStatus) -> dict[str, Any]:
    return {"prompt_tokens": status.prompt_tokens, "tokens_generated": status.tokens_generated,
            "first_token_at": status.first_token_at, "processing_at": status.processing_at}


class RemoteMetrics:
    """/metrics in a worker: the pool's registry, which every worker's requests feed."""

    def __init__(self, client: PoolClient) -> None:
        self._client = client
        RELAY.on_stream = lambda: client.note("relayed")
        quiet_no_gpu()  # the pool, which renders /metrics, logs why there is no GPU

    def render(self) -> bytes:
        return self._client.call("metrics")


# --- the pool's side -------------------------------------------------------------------------

class PoolServer:
    """Answers the workers from the services of an app built in the pool process."""

    def __init__(self, app: Any) -> None:
        self.app = app
        svc = app.extensions["ollama_server"]
        self.manager, self.tracker = svc.manager, svc.tracker
        self.metrics = app.extensions["ollama_server_metrics"]
        self._owners: dict[str, int] = {}  # request id → the pid of the worker running it
        self._channels: dict[int, tuple[Connection, threading.Lock]] = {}
        self._answers: dict[int, list[Any]] = {}  # query id → [event, answer]
        self._query_ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()

    def serve(self, listener: Listener) -> None:
        """Accept connections for ever, one thread each."""
        while True:
            try:
                conn = listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                             name="pool-conn").start()

    def _serve_connection(self, conn: Connection) -> None:
        try:
            while True:
                message = conn.recv()
                kind = message[0]
                if kind == "call":
                    self._answer(conn, message[1], message[2])
                elif kind == "acquire":
                    self._lease(conn, *message[1:])
                elif kind == "channel":
                    self._channel(conn, message[1])
                    return
        except (EOFError, OSError):
            pass
        finally:
            conn.close()

    def _answer(self, conn: Connection, method: str, args: tuple) -> None:
        try:
            result: tuple[str, Any] = ("ok", getattr(self, "do_" + method)(*args))
        except Exception as exc:  # noqa: BLE001 - the worker raises it
            result = ("err", _pack_error(exc))
        conn.send(result)

    def _lease(self, conn: Connection, info: ModelInfo, num_ctx: int | None,
               slot: bool, priority: int = 0, request_id: str | None = None,
               adopt: RequestStatus | None = None, pid: int = 0) -> None:
        """One engine lease: held until the worker releases it or its connection ends. The
        request's start comes with it (``adopt``); its queue states are set here."""
        if adopt is not None:
            self.do_track_start(adopt, 0, pid)

        def admitted() -> None:
            if request_id:
                self.tracker.set_state(request_id, RequestState.LOADING)
            conn.send(("admitted", None))

        try:
            engine, load_s = self.manager.acquire(
                info, num_ctx, slot=slot, abandoned=conn.poll, admitted=admitted,
                priority=priority, request_id=request_id)
        except Exception as exc:  # noqa: BLE001 - the worker raises it
            if not isinstance(exc, Cancelled):
                conn.send(("err", _pack_error(exc)))
            return
        if request_id:
            self.tracker.set_state(request_id, RequestState.PROCESSING)
        keep_alive = None
        try:
            conn.send(("ok", (EngineView.of(engine), load_s)))
            kind, keep_alive = conn.recv()
        except (EOFError, OSError):
            log.warning("a worker went away holding an engine of %s: its slot is free again",
                        info.name)
            raise
        finally:
            self.manager.release(info.name, keep_alive, slot=slot)

    def _channel(self, conn: Connection, pid: int) -> None:
        """A worker's notes on its requests, until it exits."""
        with self._lock:
            self._channels[pid] = (conn, threading.Lock())
        try:
            while True:
                kind, *rest = conn.recv()
                if kind == "mirror":
                    self.tracker.mirror(rest[0], **rest[1])
                elif kind == "adopt":  # a request that ended before its acquire
                    self.do_track_start(rest[0], 0, pid)
                elif kind == "tokens":
                    for rid, n in rest[0].items():
                        self.tracker.mirror(rid, tokens_generated=n)
                elif kind == "finish":
                    rid, progress, end = rest
                    self.tracker.mirror(rid, **progress)
                    self.tracker.finish(rid, state=end["state"],
                                        finish_reason=end["finish_reason"], error=end["error"])
                    with self._lock:
                        self._owners.pop(rid, None)
                elif kind == "answer":
                    with self._lock:
                        waiting = self._answers.get(rest[0])
                    if waiting is not None:
                        waiting[1] = rest[1]
                        waiting[0].set()
                elif kind == "relayed":
                    with self._lock:
                        self.metrics.relayed_by_workers += 1
                elif kind == "problem":
                    self.manager.catalogue.report_problem(Path(rest[0]), rest[1])
                # "hello": the worker registered (its channel is open: nothing else to do)
        except (EOFError, OSError):
            pass
        with self._lock:
            self._channels.pop(pid, None)
            orphans = [rid for rid, owner in self._owners.items() if owner == pid]
            for rid in orphans:
                del self._owners[rid]
        for rid in orphans:
            self.tracker.finish(rid, state=RequestState.FAILED,
                                error=f"the worker process {pid} serving it exited")
        if orphans:
            log.warning("worker %d exited with %d request(s) in flight", pid, len(orphans))

    # --- calls -----------------------------------------------------------------------------

    def do_track_start(self, status: RequestStatus, caller_limit: int, pid: int) -> None:
        self.tracker.adopt(status, caller_limit)
        with self._lock:
            self._owners[status.id] = pid

    def _to_owner(self, request_id: str, message: tuple) -> bool:
        """Send ``message`` to the worker running the request; False if none is."""
        with self._lock:
            owner = self._owners.get(request_id)
            channel = self._channels.get(owner) if owner is not None else None
        if channel is None:
            return False
        conn, lock = channel
        try:
            with lock:
                conn.send(message)
        except OSError:
            return False
        return True

    def do_track_cancel(self, request_id: str) -> bool:
        return self._to_owner(request_id, ("cancel", request_id))

    def do_track_get(self, request_id: str) -> RequestStatus | None:
        """A running request as its worker sees it now (its token count is exact: the
        service counts a token before it sends it), else as the pool last heard."""
        with self._lock:
            query_id = next(self._query_ids)
            waiting = self._answers[query_id] = [threading.Event(), None]
        try:
            if (self._to_owner(request_id, ("query", (query_id, request_id)))
                    and waiting[0].wait(QUERY_TIMEOUT_S) and waiting[1] is not None):
                return waiting[1]
        finally:
            with self._lock:
                self._answers.pop(query_id, None)
        return self.tracker.get(request_id)

    def do_track_active(self) -> list[RequestStatus]:
        return self.tracker.active()

    def do_track_recent(self, limit: int) -> list[RequestStatus]:
        return self.tracker.recent(limit)

    def do_track_count(self, model: str | None) -> int:
        return self.tracker.count_active(model)

    def do_track_totals(self) -> dict[str, int]:
        return self.tracker.totals_now()

    def do_pool_status(self) -> dict[str, Any]:
        with self._lock:  # channels come and go on other threads
            workers = sorted(self._channels)
        return {"pid": os.getpid(), "workers": workers,
                "config": self.app.extensions["ollama_server_reloader"].status()}

    def do_metrics(self) -> bytes:
        return self.metrics.render()

    def do_queue_snapshot(self) -> dict[str, dict[str, float]]:
        return self.manager.queue.snapshot()

    def do_queue_positions(self) -> dict[str, dict[str, int | str]]:
        return self.manager.queue.positions()

    def do_unload(self, name: str) -> bool:
        return self.manager.unload(name)

    def _view(self, entry: LoadedModel | None) -> LoadedModel | None:
        if entry is None:
            return None
        return LoadedModel(info=entry.info, engine=EngineView.of(entry.engine),  # type: ignore[arg-type]
                           loaded_at=entry.loaded_at, last_used=entry.last_used,
                           expires_at=entry.expires_at, keep_alive=entry.keep_alive,
                           in_flight=entry.in_flight)

    def do_loaded(self) -> list[LoadedModel]:
        return [v for e in self.manager.loaded() if (v := self._view(e)) is not None]

    def do_loaded_entry(self, name: str) -> LoadedModel | None:
        return self._view(self.manager.loaded_entry(name))

    def do_failed_models(self) -> list[dict[str, Any]]:
        return self.manager.failed_models()

    def do_preloading(self) -> list[str]:
        return self.manager.preloading()

    def do_workers_in_use(self) -> dict[str, list[str]]:
        return self.manager.workers_in_use()

    def do_engine_failure(self, name: str, message: str) -> EngineFailed:
        entry = self.manager.loaded_entry(name)
        if entry is None:
            return EngineFailed(f"{message}: the model {name} is no longer loaded")
        return entry.engine.failure(message)

    def do_engine_tail(self, name: str, n: int) -> str:
        entry = self.manager.loaded_entry(name)
        return entry.engine.stderr_tail(n) if entry is not None else ""


def _pool_main(app_factory: Callable[..., Any], config: Config, source: ConfigSource | None,
               address: str, ready: int, master: int) -> None:
    """The pool process: the services (``app_factory``: the app a single worker would build),
    the socket, and signals (TERM: stop the engines and exit; HUP: reload; INT: ignored, the
    master decides when the service stops)."""
    from .core.engine.spawn import die_with_parent

    die_with_parent(signal.SIGTERM, master)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.pop(ADDRESS_ENV, None)
    os.environ.pop(PID_ENV, None)
    app = app_factory(config, source=source)
    manager = app.extensions["ollama_server"].manager

    def stop(_signum: int, _frame: Any) -> None:
        log.info("engine pool: stopping its engines")
        manager.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    app.extensions["ollama_server_reloader"].install_signal_handler(signal.SIGHUP)
    if os.path.exists(address):
        os.unlink(address)
    listener = Listener(address, family="AF_UNIX", backlog=1024)
    os.chmod(address, 0o600)
    server = PoolServer(app)
    os.write(ready, b"1")
    os.close(ready)
    log.info("engine pool (pid %d) serves its workers on %s", os.getpid(), address)
    server.serve(listener)


class PoolProcess:
    """The master's handle on its pool process: started before the workers, restarted when
    it dies, stopped after them."""

    def __init__(self, app_factory: Callable[..., Any], config: Config,
                 source: ConfigSource | None) -> None:
        self.app_factory, self.config, self.source = app_factory, config, source
        self.folder = tempfile.mkdtemp(prefix="llm-inference-pool-")  # mode 0700
        self.address = str(Path(self.folder) / "pool.sock")
        self.pid: int | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Fork the pool and wait until it listens (RuntimeError when it does not)."""
        read, write = os.pipe()
        master = os.getpid()
        pid = os.fork()
        if pid == 0:  # the pool
            os.close(read)
            code = 0
            try:
                _pool_main(self.app_factory, self.config, self.source, self.address, write,
                           master)
            except BaseException:  # noqa: BLE001 - reported, then the process ends
                log.exception("the engine pool process failed")
                code = 1
            finally:
                os._exit(code)
        os.close(write)
        self.pid = pid
        try:
            import select

            ok = select.select([read], [], [], timeout)[0] and os.read(read, 1) == b"1"
        finally:
            os.close(read)
        if not ok:
            self.stop()
            raise RuntimeError("the engine pool process did not start (see the log above)")
        os.environ[ADDRESS_ENV] = self.address
        os.environ[PID_ENV] = str(pid)

    def exited(self) -> int | None:
        """The pool's exit status if it has exited (reaped here), else None; -1 when
        gunicorn's own reaping took it first."""
        if self.pid is None:
            return None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return -1
        if pid == 0:
            return None
        self.pid = None
        return status

    def signal(self, signum: int) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the pool (its engines first) and remove its socket."""
        pid = self.pid
        if pid is not None:
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.05)
            else:
                self.signal(signal.SIGKILL)
            self.pid = None
        for path in (self.address, self.folder):
            try:
                os.unlink(path) if path == self.address else os.rmdir(path)
            except OSError:
                pass
