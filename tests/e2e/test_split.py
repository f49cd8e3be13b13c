"""Models split across llama.cpp RPC workers, for real: ``ggml-rpc-server`` processes from the
project's engine build on loopback (and one in a network namespace, a "remote host" with its
own network stack), the real service and the real smollm2 model, driven by the official SDKs.
"""

from __future__ import annotations

import bisect
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import openai
import pytest
import requests
from gguf import GGUFReader

from ollama_server.models.store import ModelName, OllamaStore
from ollama_server.provision.engine import rpc_worker_binary
from tests.helpers import ServiceProcess, free_port, pid_alive

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
SPLIT = [1.0, 3.0]


class Worker:
    """One ggml-rpc-server; ``prefix`` runs it elsewhere (``ip netns exec NS``)."""

    def __init__(self, binary: Path, host: str = "127.0.0.1", port: int | None = None,
                 prefix: list[str] | None = None, log: Path | None = None) -> None:
        self.binary, self.host, self.port = binary, host, port or free_port()
        self.prefix = prefix or []
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([*self.prefix, str(self.binary), "-H", self.host,
                                      "-p", str(self.port)], stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}"
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"ggml-rpc-server did not listen on {self.endpoint}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def expected_weights_mib(gguf: Path, split: list[float], n_devices: int) -> list[float]:
    """Weights per device as llama.cpp assigns them with ``-ngl 99 --tensor-split``.

    Its rule (llama-model.cpp, load_tensors): layer ``il`` of ``n_layer + 1`` (the output layer
    last) goes to the first device whose cumulative, normalised split exceeds
    ``il / (n_layer + 1)``; the input embeddings stay on the CPU. Layers are whole, so the
    proportions are only approximately 1:3; the exact per-device sizes come from the tensor
    sizes in the GGUF.
    """
    reader = GGUFReader(str(gguf))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    n_layer = 1 + max(int(name.split(".")[1]) for name in sizes if name.startswith("blk."))
    layer = [sum(v for k, v in sizes.items() if k.startswith(f"blk.{i}.")) for i in
             range(n_layer)]
    output = sizes.get("output.weight") or sizes["token_embd.weight"]  # tied embeddings
    total = sum(split)
    bounds = [sum(split[:i + 1]) / total for i in range(n_devices)]
    per_device = [0] * n_devices
    for il in range(n_layer + 1):
        dev = bisect.bisect_right(bounds, il / (n_layer + 1))
        per_device[dev] += layer[il] if il < n_layer else output
    return [b / 2**20 for b in per_device]


@pytest.fixture(scope="module")
def smollm_gguf(real_models) -> Path:
    store = OllamaStore(real_models)
    manifest = store.read_manifest(ModelName.parse(MODEL).manifest_path(store.manifests_dir))
    return store.blob_path(store.layer(manifest, "model")["digest"])


@pytest.fixture(scope="module")
def worker_binary(engine_binary) -> Path:
    binary = rpc_worker_binary(engine_binary)
    if binary is None:
        pytest.fail(f"no ggml-rpc-server beside {engine_binary}: run `make engine-rebuild`")
    return binary


@pytest.fixture(scope="module")
def workers(worker_binary, tmp_path_factory):
    logs = tmp_path_factory.mktemp("workers")
    made = [Worker(worker_binary, log=logs / f"w{i}.log") for i in range(3)]
    yield made
    for w in made:
        w.kill()


def start_service(tmp: Path, real_models: Path, settings: dict) -> ServiceProcess:
    svc = ServiceProcess(tmp, real_models, extra_env={
        "OLLAMA_SERVER_MODEL_SETTINGS": json.dumps(settings),
        "OLLAMA_SERVER_DEFAULT_MODEL": MODEL})
    svc.ready_or_stopped()
    return svc


@pytest.fixture(scope="module")
def split_service(tmp_path_factory, real_models, engine_binary, workers):
    svc = start_service(tmp_path_factory.mktemp("split"), real_models, {
        MODEL: {"rpc_servers": [w.endpoint for w in workers[:2]], "tensor_split": "1,3",
                "gpu_layers": 99}})
    yield svc
    svc.stop()
    assert not [p for p in svc.engine_pids if pid_alive(p)]


