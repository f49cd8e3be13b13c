"""Test helpers shared by every layer: a tiny real GGUF store, a scripted fake executor, and the
real service as a subprocess."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from ollama_server.core.engine import EngineSettings, EngineState
from ollama_server.core.errors import ServiceError
from ollama_server.core.schemas import Event, Finish, InternalRequest, TextDelta, Usage
from ollama_server.models.store import MEDIA_PREFIX, ModelName, OllamaStore

ROOT = Path(__file__).resolve().parent.parent
REAL_MODELS = ROOT / "models"

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, arch: str = "llama", context_length: int = 4096,
                    chat_template: str | None = CHATML) -> Path:
    """A small but real GGUF file (header and one tensor) for discovery tests."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(context_length)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_file_type(2)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_store_model(store: OllamaStore, name: str, gguf: Path,
                    params: dict[str, Any] | None = None, system: str | None = None) -> None:
    """Import ``gguf`` into ``store`` as ``name`` (model layer, params and system layers)."""
    with open(gguf, "rb") as fh:
        hex_digest, size = store.write_blob(fh)
    layers = [{"mediaType": MEDIA_PREFIX + "model", "digest": f"sha256:{hex_digest}",
               "size": size}]
    if params is not None:
        h, s = store.write_bytes_blob(json.dumps(params).encode())
        layers.append({"mediaType": MEDIA_PREFIX + "params", "digest": f"sha256:{h}",
                       "size": s})
    if system is not None:
        h, s = store.write_bytes_blob(system.encode())
        layers.append({"mediaType": MEDIA_PREFIX + "system", "digest": f"sha256:{h}",
                       "size": s})
    store.write_manifest(ModelName.parse(name),
                         store.build_manifest(layers, {"model_format": "gguf"}))


@dataclass
class Script:
    """What a FakeExecutor answers: events, or an error to raise before the first byte, or an
    error to raise after ``fail_after`` events."""

    events: list[Event] = field(default_factory=lambda: [
        TextDelta("Hello"), TextDelta(" world"),
        Finish("stop", Usage(prompt_tokens=5, completion_tokens=2))])
    error: ServiceError | None = None
    fail_after: int | None = None
    mid_error: ServiceError | None = None
    delay: float = 0.0  # seconds before each event (a slow engine)


class FakeStream:
    """Stands in for EngineStream."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.closed = False

    def __iter__(self):
        for i, event in enumerate(self.script.events):
            if self.script.fail_after is not None and i >= self.script.fail_after:
                raise self.script.mid_error or ServiceError("engine crashed")
            if self.script.delay:
                time.sleep(self.script.delay)
            yield copy.deepcopy(event)  # each stream its own objects, as from the engine

    def close(self) -> None:
        self.closed = True


class FakeExecutor:
    """A scripted executor for the Flask-client layer: records requests, answers scripts."""

    def __init__(self, name: str, ctx_size: int, script: Script) -> None:
        self.name = name
        self.ctx_size = ctx_size
        self.script = script
        self.requests: list[InternalRequest] = []
        self.streams: list[FakeStream] = []
        self.state = EngineState.STOPPED
        self.pid = None
        self.port = None
        self.restarts = 0
        self.prompt_opens_think = False
        self.embedding = [0.1, 0.2, 0.3]
        self.settings = EngineSettings(binary=Path("/bin/true"))

    def ensure_ready(self) -> float:
        self.state = EngineState.READY
        self.pid = os.getpid()
        self.port = 1
        return 0.0

    def stop(self) -> None:
        self.state = EngineState.STOPPED
        self.pid = None

    def open_stream(self, req: InternalRequest) -> FakeStream:
        self.requests.append(req)
        if self.script.error is not None:
            raise self.script.error
        stream = FakeStream(self.script)
        self.streams.append(stream)
        return stream

    def embed(self, inputs):
        return [list(self.embedding) for _ in inputs], 3 * len(inputs)

    def tokenize(self, text, add_special=True, with_pieces=False):
        ids = list(range(1, len(text.split()) + 1))
        return [{"id": i, "piece": p} for i, p in zip(ids, text.split(), strict=False)] \
            if with_pieces else ids

    def detokenize(self, tokens):
        return " ".join(f"t{t}" for t in tokens)

    def apply_template(self, req):
        return "".join(m.content for m in req.messages or [])


def wait_for(check, what: str, timeout: float = 60.0, every: float = 0.1):
    """``check()``'s first truthy value; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def host_gpus() -> int:
    """The NVIDIA GPUs of this host, asked of NVML directly (0 without a driver)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def cluster_port(instances: int) -> int:
    """A port P with P, P+1..P+n and the agent ports P+101..P+100+n free (cluster.plan)."""
    def free(ports: list[int]) -> bool:
        for port in ports:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    return False
        return True

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000)
        if free([base, *range(base + 1, base + instances + 1),
                 *range(base + 101, base + instances + 101)]):
            return base
    raise AssertionError("no free block of ports for the cluster")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llama_children(pid: int) -> list[int]:
    """llama-server processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines()
                     if line.startswith("PPid:")), -1)
        if ppid == pid and b"llama-server" in cmd:
            out.append(int(entry.name))
    return out


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if any(line.split()[1:] == [str(pid)] for line in status.splitlines()
                   if line.startswith("PPid:")):
                out.append(int(entry.name))
    return out


def service_engines(master: int) -> list[int]:
    """The llama-server processes of the service whose gunicorn master is ``master`` (children
    of its one worker, or of its engine pool process)."""
    return [p for child in children_of(master) for p in llama_children(child)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
        return "Z" not in state
    except (OSError, StopIteration):
        return False


class ServiceProcess:
    """The real service (``python -m ollama_server.main``) on a free port.

    ``models_dir=None`` leaves the models folder to the config file; ``script=True`` starts it
    as ``python ollama_server/main.py`` (the original design's command).
    """

    def __init__(self, tmp: Path, models_dir: Path | None = REAL_MODELS,
                 extra_env: dict | None = None, args: list[str] | None = None,
                 script: bool = False) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "service.out"
        env = dict(os.environ)
        env.update({"OLLAMA_SERVER_LOG_DIR": str(tmp / "logs"), "PYTHONUNBUFFERED": "1",
                    "OLLAMA_SERVER_KEEP_ALIVE": "600"})
        env.update(extra_env or {})
        self._log = open(self.log_path, "wb")
        entry = ["ollama_server/main.py"] if script else ["-m", "ollama_server.main"]
        models = ["--model-dir", str(models_dir)] if models_dir is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, *entry, *models, "--port", str(self.port), *(args or [])],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.engine_pids: set[int] = set()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log()}")
            try:
                if requests.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service did not become healthy: {self.log()}")

    def ready_or_stopped(self, timeout: float = 60) -> None:
        """wait_ready(); when the service does not come up, stop it before raising (for
        fixtures, whose teardown does not run when their setup fails)."""
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def worker_pids(self) -> list[int]:
        """The master's children: its gunicorn workers and, with several, the engine pool
        (the process that owns the engines)."""
        return children_of(self.proc.pid)

    def engines(self) -> list[int]:
        """Live llama-server pids of this service (remembered for the shutdown check)."""
        pids = service_engines(self.proc.pid)
        self.engine_pids.update(pids)
        return pids

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.engines()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
