"""Splitting models across devices and hosts, without an engine: the engine's load report,
RPC endpoints, the configuration keys and the llama-server command line."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from ollama_server.config import ConfigError, load_config
from ollama_server.core.engine import EngineSettings, LLAMAExecutor
from ollama_server.core.engine.report import LoadReport
from ollama_server.core.engine.rpc import (
    EndpointError,
    check_endpoint,
    hello,
    is_private_address,
    parse_endpoint,
)
from ollama_server.core.errors import QueueFull
from tests.helpers import free_port

# Lines of the pinned llama-server (-lv 4) loading smollm2:135m with -ngl 99 -ts 1,3 over two
# loopback workers (copied from a real run).
SPLIT_LOG = """\
I llama_prepare_model_devices: using device RPC0 (127.0.0.1:50071) (unknown id) - 24105 MiB free
I llama_prepare_model_devices: using device RPC1 (127.0.0.1:50072) (unknown id) - 24105 MiB free
I load_tensors: offloaded 31/31 layers to GPU
I load_tensors:   CPU_Mapped model buffer size =    28.69 MiB
I load_tensors: RPC0[127.0.0.1:50071] model buffer size =    16.91 MiB
I load_tensors: RPC0[127.0.0.1:50072] model buffer size =    75.19 MiB
I llama_context: n_ctx                 = 512
I llama_context:        CPU  output buffer size =     0.19 MiB
I llama_kv_cache: RPC0[127.0.0.1:50071] KV buffer size =     3.00 MiB
I llama_kv_cache: RPC0[127.0.0.1:50072] KV buffer size =     8.25 MiB
I sched_reserve: RPC0[127.0.0.1:50071] compute buffer size =    18.91 MiB
I sched_reserve: RPC0[127.0.0.1:50072] compute buffer size =    18.91 MiB
I sched_reserve:        CPU compute buffer size =     7.67 MiB
"""

# The same model with one worker and --fit-target 24050: --fit chose 4 layers for it.
FIT_LOG = """\
I common_params_fit_impl: cannot meet free memory target of 24050 MiB, need to reduce device \
memory by 95 MiB
I common_params_fit_impl: set ngl_per_device_high[0].n_layer=11
I common_params_fit_impl: set ngl_per_device[0].n_layer=4
I common_params_fit_impl:   - RPC0 (127.0.0.1:50071):  4 layers,     52 MiB used,  24052 MiB free
I common_fit_params: successfully fit params to free device memory
I llama_prepare_model_devices: using device RPC0 (127.0.0.1:50071) (unknown id) - 24105 MiB free
I load_tensors: offloaded 4/31 layers to GPU
I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
I load_tensors: RPC0[127.0.0.1:50071] model buffer size =    35.03 MiB
I llama_context: n_ctx                 = 2048
I llama_kv_cache:        CPU KV buffer size =    40.50 MiB
I llama_kv_cache: RPC0[127.0.0.1:50071] KV buffer size =     4.50 MiB
"""

OOM_LOG = """\
I llama_context: n_ctx                 = 4000000
E ggml_aligned_malloc: insufficient memory (attempted to allocate 87890.62 MB)
E ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 92160000000
"""


def report_of(text: str) -> LoadReport:
    report = LoadReport()
    for line in text.splitlines():
        report.feed("0.00.361.798 " + line)
    return report


def test_load_report_of_a_split_over_two_workers():
    report = report_of(SPLIT_LOG)
    devices = report.devices()
    assert [(d["name"], d["endpoint"]) for d in devices] == [
        ("RPC0", "127.0.0.1:50071"), ("RPC1", "127.0.0.1:50072"), ("CPU", None)]
    first, second, cpu = devices
    assert (first["weights_mib"], first["kv_mib"], first["compute_mib"]) == (16.91, 3.0, 18.91)
    assert (second["weights_mib"], second["kv_mib"]) == (75.19, 8.25)
    assert first["free_mib"] == 24105 and cpu["free_mib"] is None
    assert cpu["weights_mib"] == 28.69 and cpu["compute_mib"] == 7.67
    remote_mib = 16.91 + 3 + 18.91 + 75.19 + 8.25 + 18.91
    assert report.offloaded_bytes() == int(remote_mib * 1024 * 1024)
    offload = report.offload()
    assert (offload["layers"], offload["layers_total"], offload["context_length"]) == (31, 31, 512)


def test_load_report_of_what_fit_chose():
    report = report_of(FIT_LOG)
    offload = report.offload()
    assert offload["layers"] == 4 and offload["fit_layers"] == {"127.0.0.1:50071": 4}
    assert offload["fit_notes"][0].startswith("cannot meet free memory target of 24050 MiB")
    [remote, cpu] = report.devices()
    assert remote["weights_mib"] == 35.03 and cpu["kv_mib"] == 40.5


def test_load_report_of_a_cpu_only_model_offloads_nothing():
    report = report_of("I load_tensors: offloaded 31/31 layers to GPU\n"
                       "I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\n")
    assert report.offloaded_bytes() == 0 and report.offload()["layers"] == 0
    assert [d["name"] for d in report.devices()] == ["CPU"]


def test_load_report_names_what_did_not_fit():
    report = report_of(OOM_LOG)
    assert report.memory_error == "85.8 GiB"


def test_cuda_devices_and_pinned_host_buffers():
    report = report_of(
        "I llama_prepare_model_devices: using device CUDA0 (NVIDIA H200) (0000:01:00.0) - "
        "140000 MiB free\n"
        "I load_tensors: CUDA0 model buffer size =  1000.00 MiB\n"
        "I load_tensors: CUDA_Host model buffer size =    50.00 MiB\n")
    [gpu, host] = report.devices()
    assert gpu["name"] == "CUDA0" and gpu["endpoint"] is None and gpu["free_mib"] == 140000
    assert host["name"] == "CPU" and host["weights_mib"] == 50
    assert report.offloaded_bytes() == 1000 * 1024 * 1024


@pytest.mark.parametrize("text,host,port", [
    ("10.0.0.2:50052", "10.0.0.2", 50052), ("[fd00::2]:1", "fd00::2", 1),
    (" worker-1:50052 ", "worker-1", 50052)])
def test_parse_endpoint(text, host, port):
    ep = parse_endpoint(text)
    assert (ep.host, ep.port) == (host, port)


@pytest.mark.parametrize("text", ["10.0.0.2", "fd00::2:50052", ":50052", "h:0", "h:70000",
                                  "h:x"])
def test_bad_endpoints(text):
    with pytest.raises(EndpointError):
        parse_endpoint(text)


@pytest.mark.parametrize("addr,private", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.20.0.1", True), ("192.168.1.1", True),
    ("100.64.0.1", True), ("169.254.0.1", True), ("::1", True), ("fd12::1", True),
    ("8.8.8.8", False), ("2001:4860::8888", False), ("::ffff:8.8.8.8", False)])
def test_private_addresses(addr, private):
    assert is_private_address(addr) is private


def test_public_endpoints_are_refused_unless_allowed():
    with pytest.raises(EndpointError, match="public address 8.8.8.8"):
        check_endpoint("8.8.8.8:50052")
    assert check_endpoint("8.8.8.8:50052", allow_public=True).port == 50052
    assert check_endpoint("localhost:50052").host == "localhost"


def fake_worker(answer: bytes | None):
    """A listening socket that answers HELLO with ``answer`` (None: never answers)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1 + 8 + 24)
            if answer is not None:
                conn.sendall(struct.pack("<Q", len(answer)) + answer)
            time.sleep(0.5)

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("answer,state,words", [
    (bytes([7, 0, 0, 0]) + bytes(24), "ready", "protocol 7.0.0"),
    (bytes([6, 2, 0, 0]) + bytes(24), "incompatible", "protocol 6.2.0"),
    (None, "busy", "serves one at a time"),
])
def test_hello_tells_ready_busy_and_incompatible_workers(answer, state, words):
    server, endpoint = fake_worker(answer)
    with server:
        status = hello(endpoint, timeout=0.3)
    assert status.state == state and words in status.describe()
    assert status.usable is (state == "ready")


