"""LLAMAExecutor: one llama-server child process per loaded model, supervised.

The process half of an engine (start, health-wait, log capture, crash diagnosis, stop); the
request half is ``transport.EngineClient``, the engine's JSON ``payload`` and ``parse``.
"""

from __future__ import annotations

import collections
import enum
import http.client
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EngineFailed, EngineUnavailable, InsufficientMemory, ServiceError
from .exits import describe_exit, signal_name
from .report import LoadReport
from .spawn import popen_tied
from .transport import EngineClient

log = logging.getLogger(__name__)

_ERROR_WORDS = ("error", "failed", "fatal", "abort", "cannot", "unable", "invalid", "exception",
                "terminate", "out of memory", "what()")
_ERROR_BYTES = tuple(w.encode() for w in _ERROR_WORDS)


def _error_word_in(text: str | bytes) -> bool:
    """Whether a log line, or a raw block of the engine's log, holds an error word (in any
    case). A lower-cased copy searched once per word: about 45 µs for a request's 5 KB of
    slot lines, where a case-insensitive regex took 570 µs, holding the GIL all the while."""
    low = text.lower()
    words = _ERROR_BYTES if isinstance(low, bytes) else _ERROR_WORDS
    return any(word in low for word in words)


# llama-server's log prefix (uptime and level, "0.07.010.775 I "): dropped in error messages.
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [DIWE] ")
LOG_GATHER_S = 0.05  # a ready engine's log is read at most this often (see _read_stderr)
LOG_DRAIN_TIMEOUT_S = 15.0  # the most an exited engine's last log lines are waited for


def available_memory_bytes() -> int:
    """Memory available to new allocations (MemAvailable), or total memory when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class EngineState(enum.StrEnum):
    """Life cycle of one llama-server process."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass
class EngineSettings:
    """How to start llama-server; the same for every model unless a model overrides it."""

    binary: Path
    threads: int = 0  # 0: llama-server's own choice
    batch_size: int = 512
    gpu_layers: int | None = None  # None: llama-server's default
    tensor_split: list[float] | None = None
    rpc_servers: list[str] = field(default_factory=list)  # llama.cpp RPC workers, host:port
    main_gpu: int | None = None
    fit_target_mib: int | None = None  # --fit-target (MiB --fit leaves free per device)
    kv_cache_type: str = "f16"  # --cache-type-k/-v (q8_0, q4_0...: less memory per token)
    flash_attention: str = "auto"  # -fa: auto, on, off
    # Tokens of KV cache the slots share (-c); 0: kv_pool_contexts times the context; less
    # than the context: the context.
    kv_pool_size: int = 0
    kv_pool_contexts: int = 1  # with kv_pool_size 0 (auto): contexts the pool holds
    cache_ram: int | None = None  # --cache-ram MiB (-1: no limit, 0: off); None: engine's
    slot_prompt_similarity: float | None = None  # --slot-prompt-similarity; None: engine's
    parallel: int = 4  # slots that decode together (continuous batching)
    embeddings: bool = True  # also serve /v1/embeddings from the same process
    startup_timeout: float = 300.0
    request_timeout: float = 600.0
    extra_args: list[str] = field(default_factory=list)