def ps_entry(base_url: str) -> dict:
    models = requests.get(base_url + "/api/ps", timeout=10).json()["models"]
    return next(m for m in models if m["name"] == MODEL)


def test_weights_follow_the_tensor_split(split_service, workers, smollm_gguf):
    client = openai.OpenAI(base_url=split_service.base_url + "/v1", api_key="x")
    out = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                         messages=[{"role": "user", "content": "Say hi"}])
    assert out.choices[0].message.content

    entry = ps_entry(split_service.base_url)
    remote = [d for d in entry["devices"] if d["endpoint"]]
    assert [d["endpoint"] for d in remote] == [w.endpoint for w in workers[:2]]
    expected = expected_weights_mib(smollm_gguf, SPLIT, 2)
    # Tolerance: the report's 2-decimal rounding plus 32-byte tensor alignment (9 tensors a
    # layer, 32 layers at most): well under 0.02 MiB.
    for dev, want in zip(remote, expected, strict=True):
        assert abs(dev["weights_mib"] - want) < 0.02, (dev, expected)
        assert dev["kv_mib"] > 0 and dev["compute_mib"] > 0 and dev["free_mib"] > 0
    assert expected[0] < expected[1] / 2  # a real 1:3-ish split, not an even one
    remote_bytes = sum((d["weights_mib"] + d["kv_mib"] + d["compute_mib"]) * 2**20
                       for d in remote)
    assert abs(entry["size_vram"] - remote_bytes) < 2**20 * 0.1
    assert entry["offload"]["layers"] == entry["offload"]["layers_total"] == 31

    health = requests.get(split_service.base_url + "/health", timeout=10).json()
    assert [w["reachable"] for w in health["rpc_workers"]] == [True, True]
    loaded = next(m for m in health["models_loaded"] if m["name"] == MODEL)
    assert loaded["rpc_servers"] == [w.endpoint for w in workers[:2]]

    metrics = requests.get(split_service.base_url + "/metrics", timeout=10).text
    assert f'ollama_server_rpc_worker_up{{endpoint="{workers[0].endpoint}"}} 1.0' in metrics
    assert (f'ollama_server_device_memory_bytes{{device="RPC1",endpoint="{workers[1].endpoint}",'
            f'kind="weights",model="{MODEL}"}}') in metrics


def test_generation_through_the_ollama_and_anthropic_sdks(split_service):
    import anthropic
    import ollama

    chat = ollama.Client(host=split_service.base_url).chat(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
        options={"num_predict": 8, "temperature": 0})
    assert chat.message.content and chat.done
    msg = anthropic.Anthropic(base_url=split_service.base_url, api_key="x").messages.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Name a fruit."}])
    assert msg.content[0].text and msg.usage.output_tokens > 0