def test_hello_says_why_a_worker_is_unreachable():
    status = hello(f"127.0.0.1:{free_port()}")
    assert status.state == "down" and "refused" in status.describe().lower()


def cfg(**overrides):
    return load_config(overrides=overrides, environ={})


@pytest.mark.parametrize("overrides,words", [
    ({"rpc_servers": "8.8.8.8:50052"}, ("rpc_servers", "public address")),
    ({"rpc_servers": "10.0.0.2"}, ("rpc_servers", "host:port")),
    ({"tensor_split": "1,-1"}, ("tensor_split", "non-negative")),
    ({"tensor_split": "0,0"}, ("tensor_split",)),
    ({"tensor_split": ",".join(["1"] * 17)}, ("tensor_split", "17 parts")),
    ({"gpu_layers": -2}, ("gpu_layers",)),
    ({"model_settings": {"big:70b": {"tensor_split": "1,x"}}},
     ("model_settings.big:70b.tensor_split",)),
    ({"model_settings": {"big:70b": {"rpc_servers": ["1.1.1.1:1"]}}},
     ("model_settings.big:70b.rpc_servers", "public")),
    ({"model_settings": {"big:70b": {"threads": 4}}}, ("model_settings.big:70b.threads",)),
    ({"model_settings": {"big:70b": "fast"}}, ("model_settings.big:70b", "mapping")),
    ({"model_settings": {"big:70b": {"parallel": 0}}},
     ("model_settings.big:70b.parallel", "at least 1")),
])
def test_bad_split_settings_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        cfg(**overrides)
    for word in words:
        assert word in str(err.value)


