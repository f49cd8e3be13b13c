"""The metrics a gateway reads (issue 21): vLLM's KV-cache gauges from llama-server's /slots,
and the GPUs through NVML (a stand-in pynvml module), nvidia-smi, or none (for real here)."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ollama_server import gpu
from ollama_server.core.engine import EngineSettings, EngineState
from ollama_server.core.engine.report import LoadReport
from ollama_server.core.request_tracker import RequestTracker
from ollama_server.metrics import (
    SLOTS_TIMEOUT_S,
    GpuSnapshot,
    ServiceMetrics,
    gpu_metrics,
    kv_cache_usage,
    parse_gpu_csv,
    read_slots,
)
from ollama_server.models.pool import LoadedModel
from tests.helpers import host_gpus

MIB = 1024 * 1024


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def of(found: dict, name: str) -> dict[tuple, float]:
    """The samples named ``name``: labels → value."""
    return {labels: value for (n, labels), value in found.items() if n == name}


# --- kv_cache_usage (pure) -------------------------------------------------------------------

IDLE = {"id": 0, "n_ctx": 8192, "speculative": False, "is_processing": False}
# An idle slot that served a request keeps its tokens cached: they count as free.
SERVED = {**IDLE, "id": 1, "id_task": 3, "n_prompt_tokens": 900}


def busy(tokens: int, slot: int = 2) -> dict:
    """A slot processing a request, as llama-server's /slots shows it (params left out)."""
    return {**IDLE, "id": slot, "is_processing": True, "id_task": 7, "n_prompt_tokens": tokens,
            "n_prompt_tokens_processed": 9, "n_prompt_tokens_cache": 24,
            "next_token": [{"has_next_token": True, "n_remain": 2999, "n_decoded": 1}]}


@pytest.mark.parametrize("slots, cells, expected", [
    ([], 8192, 0.0),
    ([IDLE, IDLE], 8192, 0.0),
    ([IDLE, SERVED], 8192, 0.0),
    ([busy(34), SERVED], 8192, 34 / 8192),
    ([busy(1024), busy(3072, slot=3), IDLE], 8192, 0.5),
    ([busy(5000), busy(5000, slot=3)], 8192, 1.0),  # never above 1
    ([{**busy(0), "n_prompt_tokens": None}], 8192, 0.0),
    ([busy(10)], 0, 0.0),
])
def test_kv_cache_usage(slots, cells, expected):
    assert kv_cache_usage(slots, cells) == expected


# --- read_slots against a small HTTP server -----------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b"[]"

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def engine_http():
    """A local HTTP server standing in for llama-server: (its port, set(status, body))."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.paths = []
    handler = type("H", (_Handler,), {})
    server.RequestHandlerClass = handler

    def answer(status: int, body: bytes) -> None:
        handler.status, handler.body = status, body

    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, answer
    server.shutdown()
    server.server_close()


def test_read_slots_reads_the_engine_list(engine_http):
    server, answer = engine_http
    answer(200, json.dumps([IDLE, busy(34)]).encode())
    assert read_slots(server.server_address[1]) == [IDLE, busy(34)]
    assert server.paths == ["/slots"]


@pytest.mark.parametrize("status, body", [
    (501, b'{"error": {"message": "This server does not support slots endpoint."}}'),
    (200, b'{"not": "a list"}'),
    (200, b"not json"),
    (503, b'{"error": {"message": "Loading model"}}'),
])
def test_read_slots_none_for_other_answers(engine_http, status, body):
    server, answer = engine_http
    answer(status, body)
    assert read_slots(server.server_address[1]) is None


def test_read_slots_gives_up_on_a_silent_engine_after_its_timeout():
    with socket.socket() as listener:  # accepts (the backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        start = time.monotonic()
        assert read_slots(listener.getsockname()[1], timeout=0.2) is None
        assert time.monotonic() - start < 2


def test_read_slots_none_when_the_engine_is_gone():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    assert read_slots(port) is None


# --- ServiceMetrics: vllm:kv_cache_usage_perc and vllm:cache_config_info ----------------------

LOAD_LOG = [  # llama-server's own lines (-lv 4), as LoadReport reads them
    "llama_kv_cache: CUDA0 KV buffer size =   120.00 MiB",
    "llama_kv_cache:        CPU KV buffer size =    60.00 MiB",
    "llama_context: n_ctx                 = 6144",
]


class Engine(SimpleNamespace):
    """A running engine as the metrics see it (weak-referenceable, as executors are)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def entry(name: str, port: int | None, state: EngineState = EngineState.READY,
          kv_cache_type: str = "q8_0", log: list[str] = LOAD_LOG, ctx: int = 8192
          ) -> LoadedModel:
    report = LoadReport()
    for line in log:
        report.feed(line)
    engine = Engine(name=name, state=state, port=port, ctx_size=ctx, restarts=0, report=report,
                    pid=None, settings=EngineSettings(binary=Path("/bin/true"),
                                                      kv_cache_type=kv_cache_type))
    return LoadedModel(info=SimpleNamespace(name=name), engine=engine,  # type: ignore[arg-type]
                       loaded_at=0.0, last_used=0.0, expires_at=None, keep_alive=300.0)


