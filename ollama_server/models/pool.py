"""EnginePool: the running engines, one LLAMAExecutor per loaded model, and their policy.

At most ``max_loaded_models`` engines (the least recently used idle one evicted first), each
unloaded ``keep_alive`` seconds after its last request ends; each model's ``parallel`` slots and
bounded queue (``max_queue``) admit its requests; RPC workers are shared between models one at
a time; a configuration reload restarts the engines whose command line changes once they are
idle. It takes resolved models (``ModelInfo`` from the catalogue), never names to look up:
this is the piece that can live in its own process, in front of several front ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..core.engine import EngineSettings, EngineState, LLAMAExecutor
from ..core.engine.binary import gpu_visible
from ..core.errors import (
    Cancelled,
    EngineFailed,
    EngineUnavailable,
    Overloaded,
)
from .admission import SlotQueue
from .kv_budget import auto_contexts, available_memory
from .schemas import ModelInfo

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[ModelInfo, int], LLAMAExecutor]


@dataclass
class LoadedModel:
    """A model whose engine is loaded (or loading)."""

    info: ModelInfo
    engine: LLAMAExecutor
    loaded_at: float
    last_used: float
    expires_at: float | None  # monotonic deadline; None: never while idle
    keep_alive: float
    in_flight: int = 0
    # An engine with new settings (config reload) that replaces ``engine`` once it is idle.
    pending: LLAMAExecutor | None = None
    # Requests waiting for the engine to go idle and restart with a larger context (and the
    # largest they need): new requests wait behind them instead of keeping it busy for ever.
    growers: int = 0
    grow_to: int = 0

    @property
    def ctx_size(self) -> int:
        """The context the engine runs with."""
        return self.engine.ctx_size


def pick_evictions(loaded: dict[str, LoadedModel], wanted: str, cap: int) -> list[str]:
    """Names to unload so that ``wanted`` fits under ``cap``: idle ones, least recent first.

    Pure; returns fewer than needed when busy models are in the way.
    """
    if wanted in loaded or len(loaded) < cap:
        return []
    need = len(loaded) - cap + 1
    idle = sorted((m for m in loaded.values() if m.in_flight == 0), key=lambda m: m.last_used)
    return [m.info.name for m in idle[:need]]


def same_engine(running: Any, fresh: Any) -> bool:
    """True when ``fresh`` (made from the current settings) would run the same llama-server as
    ``running``: same command line when both have one, else equal settings."""
    if hasattr(running, "command") and hasattr(fresh, "command"):
        return running.command(0) == fresh.command(0)
    return getattr(running, "settings", None) == getattr(fresh, "settings", None)


class EngineRules:
    """What the configuration says about engines: their settings, slots, RPC workers and
    context. Pure reads of ``config``; a front end that runs no engines uses it too."""

    def __init__(self, config: Config, engine_binary: Path | None = None) -> None:
        self.config = config
        self._engine_binary = engine_binary
        self._binary_for = config.llama_cpp_path  # the llama_cpp_path it was resolved from

    def engine_settings(self, model: str | None = None) -> EngineSettings:
        """EngineSettings from the configuration (the binary resolved once), with the
        ``model_settings`` overrides of ``model`` applied."""
        if self._engine_binary is None:
            from ..core.engine.binary import resolve_binary

            self._engine_binary = resolve_binary(self.config.llama_cpp_path)
            self._binary_for = self.config.llama_cpp_path
        c = self.config
        over = c.engine_overrides(model) if model else {}
        return EngineSettings(binary=self._engine_binary, threads=c.threads,
                              batch_size=c.batch_size,
                              gpu_layers=over.get("gpu_layers", c.gpu_layers),
                              tensor_split=over.get("tensor_split", c.tensor_split),
                              rpc_servers=list(over.get("rpc_servers", c.rpc_servers)),
                              main_gpu=over.get("main_gpu", c.main_gpu),
                              fit_target_mib=over.get("fit_target_mib", c.fit_target_mib),
                              kv_cache_type=over.get("kv_cache_type", c.kv_cache_type),
                              flash_attention=over.get("flash_attention", c.flash_attention),
                              kv_pool_size=over.get("kv_pool_size", c.kv_pool_size),
                              cache_ram=over.get("cache_ram", c.cache_ram),
                              slot_prompt_similarity=over.get("slot_prompt_similarity",
                                                              c.slot_prompt_similarity),
                              parallel=self.parallel_for(model) if model else c.parallel,
                              embeddings=c.embeddings,
                              startup_timeout=c.startup_timeout,
                              request_timeout=c.request_timeout)

    def parallel_for(self, model: str) -> int:
        """The slots ``model`` runs with: its ``model_settings`` entry, else ``parallel``."""
        return int(self.config.engine_overrides(model).get("parallel", self.config.parallel))

    def rpc_workers(self) -> list[str]:
        """Every RPC worker the configuration names (globally or for some model)."""
        names = list(self.config.rpc_servers)
        for settings in self.config.model_settings.values():
            names += settings.get("rpc_servers") or []
        return list(dict.fromkeys(names))

    def context_for(self, info: ModelInfo, requested: int | None = None,
                    current: int | None = None) -> int:
        """The context to run ``info`` with: trained context capped by the default, raised
        (up to the model's maximum) when a request asks for more."""
        trained = info.context_length or self.config.default_context_size
        ctx = min(trained, self.config.default_context_size)
        if current:
            ctx = max(ctx, current)
        if requested and requested > ctx:
            ctx = min(int(requested), trained) if info.context_length else int(requested)
        return max(ctx, 256)


class EnginePool(EngineRules):
    """Hands out ready engines for resolved models, within the configured limits."""

    def __init__(self, config: Config, executor_factory: ExecutorFactory | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 engine_binary: Path | None = None) -> None:
        super().__init__(config, engine_binary)
        self.clock = clock
        self._factory = executor_factory or self._default_factory
        self._lock = threading.Condition()
        self._loaded: dict[str, LoadedModel] = {}
        self._closed = False
        # Models whose last start failed: name → {"error", "at" (epoch s), "engine"}; cleared
        # by the next successful start. /health reports them.
        self.failures: dict[str, dict[str, Any]] = {}
        self.queue = SlotQueue(clock)  # slots and waiting requests per model (max_queue)
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True,
                                        name="model-keepalive")
        self._reaper.start()

    # --- engines -------------------------------------------------------------------------

    def _default_factory(self, info: ModelInfo, ctx_size: int) -> LLAMAExecutor:
        settings = self.engine_settings(info.name)
        if not settings.kv_pool_size:  # auto: as many contexts as memory holds (kv_budget)
            host_only = (not settings.rpc_servers
                         and (settings.gpu_layers == 0 or not gpu_visible()))
            contexts = auto_contexts(info, ctx_size, settings.parallel, settings.kv_cache_type,
                                     host_only, available_memory() if host_only else None)
            settings = replace(settings, kv_pool_contexts=contexts)
            log.info("%s: its %d slots share a KV cache of %d contexts of %d tokens", info.name,
                     settings.parallel, contexts, ctx_size)
        return LLAMAExecutor(info.path, settings, ctx_size,
                             name=info.name, pooling=info.pooling, projector=info.projector)

    # --- load policy ---------------------------------------------------------------------

    def acquire(self, info: ModelInfo, num_ctx: int | None = None, *, slot: bool = True,
                abandoned: Callable[[], bool] | None = None,
                admitted: Callable[[], None] | None = None, priority: int = 0,
                request_id: str | None = None) -> tuple[LLAMAExecutor, float]:
        """A ready engine for ``info`` and the seconds spent loading it; pair with release().

        Loads the model (evicting idle ones over the cap) or restarts it with a larger context
        when ``num_ctx`` asks for more than it runs with, once the requests it is serving have
        ended (as Ollama reloads a runner only when idle; new requests wait behind that
        restart). With ``slot`` (work the engine
        queues: generation, embeddings) it first takes one of the model's ``parallel`` slots,
        waiting in the model's bounded queue: QueueFull past ``max_queue``, Cancelled when
        ``abandoned()`` turns true while waiting; ``admitted()`` is called once it has its
        slot if it waited for it or a load (or restart) is ahead, not otherwise. release()
        with the same ``slot`` gives the slot back. Tokenizing and templates
        take none. ``priority`` (the caller's key's class) orders the queue; ``request_id``
        names the request in the queue's positions.
        """
        waited = 0.0
        if slot:
            c = self.config
            waited = self.queue.enter(info.name, self.parallel_for(info.name), c.max_queue,
                                      c.request_timeout, abandoned, priority, request_id)
        try:
            # Only worth telling when the request waited or a load is ahead: with several
            # workers it is a message to the worker, on the way to the first token.
            if admitted is not None and (waited or not self._ready(info, num_ctx)):
                admitted()
            return self._acquire(info, num_ctx, abandoned)
        except BaseException:
            if slot:
                self.queue.leave(info.name)
            raise

    def _ready(self, info: ModelInfo, num_ctx: int | None) -> bool:
        """Whether the engine of ``info`` runs and needs no restart (for a pending change or
        a larger context): taking it is then instant."""
        with self._lock:
            entry = self._loaded.get(info.name)
        return (entry is not None and entry.pending is None
                and getattr(entry.engine, "state", None) == EngineState.READY
                and self._bigger_context(entry, num_ctx) is None)

    def _bigger_context(self, entry: LoadedModel, num_ctx: int | None) -> int | None:
        """The context the running ``entry`` must be restarted with for ``num_ctx``; None
        when its own is large enough."""
        if not num_ctx:
            return None
        ctx = self.context_for(entry.info, num_ctx, entry.ctx_size)
        return ctx if ctx > entry.ctx_size else None

    def _acquire(self, info: ModelInfo, num_ctx: int | None,
                 abandoned: Callable[[], bool] | None = None) -> tuple[LLAMAExecutor, float]:
        to_stop: list[LLAMAExecutor] = []
        growing: LoadedModel | None = None  # the entry this request waits on to restart bigger
        with self._lock:
            deadline = self.clock() + self.config.request_timeout
            try:
                while True:
                    entry = self._loaded.get(info.name)
                    if entry is not None:
                        new_ctx = self._bigger_context(entry, num_ctx)
                        if (new_ctx is not None) != (growing is entry):
                            self._stop_growing(growing)
                            growing = None
                            if new_ctx is not None:
                                growing, entry.growers = entry, entry.growers + 1
                        if new_ctx is not None:
                            entry.grow_to = max(entry.grow_to, new_ctx)
                            if entry.in_flight == 0:
                                break
                        elif not entry.growers:
                            break
                    elif len(self._loaded) < self.config.max_loaded_models:
                        break
                    else:
                        evict = pick_evictions(self._loaded, info.name,
                                               self.config.max_loaded_models)
                        if evict:
                            for name in evict:
                                to_stop.append(self._loaded.pop(name).engine)
                            break
                    if self.clock() > deadline:
                        raise Overloaded(self._busy_message(info, entry))
                    if abandoned is not None and abandoned():
                        raise Cancelled("the client went away while the request waited for "
                                        "its model")
                    self._lock.wait(timeout=0.5)
                if entry is not None and entry.pending is not None and entry.in_flight == 0:
                    to_stop.append(self._take_pending(entry))
                if entry is None:
                    to_stop += self._free_workers_locked(info, deadline)
                    ctx = self.context_for(info, num_ctx)
                    now = self.clock()
                    entry = LoadedModel(info=info, engine=self._factory(info, ctx),
                                        loaded_at=now, last_used=now, expires_at=None,
                                        keep_alive=self.config.keep_alive)
                    self._loaded[info.name] = entry
                elif growing is entry:
                    new_ctx = max(entry.grow_to, self._bigger_context(entry, num_ctx) or 0)
                    if new_ctx > entry.ctx_size:
                        log.info("raising the context of %s from %d to %d", info.name,
                                 entry.ctx_size, new_ctx)
                        entry.engine.stop()  # idle: no request of it is cut off
                        entry.engine.ctx_size = new_ctx
                entry.in_flight += 1
                entry.last_used = self.clock()
                entry.expires_at = None
            finally:
                self._stop_growing(growing)
        for engine in to_stop:
            log.info("unloading %s to make room for %s", engine.name, info.name)
            engine.stop()
        try:
            load_s = entry.engine.ensure_ready()
        except EngineFailed as exc:
            self.failures[info.name] = {"error": exc.message, "at": time.time(),
                                        "engine": entry.engine}
            self.release(info.name, keep_alive=None, slot=False)
            raise
        except BaseException:
            self.release(info.name, keep_alive=None, slot=False)
            raise
        self.failures.pop(info.name, None)
        return entry.engine, load_s

    def _stop_growing(self, entry: LoadedModel | None) -> None:
        """A request stops waiting for ``entry`` to restart bigger (it did, or gave up)."""
        if entry is None:
            return
        entry.growers -= 1
        if not entry.growers:
            entry.grow_to = 0
        self._lock.notify_all()

    def _busy_message(self, info: ModelInfo, entry: LoadedModel | None) -> str:
        if entry is None:
            return ("every loaded model is busy and the cap on loaded models "
                    f"({self.config.max_loaded_models}) is reached")
        return (f"{info.name} must restart with a larger context (num_ctx) and its "
                f"{entry.in_flight} request(s) in progress did not end within "
                f"request_timeout ({self.config.request_timeout:g} s); retry later or ask "
                f"for the context it runs with ({entry.ctx_size})")

    def failed_models(self) -> list[dict[str, Any]]:
        """Models whose last start failed: name, error, when, seconds until the next try."""
        out = []
        for name, rec in sorted(self.failures.items()):
            engine = rec["engine"]
            out.append({"name": name, "error": rec["error"],
                        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec["at"])),
                        "failed_starts": getattr(engine, "failed_starts", 1),
                        "retry_in_s": round(getattr(engine, "retry_in", lambda: 0.0)(), 1)})
        return out

    def _free_workers_locked(self, info: ModelInfo, deadline: float) -> list[LLAMAExecutor]:
        """Engines to stop so that ``info`` can use its RPC workers (a ggml-rpc-server serves
        one llama-server at a time): idle models on the same workers are unloaded; busy ones
        are waited for until ``deadline``, then EngineUnavailable names them."""
        wanted = set(self.engine_settings(info.name).rpc_servers)
        stopped: list[LLAMAExecutor] = []
        while wanted:
            conflicts = [e for name, e in self._loaded.items() if name != info.name and
                         wanted & set(getattr(e.engine, "settings", None) and
                                      e.engine.settings.rpc_servers or [])]
            for entry in [e for e in conflicts if e.in_flight == 0]:
                log.info("unloading %s: its RPC workers are needed by %s", entry.info.name,
                         info.name)
                stopped.append(self._loaded.pop(entry.info.name).engine)
            busy = [e for e in conflicts if e.in_flight > 0]
            if not busy:
                break
            if self.clock() > deadline:
                shared = sorted(wanted & {w for e in busy for w in e.engine.settings.rpc_servers})
                raise EngineUnavailable(
                    f"RPC worker {', '.join(shared)} is serving {busy[0].info.name}, which is "
                    f"busy; a worker serves one model at a time. Retry later, or give the "
                    f"models separate workers (model_settings)")
            self._lock.wait(timeout=0.5)
        return stopped

    def workers_in_use(self) -> dict[str, list[str]]:
        """RPC worker → the loaded models whose running engine holds it."""
        out: dict[str, list[str]] = {}
        with self._lock:
            entries = list(self._loaded.values())
        for entry in entries:
            engine = entry.engine
            if getattr(engine, "pid", None) is None:
                continue
            for worker in getattr(getattr(engine, "settings", None), "rpc_servers", []) or []:
                out.setdefault(worker, []).append(entry.info.name)
        return out

    def release(self, name: str, keep_alive: float | None = None, *,
                slot: bool = True) -> None:
        """End one use of a model; it stays loaded ``keep_alive`` seconds (None: default,
        negative: forever, 0: unload now when idle). ``slot`` as given to acquire()."""
        if slot:
            self.queue.leave(name)
        stop: LLAMAExecutor | None = None
        restart: tuple[LLAMAExecutor, LoadedModel] | None = None
        with self._lock:
            entry = self._loaded.get(name)
            if entry is None:
                return
            entry.in_flight = max(0, entry.in_flight - 1)
            entry.last_used = self.clock()
            if keep_alive is not None:
                entry.keep_alive = keep_alive
            if entry.in_flight == 0:
                if entry.keep_alive == 0:
                    stop = self._loaded.pop(name).engine
                    entry.pending = None  # never started: nothing to stop
                else:
                    if entry.keep_alive < 0:
                        entry.expires_at = None
                    else:
                        entry.expires_at = self.clock() + entry.keep_alive
                    if entry.pending is not None:
                        restart = (self._take_pending(entry), entry)
            self._lock.notify_all()
        if stop is not None:
            stop.stop()
        if restart is not None:
            self._restart(*restart)

    def unload(self, name: str) -> bool:
        """Stop a model's engine now; False when it was not loaded."""
        with self._lock:
            entry = self._loaded.pop(name, None)
            self._lock.notify_all()
        if entry is None:
            return False
        entry.engine.stop()
        return True

    def loaded(self) -> list[LoadedModel]:
        """Loaded models, the one that expires last first (as /api/ps lists them)."""
        with self._lock:
            entries = list(self._loaded.values())
        return sorted(entries, key=lambda e: (e.expires_at is not None,
                                              -(e.expires_at or 0.0)))

    def loaded_entry(self, name: str) -> LoadedModel | None:
        """The loaded entry for a model name, if any."""
        with self._lock:
            return self._loaded.get(name)

    def _reap_loop(self) -> None:
        while not self._closed:
            expired: list[LLAMAExecutor] = []
            with self._lock:
                now = self.clock()
                for name, entry in list(self._loaded.items()):
                    if entry.in_flight == 0 and entry.expires_at is not None \
                            and entry.expires_at <= now:
                        expired.append(self._loaded.pop(name).engine)
                if not expired:
                    self._lock.wait(timeout=1.0)
            for engine in expired:
                log.info("keep_alive expired for %s; unloading", engine.name)
                engine.stop()

    # --- configuration reload --------------------------------------------------------------

    def apply_config(self) -> None:
        """Bring the engines in line with the configuration just swapped into ``self.config``
        (a reload): the engine binary, the cap on loaded models, and each loaded model's
        engine.

        An engine whose llama-server command line (or settings) would now differ is restarted
        with the new settings once it is idle; the others keep running (settings that are not on
        the command line, such as timeouts, are taken over in place).
        """
        c = self.config
        if self._binary_for != c.llama_cpp_path:
            self._engine_binary = None  # resolved again, from the new llama_cpp_path
        stop: list[LLAMAExecutor] = []
        restart: list[tuple[LLAMAExecutor, LoadedModel]] = []
        with self._lock:
            over = len(self._loaded) - c.max_loaded_models
            idle = sorted((e for e in self._loaded.values() if e.in_flight == 0),
                          key=lambda e: e.last_used)
            for entry in idle[:max(0, over)]:
                log.info("unloading %s: max_loaded_models is now %d", entry.info.name,
                         c.max_loaded_models)
                stop.append(self._loaded.pop(entry.info.name).engine)
            for entry in self._loaded.values():
                fresh = self._factory(entry.info, entry.ctx_size)
                if same_engine(entry.engine, fresh):
                    if hasattr(entry.engine, "settings") and hasattr(fresh, "settings"):
                        entry.engine.settings = fresh.settings
                    entry.pending = None
                    continue
                entry.pending = fresh
                if entry.in_flight == 0:
                    restart.append((self._take_pending(entry), entry))
                else:
                    log.info("engine settings of %s changed: it restarts when its %d "
                             "request(s) end", entry.info.name, entry.in_flight)
            self._lock.notify_all()
        for engine in stop:
            engine.stop()
        for old, entry in restart:
            self._restart(old, entry)

    def _take_pending(self, entry: LoadedModel) -> LLAMAExecutor:
        """Put ``entry``'s pending engine in place (lock held); return the old one to stop."""
        old, entry.engine, entry.pending = entry.engine, entry.pending, None
        return old

    def _restart(self, old: LLAMAExecutor, entry: LoadedModel) -> None:
        """Stop ``old`` and start ``entry``'s new engine in the background: the model stays
        loaded, and a request that comes meanwhile waits for the new engine."""
        log.info("restarting the engine of %s with its new settings", entry.info.name)
        old.stop()
        engine = entry.engine

        def start() -> None:
            if self._closed:
                return
            try:
                engine.ensure_ready()
                self.failures.pop(entry.info.name, None)
                if self._closed or self.loaded_entry(entry.info.name) is not entry:
                    engine.stop()  # stopped or unloaded while it started
            except EngineFailed as exc:
                self.failures[entry.info.name] = {"error": exc.message, "at": time.time(),
                                                  "engine": engine}
                log.error("%s did not restart with its new settings: %s", entry.info.name,
                          exc.message)

        threading.Thread(target=start, daemon=True, name=f"restart-{entry.info.name}").start()

    def shutdown(self) -> None:
        """Stop every engine (the service is stopping)."""
        self._closed = True
        with self._lock:
            entries = list(self._loaded.values())
            self._loaded.clear()
            self._lock.notify_all()
        # In parallel: each stop may wait out llama-server's grace period, and a stopping
        # service has a deadline (shutdown_timeout).
        stoppers = [threading.Thread(target=engine.stop, name=f"stop-{engine.name}")
                    for entry in entries for engine in (entry.engine, entry.pending) if engine]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()