def kv_pool_cells(settings: EngineSettings, ctx_size: int) -> int:
    """Tokens of KV cache all slots of an engine with ``settings`` and ``ctx_size`` share."""
    pool = settings.kv_pool_size or settings.kv_pool_contexts * ctx_size
    return max(pool, ctx_size)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LLAMAExecutor(EngineClient):
    """One llama-server process serving one model.

    Contract: a state machine ``stopped → starting → ready → stopping → stopped``, with
    ``failed`` after a start that did not succeed or a crash. Only methods holding ``_lock``
    change the state (one writer). ``ensure_ready()`` is idempotent: it returns at once when
    the process is up, restarts it after a crash, and raises EngineFailed (with the tail of
    llama-server's stderr) when it cannot start. ``stop()`` sends SIGTERM to the process group,
    waits, then SIGKILL, and always reaps. Callers never inspect the state before calling.
    A start that fails twice in a row is not tried again on every request: ``ensure_ready()``
    repeats the last error until a pause (10 s, doubling up to 5 min) has passed.
    """

    START_FAILURES_BEFORE_PAUSE = 2
    FIRST_PAUSE = 10.0
    MAX_PAUSE = 300.0

    def __init__(self, model_path: Path, settings: EngineSettings, ctx_size: int, *,
                 name: str = "", pooling: str | None = None, projector: Path | None = None,
                 popen: Callable[..., subprocess.Popen] = popen_tied) -> None:
        self.model_path = Path(model_path)
        self.settings = settings
        self.ctx_size = int(ctx_size)
        self.name = name or self.model_path.stem
        self.pooling = pooling
        self.projector = projector
        self._popen = popen
        self._lock = threading.RLock()
        self._state = EngineState.STOPPED
        self._proc: subprocess.Popen | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=400)
        self._errors: collections.deque[str] = collections.deque(maxlen=20)
        self._reader: threading.Thread | None = None
        # Set once the log reader has taken the engine's "model loaded" line, the last of
        # what LoadReport reads: ready is not declared before the report is whole.
        self._loaded_line = threading.Event()
        self.port: int | None = None
        self.started_at: float | None = None
        self.restarts = 0  # starts after the first one (crash recovery, context changes)
        self._starts = 0
        self.prompt_opens_think = False
        # Crash-loop guard: after START_FAILURES_BEFORE_PAUSE failed starts in a row, the next
        # start waits out a pause (doubling up to MAX_PAUSE) instead of running on every request.
        self.failed_starts = 0
        self.last_error: str | None = None
        self.last_exit: int | None = None
        self._retry_at = 0.0
        self._clock: Callable[[], float] = time.monotonic
        self.report = LoadReport()  # where the model went (devices, buffers, --fit)

    # --- state ---------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        """The current state (a dead process reads as failed)."""
        with self._lock:
            if self._state == EngineState.READY and self._proc and self._proc.poll() is not None:
                return EngineState.FAILED
            return self._state

    @property
    def pid(self) -> int | None:
        """The llama-server process id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def command(self, port: int) -> list[str]:
        """The llama-server command line for this model."""
        s = self.settings
        # -lv 4: the engine then reports each device, its buffers and what --fit chose
        # (LoadReport reads it); it adds a few lines per request, no per-token output.
        cmd = [str(s.binary), "-m", str(self.model_path), "--host", "127.0.0.1",
               "--port", str(port), "-c", str(self.ctx_size), "--parallel", str(s.parallel),
               "--kv-unified", "--jinja", "--reasoning-format", "none", "--no-webui",
               "-b", str(s.batch_size), "--metrics", "-lv", "4"]
        pool = kv_pool_cells(s, self.ctx_size)
        if pool > self.ctx_size:
            # One KV cache of that many cells for all slots, each slot still limited to the
            # model's context: several long conversations decode at once.
            cmd[cmd.index("-c") + 1] = str(pool)
            cmd += ["--kv-unified-per-slot", str(self.ctx_size)]
        if s.cache_ram is not None:
            cmd += ["--cache-ram", str(s.cache_ram)]
        if s.slot_prompt_similarity is not None:
            cmd += ["--slot-prompt-similarity", f"{s.slot_prompt_similarity:g}"]
        if s.threads:
            cmd += ["--threads", str(s.threads)]
        if s.rpc_servers:
            cmd += ["--rpc", ",".join(s.rpc_servers)]
        if s.gpu_layers is not None:
            cmd += ["-ngl", str(s.gpu_layers)]
        if s.tensor_split:
            cmd += ["--tensor-split", ",".join(f"{x:g}" for x in s.tensor_split)]
        if s.main_gpu is not None:
            cmd += ["--main-gpu", str(s.main_gpu)]
        if s.fit_target_mib is not None:
            cmd += ["--fit-target", str(s.fit_target_mib)]
        if s.kv_cache_type != "f16":
            cmd += ["--cache-type-k", s.kv_cache_type, "--cache-type-v", s.kv_cache_type]
        flash = s.flash_attention
        if flash == "auto" and s.kv_cache_type not in ("f16", "f32", "bf16"):
            flash = "on"  # a quantised V cache needs it; "auto" may decide against it
        if flash != "auto":
            cmd += ["-fa", flash]
        if s.embeddings:
            cmd += ["--embeddings", "--pooling", self.pooling or "mean"]
        if self.projector is not None:
            cmd += ["--mmproj", str(self.projector)]
        return cmd + list(s.extra_args)

    def stderr_tail(self, n: int = 8) -> str:
        """The last error-looking lines of llama-server's stderr (or its last lines)."""
        lines = list(self._errors)[-n:] or list(self._stderr)[-n:]
        return " | ".join(_LOG_PREFIX.sub("", line).strip() for line in lines)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        """Keep llama-server's log: its last lines, its error lines, the load report.

        The engine logs a few lines per slot for every request (at 32 slots, about 60 lines as
        a request starts). Handled line by line in Python, that holds the GIL for milliseconds
        just when the request's first token is being relayed. So the log is read in blocks,
        and a block with no error word, read after the engine is up and with debug logging
        off, costs a decode, a split and a search for the error words, all in C."""
        assert proc.stderr is not None
        # This thread owns the pipe and closes it at its end, never another thread: a pipe
        # closed under a reader that is between two reads frees its descriptor number, the
        # next engine's pipe gets that number, and the old reader then reads the new engine's
        # log, lines lost from both (seen: a restarted engine's load report without its KV
        # cache and "model loaded" lines).
        with proc.stderr:
            self._read_blocks(proc.stderr.fileno())

    def _read_blocks(self, fd: int) -> None:
        pending = b""
        while True:
            try:
                block = os.read(fd, 65536)
            except OSError:
                block = b""
            if not block:
                if pending:
                    self._take_lines(pending, each=True)
                return
            block = pending + block
            cut = block.rfind(b"\n") + 1
            if not cut and len(block) < 65536:
                pending = block
                continue
            cut = cut or len(block)
            block, pending = block[:cut], block[cut:]
            each = (self._state == EngineState.STARTING or log.isEnabledFor(logging.DEBUG)
                    or _error_word_in(block))
            self._take_lines(block, each=each)
            if not each:
                # A request's burst of slot lines arrives in many small writes: let them
                # gather in the pipe (64 KiB) instead of waking up for each one while the
                # engine works on the request. failure() waits for the last lines.
                time.sleep(LOG_GATHER_S)

    def _take_lines(self, block: bytes, each: bool) -> None:
        lines = block.decode("utf-8", errors="replace").splitlines()
        self._stderr.extend(lines)
        if not each:
            return
        for line in lines:
            line = line.rstrip()
            if self._state == EngineState.STARTING:
                self.report.feed(line)
                if "model loaded" in line:
                    self._loaded_line.set()
            if _error_word_in(line):
                self._errors.append(line)
            log.debug("[%s] %s", self.name, line)

    def _await_last_lines(self, proc: subprocess.Popen) -> None:
        """Once ``proc`` has exited, wait until its log reader has taken every line it wrote.

        The reader ends at the end of the pipe, which comes as soon as the engine has exited:
        waiting for it is short, however busy the machine is. A fixed short wait was not
        enough: on a loaded machine a loading engine's last lines (hundreds at ``-lv 4``,
        "insufficient memory" among them) were still being read when the exit was judged,
        and a model too big for the machine was reported as a plain crash."""
        reader = self._reader
        if reader is None or proc.poll() is None:
            return
        reader.join(timeout=LOG_DRAIN_TIMEOUT_S)
        if reader.is_alive():
            # Something else holds the engine's stderr open (a child it left): judge by what
            # has been read so far.
            log.warning("llama-server for %s exited but its log did not end within %.0fs",
                        self.name, LOG_DRAIN_TIMEOUT_S)

    def failure(self, message: str) -> EngineFailed:
        """An EngineFailed for ``message``, noting a crash so the next request restarts it."""
        proc = self._proc
        if self._state in (EngineState.STOPPING, EngineState.STOPPED):
            # Not a crash: stop() ended it (shutdown past shutdown_timeout, unload, restart).
            return EngineFailed(f"{message}: the service stopped this engine (it is shutting "
                                f"down, or unloaded or restarted the model)")
        if proc is not None:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                with self._lock:
                    if self._proc is proc:
                        self._state = EngineState.FAILED
                        self.last_exit = code
                message += f" (llama-server {describe_exit(code)})"
                if code < 0:
                    log.error("llama-server for %s was killed by %s: %s", self.name,
                              signal_name(code), describe_exit(code))
            down = self.unusable_workers(timeout=0.5) if self.settings.rpc_servers else []
            if down:
                message += (f"; RPC worker {', '.join(down)} went away: the next request "
                            f"loads the model again once it is back")
        if proc is not None:
            self._await_last_lines(proc)
        tail = self.stderr_tail()
        return EngineFailed(message + (f"; llama-server said: {tail}" if tail else ""))

    # --- life cycle ----------------------------------------------------------------------

    def ensure_ready(self) -> float:
        """Start llama-server if it is not running; return the seconds spent loading."""
        with self._lock:
            if (self._state == EngineState.READY and self._proc is not None
                    and self._proc.poll() is None):
                return 0.0
            began = time.monotonic()
            wait = self.retry_in()
            if wait > 0:
                raise EngineFailed(f"{self.last_error} [not retried for another {wait:.0f}s "
                                   f"after {self.failed_starts} failed starts in a row]")
            if self._proc is not None:
                log.warning("llama-server for %s is not running (state %s); restarting",
                            self.name, self._state.value)
                self._stop_locked()
            last: EngineFailed | None = None
            for _ in range(3):  # a port taken between free_port() and bind() is retried
                try:
                    self._start_locked()
                    self.failed_starts, self.last_error, self._retry_at = 0, None, 0.0
                    return time.monotonic() - began
                except EngineFailed as exc:
                    last = exc
                    if "bind" not in str(exc).lower():
                        break
            assert last is not None
            self.failed_starts += 1
            self.last_error = last.message
            if self.failed_starts >= self.START_FAILURES_BEFORE_PAUSE:
                pause = min(self.MAX_PAUSE, self.FIRST_PAUSE * 2 ** (
                    self.failed_starts - self.START_FAILURES_BEFORE_PAUSE))
                self._retry_at = self._clock() + pause
                log.error("llama-server for %s failed to start %d times in a row; next try in "
                          "%.0fs", self.name, self.failed_starts, pause)
            raise last

    def retry_in(self) -> float:
        """Seconds until a failed engine may be started again (0: now)."""
        return max(0.0, self._retry_at - self._clock()) if self._retry_at else 0.0

    def unusable_workers(self, timeout: float = 2.0) -> list[str]:
        """``endpoint: why`` for each configured RPC worker this engine cannot use now."""
        from .rpc import hello

        out = []
        for endpoint in self.settings.rpc_servers:
            status = hello(endpoint, timeout=timeout)
            if not status.usable:
                out.append(f"{endpoint} ({status.describe()})")
        return out

    def _start_locked(self) -> None:
        down = self.unusable_workers()
        if down:
            # Not a failed start (nothing ran): the pause for crash loops does not apply.
            self._state = EngineState.FAILED
            raise EngineUnavailable(
                f"cannot load {self.name}: RPC worker {', '.join(down)}. Start it (`make "
                f"rpc-worker` on that host) or free it, or remove it from rpc_servers; the next "
                f"request loads the model again")
        port = free_port()
        cmd = self.command(port)
        log.info("starting llama-server for %s on port %d (ctx %d): %s", self.name, port,
                 self.ctx_size, " ".join(cmd))
        self._stderr.clear()
        self._errors.clear()
        self._loaded_line.clear()
        self.report = LoadReport()
        self._state = EngineState.STARTING
        try:
            # GGML_NO_BACKTRACE: an abort (a lost RPC worker, say) exits at once with its
            # message instead of attaching gdb for a backtrace first.
            proc = self._popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        except OSError as exc:
            self._state = EngineState.FAILED
            raise EngineFailed(f"cannot run llama-server {self.settings.binary}: {exc}") from exc
        self._proc = proc
        self.port = port
        if self._starts:
            self.restarts += 1
        self._starts += 1
        self._reader = threading.Thread(target=self._read_stderr, args=(proc,), daemon=True,
                                        name=f"llama-stderr-{self.name}")
        self._reader.start()
        deadline = time.monotonic() + self.settings.startup_timeout
        delay = 0.02
        while True:
            code = proc.poll()
            if code is not None:
                self._await_last_lines(proc)
                self._state = EngineState.FAILED
                self.last_exit = code
                self._reap(proc)
                if code < 0:
                    log.error("llama-server for %s was killed by %s while loading: %s",
                              self.name, signal_name(code), describe_exit(code))
                if self.report.memory_error:
                    raise InsufficientMemory(self._memory_message())
                raise EngineFailed(f"llama-server for {self.name} {describe_exit(code)} "
                                   f"(while loading the model); llama-server said: "
                                   f"{self.stderr_tail() or 'nothing'}")
            status = self._health(port)
            if status == 200:
                # The engine answers before its log reader may have read what it said about
                # its devices and buffers (a loaded machine): /api/ps would miss them.
                if not self._loaded_line.wait(timeout=LOG_DRAIN_TIMEOUT_S):
                    log.warning("llama-server for %s is up, but its log did not say "
                                "'model loaded' within %.0fs: its device report may be "
                                "incomplete", self.name, LOG_DRAIN_TIMEOUT_S)
                break
            if time.monotonic() > deadline:
                self._kill(proc)
                self._state = EngineState.FAILED
                raise EngineFailed(f"llama-server for {self.name} did not become ready in "
                                   f"{self.settings.startup_timeout:.0f}s: {self.stderr_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        self.started_at = time.time()
        self._state = EngineState.READY
        offload = self.report.offload()
        log.info("%s loaded: %s layers of %s offloaded, context %s; devices: %s%s", self.name,
                 offload["layers"], offload["layers_total"], offload["context_length"],
                 "; ".join(f"{d['name']}{'[' + d['endpoint'] + ']' if d['endpoint'] else ''} "
                           f"weights {d['weights_mib']} MiB, KV {d['kv_mib']} MiB, compute "
                           f"{d['compute_mib']} MiB" for d in self.report.devices()) or "-",
                 f"; --fit: {offload['fit_layers']}" if offload["fit_layers"] else "")
        self.prompt_opens_think = self._detect_open_think()
        log.info("llama-server for %s ready (pid %d, port %d)", self.name, proc.pid, port)

    def _memory_message(self) -> str:
        """Ollama's words for a model that does not fit, with what the engine could not get."""
        need = self.report.memory_error or "more"
        free_dev = [d for d in self.report.devices_by_key.values()
                    if d.free_mib is not None and not d.is_host]
        avail = available_memory_bytes() / 2**30
        where = ("; free on the devices: " + ", ".join(
            f"{d.endpoint or d.name} {d.free_mib / 1024:.1f} GiB" for d in free_dev)
            if free_dev else "")
        return (f"model requires more system memory ({need} more for {self.name} with a "
                f"context of {self.ctx_size}) than is available ({avail:.1f} GiB{where}). Use "
                f"a smaller context (num_ctx / default_context_size), fewer parallel slots, "
                f"or spread the model over more devices (rpc_servers, tensor_split)")

    def _health(self, port: int) -> int | None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def _detect_open_think(self) -> bool:
        """True when the chat template's generation prompt opens a ``<think>`` block itself."""
        try:
            out = self.call_json("POST", "/apply-template",
                                 {"messages": [{"role": "user", "content": "x"}]}, timeout=10)
        except ServiceError:
            return False
        return str(out.get("prompt", "")).rstrip().endswith("<think>")

    def stop(self) -> None:
        """Stop llama-server (SIGTERM, then SIGKILL) and reap it. Idempotent."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        proc = self._proc
        if proc is None:
            self._state = EngineState.STOPPED
            return
        self._state = EngineState.STOPPING
        self._kill(proc)
        self._proc = None
        self.port = None
        self._state = EngineState.STOPPED
        log.info("llama-server for %s stopped", self.name)

    @staticmethod
    def _kill(proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        LLAMAExecutor._reap(proc)

    @staticmethod
    def _reap(proc: subprocess.Popen) -> None:
        """Wait for ``proc``'s exit. Its stderr pipe is left to its log reader to close."""
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