class Manager:
    def __init__(self, loaded: list[LoadedModel]) -> None:
        self._loaded = loaded

    def loaded(self) -> list[LoadedModel]:
        return self._loaded


def render(loaded: list[LoadedModel], slots) -> dict:
    metrics = ServiceMetrics(RequestTracker(), Manager(loaded), slots=slots)
    return samples(metrics.render().decode())


def config_labels(model: str, **changes: str) -> tuple:
    labels = {"model_name": model, "block_size": "1", "cache_dtype": "q8_0",
              "enable_prefix_caching": "True", "kv_cache_memory_bytes": str(180 * MIB),
              "kv_cache_size_tokens": "6144", "num_gpu_blocks": "6144", **changes}
    return tuple(sorted(labels.items()))


def test_kv_cache_gauges_per_ready_engine():
    answers = {5001: [busy(1536), busy(1536, slot=3), SERVED], 5002: [IDLE, IDLE]}
    asked = []

    def slots(port, timeout):
        asked.append((port, timeout))
        return answers[port]

    found = render([entry("a:1b", 5001), entry("b:7b", 5002, kv_cache_type="f16"),
                    entry("loading:3b", 5003, state=EngineState.STARTING)], slots)
    # Tokens of the processing slots over the cells the engine reported (n_ctx 6144).
    assert of(found, "vllm:kv_cache_usage_perc") == {(("model_name", "a:1b"),): 0.5,
                                                    (("model_name", "b:7b"),): 0.0}
    assert of(found, "vllm:cache_config_info") == {
        config_labels("a:1b"): 1.0, config_labels("b:7b", cache_dtype="f16"): 1.0}
    assert sorted(asked) == [(5001, SLOTS_TIMEOUT_S), (5002, SLOTS_TIMEOUT_S)]


def test_an_engine_that_does_not_answer_only_loses_its_usage_sample():
    def slots(port, timeout):
        if port == 5002:
            raise RuntimeError("a bug in the reader must not fail the scrape")
        return None if port == 5001 else [busy(600)]

    found = render([entry("slow", 5001), entry("broken", 5002), entry("fine", 5003)], slots)
    assert of(found, "vllm:kv_cache_usage_perc") == {(("model_name", "fine"),): 600 / 6144}
    assert {dict(k)["model_name"] for k in of(found, "vllm:cache_config_info")} == {
        "slow", "broken", "fine"}


def test_cache_config_without_a_load_report_uses_the_context_asked_for():
    found = render([entry("cpu", 5001, kv_cache_type="f16", log=[], ctx=4096)],
                   lambda port, timeout: [busy(1024)])
    assert of(found, "vllm:cache_config_info") == {config_labels(
        "cpu", cache_dtype="f16", kv_cache_memory_bytes="None", kv_cache_size_tokens="4096",
        num_gpu_blocks="4096"): 1.0}
    assert of(found, "vllm:kv_cache_usage_perc") == {(("model_name", "cpu"),): 0.25}


def test_no_engine_no_samples_and_no_reads():
    def slots(port, timeout):
        raise AssertionError("no engine is ready: nothing to ask")

    found = render([entry("stopped", None, state=EngineState.FAILED)], slots)
    assert of(found, "vllm:kv_cache_usage_perc") == {}
    assert of(found, "vllm:cache_config_info") == {}


def test_the_real_reader_against_an_engine_stand_in(engine_http):
    server, answer = engine_http
    answer(200, json.dumps([busy(3072), IDLE]).encode())
    metrics = ServiceMetrics(RequestTracker(), Manager([entry("m", server.server_address[1])]))
    found = samples(metrics.render().decode())
    assert of(found, "vllm:kv_cache_usage_perc") == {(("model_name", "m"),): 0.5}


