"""Prometheus metrics of one app, fed by the RequestTracker and read at scrape time from the
engines (their slots' KV cache) and the GPUs (``gpu.py``, re-exported here for the dashboard).

Each app gets its own ``CollectorRegistry`` (tests build several apps in one process, and the
global registry would refuse the second set of names). The service's own names start with
``ollama_server_``; vLLM's (``vllm:``) and TGI's (``tgi_``) names are exposed beside them where
they mean the same thing, so dashboards built for those servers keep working:

==================================  ==============================================================
vLLM / TGI name                     here
==================================  ==============================================================
vllm:num_requests_running           requests past the queue (prompt evaluation or generating)
vllm:num_requests_waiting           requests queued or waiting for their model to load
vllm:prompt_tokens_total            prompt tokens of finished requests
vllm:generation_tokens_total        generated tokens of finished requests
vllm:time_to_first_token_seconds    arrival to first generated token
vllm:e2e_request_latency_seconds    arrival to end
vllm:request_queue_time_seconds     arrival to leaving the queue (a model load included)
vllm:request_prompt_tokens          prompt tokens per finished request
vllm:request_generation_tokens      generated tokens per finished request
vllm:time_per_output_token_seconds  a finished request's mean time between tokens (one
                                    observation per request; vLLM observes each interval)
vllm:request_success_total          finished requests by ``finished_reason`` (stop, length, abort)
vllm:kv_cache_usage_perc            per ready engine: the tokens that its slots processing a
                                    request hold in the KV cache, over the cache's size in tokens
                                    (0..1); from llama-server's ``/slots`` at scrape time, an
                                    engine that does not answer in 1 s left out of that scrape.
                                    Idle slots' cached prompts count as free (vLLM counts cached
                                    blocks of finished requests as free too)
vllm:cache_config_info              1 per ready engine, labels ``model_name``, ``block_size`` (1:
                                    llama.cpp has a KV cell per token), ``num_gpu_blocks`` and
                                    ``kv_cache_size_tokens`` (the cache's size in tokens, on
                                    whatever devices hold it), ``cache_dtype`` (kv_cache_type:
                                    f16, q8_0...), ``enable_prefix_caching`` (True: a slot reuses
                                    a cached prompt prefix), ``kv_cache_memory_bytes`` (its KV
                                    buffers, all devices; "None" if unknown). vLLM exports one
                                    series per engine, labelled ``engine`` and every CacheConfig
                                    field (gpu_memory_utilization, swap_space...), without
                                    ``model_name``
tgi_request_count                   requests received (exposed untyped, see below)
tgi_request_success                 requests that completed (exposed untyped, see below)
tgi_request_duration                arrival to end, seconds
tgi_request_queue_duration          arrival to leaving the queue, seconds
tgi_request_inference_duration      leaving the queue to end, seconds
tgi_request_mean_time_per_token_duration  mean time between generated tokens, seconds
tgi_request_generated_tokens        generated tokens per request
tgi_request_input_length            prompt tokens per request
tgi_queue_size                      = vllm:num_requests_waiting
tgi_batch_current_size              = vllm:num_requests_running
==================================  ==============================================================

Per GPU (labels ``gpu``, the index, and ``name``), read through NVML (nvidia-ml-py), else
nvidia-smi, at most every 5 s (``ollama_server/gpu.py``): ``ollama_server_gpu_memory_used_bytes``,
``ollama_server_gpu_memory_total_bytes``, ``ollama_server_gpu_utilization_ratio`` (0..1, the
share of the last sample period in which a kernel ran), ``ollama_server_gpu_temperature_celsius``
and ``ollama_server_gpu_power_watts`` (a value a GPU does not report is left out). Without an
NVIDIA GPU there is no GPU series, and the reason is logged once.

TGI exports ``tgi_request_count`` and ``tgi_request_success`` as counters without the
``_total`` suffix. prometheus_client's text format always appends ``_total`` to a counter's
name, so those two are exposed as ``untyped`` under their exact names: PromQL (``rate()``,
``increase()``) treats them the same.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .core.engine.rpc import hello
from .core.relay import RELAY
from .core.request_tracker import RequestTracker
from .core.schemas import RequestState, RequestStatus
from .gpu import (  # noqa: F401 - re-exported: the API and the dashboard import them here
    MIB,
    GpuDevice,
    GpuSnapshot,
    gpu_snapshot,
    parse_apps_csv,
    parse_gpu_csv,
    read_gpus,
)

log = logging.getLogger(__name__)

# The classic text format: every name here is valid in it, and every Prometheus reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's own bucket edges, so its dashboards' quantiles line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # vLLM's
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000)

WAITING_STATES = (RequestState.QUEUED, RequestState.LOADING)
# vLLM's finished_reason values for our final states / finish reasons.
_VLLM_REASONS = {"stop": "stop", "stop_sequence": "stop", "tool_calls": "stop",
                 "length": "length"}


def vllm_finished_reason(status: RequestStatus) -> str:
    """vLLM's ``finished_reason`` label for a finished request: stop, length or abort."""
    if status.state != RequestState.COMPLETED:
        return "abort"
    return _VLLM_REASONS.get(status.finish_reason or "stop", "stop")