def test_a_worker_that_dies_mid_stream_then_comes_back(split_service, workers):
    client = openai.OpenAI(base_url=split_service.base_url + "/v1", api_key="x",
                           max_retries=0, timeout=120)
    client.chat.completions.create(model=MODEL, max_tokens=2,
                                   messages=[{"role": "user", "content": "hi"}])  # loaded
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=3000, stream=True, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Tell a very long story."}])
    victim = workers[0]
    with pytest.raises(openai.APIError) as err:
        for i, _chunk in enumerate(stream):
            if i == 3:
                victim.kill()
    message = str(err.value)
    assert victim.endpoint in message and "went away" in message, message

    health = requests.get(split_service.base_url + "/health", timeout=10).json()
    assert health["status"] == "degraded"
    assert {w["endpoint"]: w["reachable"] for w in health["rpc_workers"]}[victim.endpoint] is False

    # While it is down: a clear 503 that names it, at once, in each dialect.
    with pytest.raises(openai.InternalServerError) as down:
        client.chat.completions.create(model=MODEL, max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert down.value.status_code == 503 and victim.endpoint in str(down.value)
    resp = requests.post(split_service.base_url + "/api/generate", timeout=30, json={
        "model": MODEL, "prompt": "x", "stream": False})
    assert resp.status_code == 503 and victim.endpoint in resp.json()["error"]

    victim.start()  # back on the same port: the next request reloads, no service restart
    out = client.chat.completions.create(model=MODEL, max_tokens=4,
                                         messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content is not None
    assert requests.get(split_service.base_url + "/health", timeout=10).json()["status"] == "ok"
    assert split_service.proc.poll() is None


def test_unset_gpu_layers_lets_fit_choose_and_reports_it(tmp_path, real_models, engine_binary,
                                                         workers):
    """gpu_layers unset: no -ngl, llama-server's --fit places the layers; /api/ps says where."""
    svc = start_service(tmp_path, real_models, {MODEL: {"rpc_servers": [workers[2].endpoint]}})
    try:
        ollama_ok = requests.post(svc.base_url + "/api/generate", timeout=120, json={
            "model": MODEL, "prompt": "Hello", "stream": False,
            "options": {"num_predict": 4}})
        assert ollama_ok.status_code == 200, ollama_ok.text
        entry = ps_entry(svc.base_url)
        assert entry["offload"]["layers"] == 31  # everything fits on the worker
        [remote] = [d for d in entry["devices"] if d["endpoint"]]
        assert remote["endpoint"] == workers[2].endpoint and remote["weights_mib"] > 90
    finally:
        svc.stop()


def test_a_worker_held_by_another_engine_is_reported_busy(tmp_path, real_models, split_service,
                                                          workers):
    """A worker serves one llama-server at a time; a second service that wants it gets a 503
    that says so at once, instead of an engine waiting in the worker's queue."""
    requests.post(split_service.base_url + "/api/generate", timeout=120, json={
        "model": MODEL, "prompt": "x", "stream": False, "options": {"num_predict": 1}})
    svc = start_service(tmp_path, real_models, {MODEL: {"rpc_servers": [workers[0].endpoint],
                                                        "gpu_layers": 99}})
    try:
        resp = requests.post(svc.base_url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "x", "max_tokens": 2})
        assert resp.status_code == 503, resp.text
        message = resp.json()["error"]["message"]
        assert workers[0].endpoint in message and "busy" in message
        health = requests.get(svc.base_url + "/health", timeout=10).json()
        [status] = health["rpc_workers"]
        # The first HELLO waits in the worker's one-place queue; later ones cannot even connect.
        assert status["state"] in ("busy", "no_answer") and health["status"] == "degraded"
    finally:
        svc.stop()


def test_public_worker_address_stops_the_service(tmp_path, real_models):
    svc = ServiceProcess(tmp_path, real_models, extra_env={
        "OLLAMA_SERVER_RPC_SERVERS": "8.8.8.8:50052"})
    code = svc.proc.wait(timeout=60)
    svc.stop()
    assert code == 2
    log = svc.log()
    assert "rpc_servers" in log and "public address" in log and "allow_public_rpc" in log


@pytest.fixture
def netns_worker(worker_binary, tmp_path):
    """A worker in its own network namespace, reached over a veth pair with a /30 that exists
    only inside this test.

    Needs root (``ip netns``). A developer without root runs it as
    ``sudo -E .venv/bin/python -m pytest tests/e2e/test_split.py -k netns``.
    """
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root: sudo -E .venv/bin/python -m pytest "
                    "tests/e2e/test_split.py -k netns")
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"lis-{tag}", f"lish{tag}", f"lisn{tag}"
    third = int(tag[:2], 16)
    host_ip, ns_ip = f"10.213.{third}.1", f"10.213.{third}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        worker = Worker(worker_binary, host=ns_ip, prefix=["ip", "netns", "exec", ns],
                        log=tmp_path / "netns-worker.log")
        yield worker
        worker.kill()
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_worker_on_another_network_stack(netns_worker, tmp_path, real_models, engine_binary):
    svc = start_service(tmp_path, real_models, {
        MODEL: {"rpc_servers": [netns_worker.endpoint], "gpu_layers": 99}})
    try:
        client = openai.OpenAI(base_url=svc.base_url + "/v1", api_key="x")
        out = client.chat.completions.create(model=MODEL, max_tokens=8,
                                             messages=[{"role": "user", "content": "Hi"}])
        assert out.choices[0].message.content
        [remote] = [d for d in ps_entry(svc.base_url)["devices"] if d["endpoint"]]
        assert remote["endpoint"] == netns_worker.endpoint and remote["weights_mib"] > 90
    finally:
        svc.stop()