# --- GPUs through NVML (a stand-in pynvml module) ---------------------------------------------

class NVMLError(Exception):
    """What pynvml raises (NVMLError_NotSupported, NVMLError_LibraryNotFound...)."""


def fake_pynvml(gpus: list[dict], count_error: Exception | None = None,
                init_error: Exception | None = None) -> SimpleNamespace:
    """A module object with pynvml's functions over ``gpus`` (a missing key raises
    NVMLError, as an unsupported value does)."""
    nvml = SimpleNamespace(NVML_TEMPERATURE_GPU=0, inits=0)

    def value(handle: int, key: str):
        if key not in gpus[handle]:
            raise NVMLError("Not Supported")
        return gpus[handle][key]

    def init():
        if init_error is not None:
            raise init_error
        nvml.inits += 1

    def count():
        if count_error is not None:
            raise count_error
        return len(gpus)

    def temperature(handle, sensor):
        assert sensor == nvml.NVML_TEMPERATURE_GPU
        return value(handle, "temperature")

    nvml.nvmlInit = init
    nvml.nvmlDeviceGetCount = count
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda h: value(h, "name")
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(
        used=value(h, "used"), total=value(h, "total"), free=value(h, "total") - value(h, "used"))
    nvml.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=value(h, "util"),
                                                                   memory=0)
    nvml.nvmlDeviceGetTemperature = temperature
    nvml.nvmlDeviceGetPowerUsage = lambda h: value(h, "milliwatts")
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in value(h, "procs")]
    return nvml


H100 = {"name": "NVIDIA H100 80GB HBM3", "used": 1234 * MIB, "total": 81559 * MIB, "util": 37,
        "temperature": 61, "milliwatts": 245_500, "procs": [(4242, 900 * MIB), (77, None)]}
# An older board: bytes for its name, no utilisation or power reading.
JETSON = {"name": b"Orin, 64GB", "used": 10 * MIB, "total": 24564 * MIB, "temperature": 40,
          "procs": [(4242, 100 * MIB)]}


def no_smi() -> tuple[None, str]:
    return None, "nvidia-smi not found"


def test_nvml_reads_every_gpu_and_the_memory_of_each_process():
    nvml = fake_pynvml([H100, JETSON])
    snapshot = gpu.GpuReader(load_nvml=lambda: nvml, smi=no_smi).read()
    assert snapshot is not None
    assert [(d.index, d.name, d.used_mib, d.total_mib, d.utilization, d.temperature_c,
             d.power_w) for d in snapshot.devices] == [
        (0, "NVIDIA H100 80GB HBM3", 1234.0, 81559.0, 0.37, 61.0, 245.5),
        (1, "Orin, 64GB", 10.0, 24564.0, None, 40.0, None)]
    # pid 4242 holds memory on both GPUs; pid 77's is not available.
    assert snapshot.by_pid == {4242: 1000.0}
    assert snapshot.to_dict()["devices"][0] == {
        "index": 0, "name": "NVIDIA H100 80GB HBM3", "used_mib": 1234.0, "total_mib": 81559.0,
        "utilization": 0.37, "temperature_c": 61.0, "power_w": 245.5}


def test_gpu_series_from_a_snapshot():
    nvml = fake_pynvml([H100, JETSON])
    snapshot = gpu.GpuReader(load_nvml=lambda: nvml, smi=no_smi).read()
    found = {}
    for family in gpu_metrics(snapshot):
        for s in family.samples:
            found[(s.name, s.labels["gpu"], s.labels["name"])] = s.value
    h100, jetson = ("0", "NVIDIA H100 80GB HBM3"), ("1", "Orin, 64GB")
    assert found == {
        ("ollama_server_gpu_memory_used_bytes", *h100): 1234 * MIB,
        ("ollama_server_gpu_memory_total_bytes", *h100): 81559 * MIB,
        ("ollama_server_gpu_utilization_ratio", *h100): 0.37,
        ("ollama_server_gpu_temperature_celsius", *h100): 61.0,
        ("ollama_server_gpu_power_watts", *h100): 245.5,
        ("ollama_server_gpu_memory_used_bytes", *jetson): 10 * MIB,
        ("ollama_server_gpu_memory_total_bytes", *jetson): 24564 * MIB,
        ("ollama_server_gpu_temperature_celsius", *jetson): 40.0,
    }
    assert list(gpu_metrics(None)) == []