def test_split_settings_from_file_env_and_per_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rpc_servers: ['127.0.0.1:50052']\ntensor_split: '0.25,0.25,0.25,0.25'\n"
                    "gpu_layers: 999\nmodel_settings:\n  Big:70B:\n"
                    "    rpc_servers: [10.0.0.2:50052, 10.0.0.3:50052]\n"
                    "    tensor_split: 1,3\n    fit_target_mib: 512\n")
    c = load_config(path, environ={"OLLAMA_SERVER_MAIN_GPU": "1"})
    assert c.rpc_servers == ["127.0.0.1:50052"] and c.gpu_layers == 999 and c.main_gpu == 1
    assert c.tensor_split == [0.25] * 4
    assert c.engine_overrides("big:70b") == {
        "rpc_servers": ["10.0.0.2:50052", "10.0.0.3:50052"], "tensor_split": [1.0, 3.0],
        "fit_target_mib": 512}
    assert c.engine_overrides("smollm2:135m") == {}
    env = load_config(environ={"OLLAMA_SERVER_RPC_SERVERS": "10.0.0.2:1, 10.0.0.3:2",
                               "OLLAMA_SERVER_MODEL_SETTINGS": '{"m": {"gpu_layers": 0}}'})
    assert env.rpc_servers == ["10.0.0.2:1", "10.0.0.3:2"]
    assert env.engine_overrides("m:latest") == {"gpu_layers": 0}


def test_manager_applies_per_model_settings(tiny_store, tmp_path):
    from ollama_server.models.manager import ModelManager

    c = cfg(models_dir=str(tiny_store), rpc_servers="127.0.0.1:50052", gpu_layers=10,
            model_settings={"tiny": {"rpc_servers": ["127.0.0.1:1", "127.0.0.1:2"],
                                     "tensor_split": "1,3", "gpu_layers": 99}})
    manager = ModelManager(c, engine_binary=Path("/bin/true"))
    try:
        small = manager.engine_settings("ns/other:v1")
        assert small.rpc_servers == ["127.0.0.1:50052"] and small.gpu_layers == 10
        big = manager.engine_settings("tiny:latest")
        assert big.rpc_servers == ["127.0.0.1:1", "127.0.0.1:2"]
        assert big.tensor_split == [1.0, 3.0] and big.gpu_layers == 99
        assert manager.rpc_workers() == ["127.0.0.1:50052", "127.0.0.1:1", "127.0.0.1:2"]
    finally:
        manager.shutdown()


def test_a_model_may_run_with_its_own_slots(tiny_store):
    """model_settings.<model>.parallel: the engine's --parallel and the model's queue."""
    from ollama_server.models.manager import ModelManager

    c = cfg(models_dir=str(tiny_store), parallel=32,
            model_settings={"tiny": {"parallel": "2"}})
    manager = ModelManager(c, engine_binary=Path("/bin/true"))
    try:
        assert manager.parallel_for("tiny:latest") == 2
        assert manager.parallel_for("other:1b") == 32
        cmd = " ".join(LLAMAExecutor(Path("/m.gguf"), manager.engine_settings("tiny"), 2048)
                       .command(8080))
        assert "--parallel 2 " in cmd
        info = manager.resolve("tiny")
        for _ in range(2):  # the two slots are taken without waiting ...
            manager.queue.enter(info.name, manager.parallel_for(info.name), 0, 60)
        with pytest.raises(QueueFull):  # ... and with max_queue 0 a third is refused
            manager.queue.enter(info.name, manager.parallel_for(info.name), 0, 60)
    finally:
        manager.shutdown()


def test_command_line_carries_the_split():
    settings = EngineSettings(binary=Path("/x/llama-server"), gpu_layers=99,
                              tensor_split=[1, 3], rpc_servers=["10.0.0.2:1", "10.0.0.3:2"],
                              main_gpu=1, fit_target_mib=256)
    cmd = LLAMAExecutor(Path("/m.gguf"), settings, 2048).command(8080)
    joined = " ".join(cmd)
    for part in ("--rpc 10.0.0.2:1,10.0.0.3:2", "-ngl 99", "--tensor-split 1,3",
                 "--main-gpu 1", "--fit-target 256", "-lv 4"):
        assert part in joined
    plain = " ".join(LLAMAExecutor(Path("/m.gguf"), EngineSettings(binary=Path("/x")), 512)
                     .command(1))
    for absent in ("--rpc", "-ngl", "--tensor-split", "--main-gpu", "--fit-target"):
        assert absent not in plain.split()