class ServiceMetrics:
    """The metrics of one app: counters and histograms updated from tracker events, gauges
    (in flight, waiting, loaded models, KV cache, engine restarts, GPUs) read at scrape time.

    ``slots`` reads an engine's ``/slots`` (port, timeout) → its slots or None; a seam for
    tests."""

    def __init__(self, tracker: RequestTracker, manager: Any,
                 registry: CollectorRegistry | None = None,
                 slots: Callable[[int, float], list[dict[str, Any]] | None] | None = None
                 ) -> None:
        # The ``*_created`` timestamp series double the exposition and no dashboard reads them
        # (vLLM and TGI dashboards included); process-wide, which is this service's only use.
        disable_created_metrics()
        self.tracker = tracker
        self.manager = manager
        self.read_slots = slots or read_slots
        self.relayed_by_workers = 0  # streams the engine pool's workers relayed (several)
        self.registry = registry or CollectorRegistry()
        r = self.registry
        by_model = ["dialect", "model"]
        self.requests = Counter("ollama_server_requests", "Finished requests",
                                [*by_model, "status"], registry=r)
        self.ttft = Histogram("ollama_server_time_to_first_token_seconds",
                              "Seconds from arrival to the first generated token", by_model,
                              buckets=TTFT_BUCKETS, registry=r)
        self.duration = Histogram("ollama_server_request_duration_seconds",
                                  "Seconds from arrival to the end of the request", by_model,
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ollama_server_prompt_tokens", "Prompt tokens processed",
                                     by_model, registry=r)
        self.generated_tokens = Counter("ollama_server_generated_tokens", "Tokens generated",
                                        by_model, registry=r)
        # vLLM's names (label model_name, as vLLM's exporter does).
        self.vllm_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                   ["model_name"], registry=r)
        self.vllm_generation = Counter("vllm:generation_tokens",
                                       "Number of generation tokens processed.",
                                       ["model_name"], registry=r)
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds",
                                   "Histogram of time to first token in seconds.",
                                   ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds",
                                  "Histogram of e2e request latency in seconds.",
                                  ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.vllm_success = Counter("vllm:request_success", "Count of finished requests.",
                                    ["model_name", "finished_reason"], registry=r)
        self.vllm_queue = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.vllm_prompt_tokens = Histogram("vllm:request_prompt_tokens",
                                            "Number of prefill tokens processed.",
                                            ["model_name"], buckets=TOKEN_BUCKETS, registry=r)
        self.vllm_generation_tokens = Histogram("vllm:request_generation_tokens",
                                                "Number of generation tokens processed.",
                                                ["model_name"], buckets=TOKEN_BUCKETS,
                                                registry=r)
        self.vllm_tpot = Histogram("vllm:time_per_output_token_seconds",
                                   "Histogram of time per output token in seconds.",
                                   ["model_name"], buckets=TPOT_BUCKETS, registry=r)
        # TGI's names (no labels: a TGI server serves one model).
        self.tgi_duration = Histogram("tgi_request_duration", "Request duration (seconds)",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.tgi_generated = Histogram("tgi_request_generated_tokens",
                                       "Generated tokens per request", buckets=TOKEN_BUCKETS,
                                       registry=r)
        self.tgi_input = Histogram("tgi_request_input_length", "Input tokens per request",
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.tgi_queue = Histogram("tgi_request_queue_duration",
                                   "Time spent in the queue per request (seconds)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.tgi_inference = Histogram("tgi_request_inference_duration",
                                       "Request inference duration (seconds)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.tgi_tpot = Histogram("tgi_request_mean_time_per_token_duration",
                                  "Mean time per token per request (seconds)",
                                  buckets=TPOT_BUCKETS, registry=r)
        # Callers by the name of their API key (never the key).
        self.key_requests = Counter("ollama_server_key_requests",
                                    "Finished requests by API key name", ["key", "status"],
                                    registry=r)
        self.key_refused = Counter("ollama_server_key_refused",
                                   "Requests refused over the per-key limit "
                                   "(max_requests_per_key)", ["key"], registry=r)
        self._lock = threading.Lock()
        # Labelled children by (metric, label values): prometheus_client's labels() checks
        # and joins its arguments under a lock on every call (a few µs; ten per request).
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._tgi_count = 0
        self._tgi_success = 0
        self._restarts_total = 0
        self._restarts_seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        r.register(_LiveCollector(self))
        tracker.subscribe(self.observe)

    # --- events --------------------------------------------------------------------------

    def _of(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label set."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, event: str, status: RequestStatus) -> None:
        """Tracker observer: count a request on start, its TTFT, and its end."""
        model = status.model
        if event == "start":
            with self._lock:
                self._tgi_count += 1
        elif event == "first_token" and status.ttft_ms is not None:
            seconds = status.ttft_ms / 1000.0
            self._of(self.ttft, status.dialect, model).observe(seconds)
            self._of(self.vllm_ttft, model).observe(seconds)
        elif event == "finish":
            self._finished(status)
        elif event == "refused" and status.caller:
            self._of(self.key_refused, status.caller).inc()

    def _finished(self, status: RequestStatus) -> None:
        model, dialect = status.model, status.dialect
        elapsed = status.elapsed_s
        self._of(self.requests, dialect, model, status.state.value).inc()
        self._of(self.duration, dialect, model).observe(elapsed)
        self._of(self.prompt_tokens, dialect, model).inc(status.prompt_tokens)
        self._of(self.generated_tokens, dialect, model).inc(status.tokens_generated)
        self._of(self.vllm_prompt, model).inc(status.prompt_tokens)
        self._of(self.vllm_generation, model).inc(status.tokens_generated)
        self._of(self.vllm_e2e, model).observe(elapsed)
        self._of(self.vllm_success, model, vllm_finished_reason(status)).inc()
        self.tgi_duration.observe(elapsed)
        self.tgi_generated.observe(status.tokens_generated)
        self.tgi_input.observe(status.prompt_tokens)
        self._of(self.vllm_prompt_tokens, model).observe(status.prompt_tokens)
        self._of(self.vllm_generation_tokens, model).observe(status.tokens_generated)
        queue = status.queue_s
        if queue is not None:
            self._of(self.vllm_queue, model).observe(queue)
            self.tgi_queue.observe(queue)
            self.tgi_inference.observe(max(0.0, elapsed - queue))
        tpot = status.time_per_output_token_s
        if tpot is not None:
            self._of(self.vllm_tpot, model).observe(tpot)
            self.tgi_tpot.observe(tpot)
        if status.state == RequestState.COMPLETED:
            with self._lock:
                self._tgi_success += 1
        if status.caller:
            self._of(self.key_requests, status.caller, status.state.value).inc()
        # An engine that restarted may be unloaded before the next scrape: count it now.
        self.engine_restarts()

    # --- scrape-time values ----------------------------------------------------------------

    def engine_restarts(self) -> int:
        """Engine restarts since the app started, monotonic (unloaded engines keep counting)."""
        try:
            engines = [entry.engine for entry in self.manager.loaded()]
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            engines = []
        with self._lock:
            for engine in engines:
                seen = self._restarts_seen.get(engine, 0)
                now = int(getattr(engine, "restarts", 0) or 0)
                if now > seen:
                    self._restarts_total += now - seen
                    self._restarts_seen[engine] = now
                elif engine not in self._restarts_seen:
                    self._restarts_seen[engine] = now
            return self._restarts_total

    def tgi_counts(self) -> tuple[int, int]:
        """(requests received, requests completed), TGI's two plain counters."""
        with self._lock:
            return self._tgi_count, self._tgi_success

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's registry."""
        return generate_latest(self.registry)


def split_active(active: list[RequestStatus]) -> tuple[dict[str, int], dict[str, int]]:
    """(running, waiting) request counts by model; waiting = queued or loading its model."""
    running: dict[str, int] = {}
    waiting: dict[str, int] = {}
    for status in active:
        bucket = waiting if status.state in WAITING_STATES else running
        bucket[status.model] = bucket.get(status.model, 0) + 1
    return running, waiting


class _LiveCollector:
    """Gauges computed from the tracker and the manager at each scrape."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        # Described as nothing so registering does not call collect() (no scrape at startup).
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.m
        running, waiting = split_active(m.tracker.active())
        try:
            loaded = m.manager.loaded()
        except Exception:  # noqa: BLE001 - a scrape reports what it can
            loaded = []
        models = sorted({e.info.name for e in loaded} | set(running) | set(waiting))

        in_flight = GaugeMetricFamily("ollama_server_requests_in_flight",
                                      "Requests in flight (waiting or running)", labels=["model"])
        waiting_g = GaugeMetricFamily("ollama_server_requests_waiting",
                                      "Requests queued or waiting for their model to load",
                                      labels=["model"])
        v_running = GaugeMetricFamily("vllm:num_requests_running",
                                      "Number of requests in model execution batches.",
                                      labels=["model_name"])
        v_waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                      "Number of requests waiting to be processed.",
                                      labels=["model_name"])
        for name in models:
            run, wait = running.get(name, 0), waiting.get(name, 0)
            in_flight.add_metric([name], run + wait)
            waiting_g.add_metric([name], wait)
            v_running.add_metric([name], run)
            v_waiting.add_metric([name], wait)
        yield from (in_flight, waiting_g, v_running, v_waiting)

        yield GaugeMetricFamily("tgi_queue_size", "Requests waiting in the queue",
                                value=sum(waiting.values()))
        yield GaugeMetricFamily("tgi_batch_current_size", "Requests in the current batch",
                                value=sum(running.values()))
        count, success = m.tgi_counts()
        for name, doc, value in (("tgi_request_count", "Requests received", count),
                                 ("tgi_request_success", "Requests completed", success)):
            metric = Metric(name, doc, "unknown")
            metric.add_sample(name, {}, value)
            yield metric

        yield from queue_metrics(m.manager)
        yield CounterMetricFamily("ollama_server_relay_streams",
                                  "Streams relayed by the relay thread after their first token "
                                  "(relay_thread)",
                                  value=RELAY.streams + m.relayed_by_workers)

        loaded_g = GaugeMetricFamily("ollama_server_models_loaded", "Models with an engine")
        loaded_g.add_metric([], len(loaded))
        yield loaded_g
        per_model = GaugeMetricFamily("ollama_server_model_loaded",
                                      "1 per loaded model, with its engine state and context",
                                      labels=["model", "state", "context_length"])
        for entry in loaded:
            state = getattr(getattr(entry.engine, "state", None), "value", "unknown")
            per_model.add_metric([entry.info.name, str(state), str(entry.ctx_size)], 1)
        yield per_model
        yield from kv_cache_metrics(loaded, m.read_slots)

        device_mem = GaugeMetricFamily(
            "ollama_server_device_memory_bytes",
            "Memory a loaded model holds on each device (weights, kv, compute)",
            labels=["model", "device", "endpoint", "kind"])
        device_free = GaugeMetricFamily(
            "ollama_server_device_free_bytes",
            "Free memory each device reported when the model was loaded",
            labels=["model", "device", "endpoint"])
        for entry in loaded:
            report = getattr(entry.engine, "report", None)
            for dev in report.devices() if report is not None else []:
                labels = [entry.info.name, dev["name"], dev["endpoint"] or ""]
                for kind in ("weights", "kv", "compute"):
                    device_mem.add_metric(labels + [kind], dev[f"{kind}_mib"] * MIB)
                if dev["free_mib"] is not None:
                    device_free.add_metric(labels, dev["free_mib"] * MIB)
        yield device_mem
        yield device_free
        workers = m.manager.rpc_workers() if hasattr(m.manager, "rpc_workers") else []
        if workers:
            up = GaugeMetricFamily("ollama_server_rpc_worker_up",
                                   "1 when the RPC worker accepts connections",
                                   labels=["endpoint"])
            in_use = m.manager.workers_in_use()
            for endpoint in workers:  # one held by a running engine is up without a probe
                alive = endpoint in in_use or hello(endpoint, timeout=0.5).state in (
                    "ready", "busy")
                up.add_metric([endpoint], 1.0 if alive else 0.0)
            yield up

        restarts = Metric("ollama_server_engine_restarts", "llama-server restarts", "counter")
        restarts.add_sample("ollama_server_engine_restarts_total", {}, m.engine_restarts())
        yield restarts

        yield from gpu_metrics(gpu_snapshot())


def gpu_metrics(gpus: GpuSnapshot | None) -> Iterator[Metric]:
    """Per GPU: memory used and total, utilisation, temperature, power; nothing without a GPU
    (a value the GPU does not report is left out)."""
    if gpus is None:
        return
    labels = ["gpu", "name"]
    used = GaugeMetricFamily("ollama_server_gpu_memory_used_bytes", "GPU memory in use",
                             labels=labels)
    total = GaugeMetricFamily("ollama_server_gpu_memory_total_bytes", "GPU memory",
                              labels=labels)
    util = GaugeMetricFamily("ollama_server_gpu_utilization_ratio",
                             "Share of the last sample period in which a kernel ran on the "
                             "GPU (0..1)", labels=labels)
    temperature = GaugeMetricFamily("ollama_server_gpu_temperature_celsius",
                                    "GPU core temperature", labels=labels)
    power = GaugeMetricFamily("ollama_server_gpu_power_watts", "GPU power draw",
                              labels=labels)
    for gpu in gpus.devices:
        values = [str(gpu.index), gpu.name]
        used.add_metric(values, gpu.used_mib * MIB)
        total.add_metric(values, gpu.total_mib * MIB)
        for family, value in ((util, gpu.utilization), (temperature, gpu.temperature_c),
                              (power, gpu.power_w)):
            if value is not None:
                family.add_metric(values, value)
    yield from (f for f in (used, total, util, temperature, power) if f.samples)


# --- the engines' KV cache (llama-server's /slots) ------------------------------------------

SLOTS_TIMEOUT_S = 1.0  # an engine that answers later (busy, stuck) is left out of the scrape
# vLLM's CacheConfig fields that mean something for llama-server (vLLM's label names).
CACHE_CONFIG_LABELS = ("model_name", "block_size", "cache_dtype", "enable_prefix_caching",
                       "kv_cache_memory_bytes", "kv_cache_size_tokens", "num_gpu_blocks")


def read_slots(port: int, timeout: float = SLOTS_TIMEOUT_S) -> list[dict[str, Any]] | None:
    """llama-server's ``GET /slots`` on ``port``: per slot ``n_ctx``, ``is_processing`` and,
    once it has had a task, ``n_prompt_tokens`` (the tokens in its KV cells: prompt and
    generated so far). None when the engine does not answer within ``timeout`` (it answers
    between two decode steps), is gone, or answers anything but a list."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/slots")
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if resp.status != 200:  # 501: started with --no-slots
        return None
    try:
        slots = json.loads(body)
    except ValueError:
        return None
    return slots if isinstance(slots, list) else None


def kv_cache_usage(slots: list[dict[str, Any]], cells: int) -> float:
    """vLLM's ``kv_cache_usage_perc`` from an engine's slots: the tokens that the slots
    processing a request hold, over the KV cache's ``cells`` (its context), 0..1.

    An idle slot's cached prompt counts as free, as vLLM counts the cached blocks of finished
    requests: llama-server saves it to its prompt cache in RAM and clears it when a new task
    starts (``--cache-idle-slots``, on by default)."""
    if cells <= 0:
        return 0.0
    held = sum(int(slot.get("n_prompt_tokens") or 0) for slot in slots
               if slot.get("is_processing"))
    return min(1.0, held / cells)


def _ready(entry: Any) -> bool:
    engine = entry.engine
    state = getattr(getattr(engine, "state", None), "value", None)
    return state == "ready" and getattr(engine, "port", None) is not None


def kv_cells(entry: Any) -> int:
    """The KV cache's size in tokens: the context the engine reported, else the one asked."""
    report = getattr(entry.engine, "report", None)
    return int(getattr(report, "n_ctx", None) or entry.ctx_size)


def cache_config_labels(entry: Any) -> list[str]:
    """The values of ``CACHE_CONFIG_LABELS`` for a loaded model.

    llama.cpp keeps one KV cell per token (``block_size`` 1), so ``num_gpu_blocks`` is the
    cache's size in tokens, wherever its layers are (GPU, RPC device or CPU), and
    ``num_gpu_blocks * block_size`` is its capacity as vLLM's readers compute it."""
    engine = entry.engine
    cells = kv_cells(entry)
    report = getattr(engine, "report", None)
    kv_mib = sum(d["kv_mib"] for d in report.devices()) if report is not None else 0.0
    settings = getattr(engine, "settings", None)
    return [entry.info.name, "1", str(getattr(settings, "kv_cache_type", None) or "f16"),
            "True",  # every generation request asks for cache_prompt (a prefix is reused)
            str(int(kv_mib * MIB)) if kv_mib else "None", str(cells), str(cells)]


def kv_cache_metrics(loaded: list[Any],
                     read: Callable[[int, float], list[dict[str, Any]] | None]
                     ) -> Iterator[Metric]:
    """``vllm:kv_cache_usage_perc`` and ``vllm:cache_config_info`` for each loaded model whose
    engine is ready; the /slots of several engines are read at once. An engine that does
    not answer in ``SLOTS_TIMEOUT_S`` has no usage sample in this scrape."""
    ready = [entry for entry in loaded if _ready(entry)]

    def usage_of(entry: Any) -> float | None:
        try:
            slots = read(entry.engine.port, SLOTS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a scrape reports what it can
            return None
        return None if slots is None else kv_cache_usage(slots, kv_cells(entry))

    if len(ready) > 1:
        with ThreadPoolExecutor(max_workers=min(len(ready), 16),
                                thread_name_prefix="metrics-slots") as pool:
            usages = list(pool.map(usage_of, ready))
    else:
        usages = [usage_of(entry) for entry in ready]
    usage = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                              "KV-cache usage. 1 means 100 percent usage.",
                              labels=["model_name"])
    info = GaugeMetricFamily("vllm:cache_config_info",
                             "Information of the LLMEngine CacheConfig",
                             labels=list(CACHE_CONFIG_LABELS))
    for entry, value in zip(ready, usages, strict=True):
        if value is not None:
            usage.add_metric([entry.info.name], value)
        try:
            info.add_metric(cache_config_labels(entry), 1)
        except Exception:  # noqa: BLE001 - a scrape reports what it can
            log.debug("no cache_config_info for %s", entry.info.name, exc_info=True)
    yield usage
    yield info


def queue_metrics(manager: Any) -> Iterator[Metric]:
    """The slot queues of the models (max_queue): length, busy slots, refusals, departures."""
    try:
        queues = manager.queue.snapshot()
    except AttributeError:  # a manager without queues (unit tests' stand-ins)
        return
    length = GaugeMetricFamily("ollama_server_queue_length",
                               "Requests waiting for a slot of the model", labels=["model"])
    busy = GaugeMetricFamily("ollama_server_slots_busy", "Slots of the model in use",
                             labels=["model"])
    refused = CounterMetricFamily("ollama_server_queue_refused",
                                  "Requests refused because the model's queue was full "
                                  "(max_queue) or the wait ran past request_timeout",
                                  labels=["model"])
    abandoned = CounterMetricFamily("ollama_server_queue_abandoned",
                                    "Queued requests whose client went away", labels=["model"])
    for name, q in queues.items():
        length.add_metric([name], q["waiting"])
        busy.add_metric([name], q["busy"])
        refused.add_metric([name], q["refused"])
        abandoned.add_metric([name], q["abandoned"])
    yield from (length, busy, refused, abandoned)


# --- tokens/s over time (the dashboard's chart) ---------------------------------------------

CHART_WINDOW_S = 300.0
CHART_BIN_S = 5.0


def throughput_series(statuses: Iterable[RequestStatus], now: float,
                      window_s: float = CHART_WINDOW_S, bin_s: float = CHART_BIN_S
                      ) -> list[float]:
    """Generated tokens/s in each ``bin_s`` slice of the last ``window_s`` seconds, oldest
    first, the last slice ending at ``now`` (monotonic clock, as the tracker's times).

    Each request's tokens are spread evenly between its first token and its end (or ``now``
    while it runs): decoding runs at a near-constant speed, and the tracker keeps no per-token
    times. Only requests the tracker still holds (active and its bounded history) count.
    """
    n = max(1, int(window_s // bin_s))
    start = now - n * bin_s
    tokens = [0.0] * n
    for status in statuses:
        first, count = status.first_token_at, status.tokens_generated
        if first is None or count <= 0:
            continue
        end = min(status.finished_at or now, now)
        if end <= start:
            continue
        if end - first <= 1e-6:  # every token at one instant
            index = int((first - start) // bin_s)
            if 0 <= index < n:
                tokens[index] += count
            continue
        rate = count / (end - first)
        lo_index = max(0, int((max(first, start) - start) // bin_s))
        hi_index = min(n - 1, int((end - start) // bin_s))
        for i in range(lo_index, hi_index + 1):
            lo, hi = start + i * bin_s, start + (i + 1) * bin_s
            overlap = min(hi, end) - max(lo, first)
            if overlap > 0:
                tokens[i] += rate * overlap
    return [round(t / bin_s, 2) for t in tokens]