def test_nvml_is_initialised_once_per_process(monkeypatch):
    nvml = fake_pynvml([H100])
    reader = gpu.GpuReader(load_nvml=lambda: nvml, smi=no_smi)
    for _ in range(3):
        assert reader.read() is not None
    assert nvml.inits == 1
    monkeypatch.setattr(gpu.os, "getpid", lambda: -1)  # as in a forked child
    assert reader.read() is not None
    assert nvml.inits == 2


def test_without_nvml_nvidia_smi_answers(caplog):
    smi_snapshot = GpuSnapshot(parse_gpu_csv("0, Tesla T4, 100, 15360, 5, 40, 27.8", stats=True),
                               {99: 100.0})

    def missing():
        raise ImportError("No module named 'pynvml'")

    with caplog.at_level(logging.DEBUG, logger="ollama_server.gpu"):
        reader = gpu.GpuReader(load_nvml=missing, smi=lambda: (smi_snapshot, ""))
        assert reader.read() is smi_snapshot
    assert not [r for r in caplog.records if "no NVIDIA GPU" in r.getMessage()]


@pytest.mark.parametrize("nvml, reason", [
    (fake_pynvml([], init_error=NVMLError("NVML Shared Library Not Found")),
     "NVML not found (NVML Shared Library Not Found)"),
    (fake_pynvml([]), "NVML lists no GPU"),
    (fake_pynvml([H100], count_error=NVMLError("GPU is lost")), "NVML failed (GPU is lost)"),
])
def test_no_gpu_is_said_once_with_its_reason(caplog, nvml, reason):
    reader = gpu.GpuReader(load_nvml=lambda: nvml, smi=no_smi)
    with caplog.at_level(logging.DEBUG, logger="ollama_server.gpu"):
        assert [reader.read() for _ in range(4)] == [None] * 4
    said = [r for r in caplog.records if "no NVIDIA GPU" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (logging.INFO, f"no NVIDIA GPU: {reason}, nvidia-smi not found; /metrics has no GPU "
                       f"series")]


def test_parse_gpu_csv_with_stats():
    text = ("0, NVIDIA H100 80GB HBM3, 1234, 81559, 37, 61, 245.50\n"
            "1, NVIDIA GeForce RTX 4090, Founders, 10, 24564, [N/A], 40, [Not Supported]\n"
            "2, too, short\n")
    assert [(d.index, d.name, d.used_mib, d.total_mib, d.utilization, d.temperature_c,
             d.power_w) for d in parse_gpu_csv(text, stats=True)] == [
        (0, "NVIDIA H100 80GB HBM3", 1234.0, 81559.0, 0.37, 61.0, 245.5),
        (1, "NVIDIA GeForce RTX 4090, Founders", 10.0, 24564.0, None, 40.0, None)]


# --- no GPU, for real (this host: the real pynvml, the real NVML library and nvidia-smi) ------

@pytest.fixture
def fresh_gpu_reader(monkeypatch):
    """The module's reader as a new process has it, read on every call (no 5 s cache)."""
    monkeypatch.setattr(gpu, "READER", gpu.GpuReader())
    monkeypatch.setattr(gpu, "_cache", None)
    monkeypatch.setattr(gpu, "GPU_TTL_S", -1.0)
    return gpu.READER


def test_no_gpu_for_real_no_series_and_one_log_line(fresh_gpu_reader, caplog):
    gpus = host_gpus()
    metrics = ServiceMetrics(RequestTracker(), Manager([]))
    with caplog.at_level(logging.DEBUG, logger="ollama_server.gpu"):
        texts = [metrics.render().decode() for _ in range(3)]
    said = [r for r in caplog.records if "no NVIDIA GPU" in r.getMessage()]
    if gpus:  # a host with a GPU: its series, and nothing said
        assert all(f'ollama_server_gpu_memory_total_bytes{{gpu="{gpus - 1}"' in t for t in texts)
        assert said == []
        return
    assert all("ollama_server_gpu_" not in text for text in texts)
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert said[0].getMessage().startswith("no NVIDIA GPU: NVML not found")


def test_a_worker_of_several_says_it_at_debug_only(fresh_gpu_reader, caplog):
    if host_gpus():  # a host with a GPU: nothing to say at any level
        assert fresh_gpu_reader.read() is not None
        return
    gpu.quiet_no_gpu()
    with caplog.at_level(logging.DEBUG, logger="ollama_server.gpu"):
        assert gpu.gpu_snapshot() is None and gpu.gpu_snapshot() is None
    said = [r for r in caplog.records if "no NVIDIA GPU" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG]
