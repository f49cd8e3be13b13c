"""Deployment behaviour of the real service: the original design's config file and command,
configuration reload on SIGHUP, the zero-downtime update (SIGUSR2) with a client polling
/health every 50 ms and a stream running across it, and the graceful stop (SIGTERM) that lets
requests finish up to shutdown_timeout and leaves no llama-server or worker behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from ollama_server.user_service import update
from tests.helpers import (
    ServiceProcess,
    children_of,
    pid_alive,
    service_engines,
    wait_for,
)
from tests.unit.test_deploy_config import seed_config_for

# Streams of a few hundred tokens: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODEL = "smollm2:135m"


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def health(base_url: str) -> dict:
    resp = requests.get(base_url + "/health", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_gone(pids, timeout: float = 90.0) -> None:
    wait_for(lambda: not [p for p in pids if pid_alive(p)], f"{pids} to exit", timeout)


class Poller(threading.Thread):
    """GET /health every 50 ms on a new connection; records (time, status or error, pid)."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.results: list[tuple[float, object, int | None]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                resp = requests.get(self.base_url + "/health", timeout=30)
                pid = resp.json().get("pid") if resp.status_code == 200 else None
                self.results.append((time.monotonic(), resp.status_code, pid))
            except requests.RequestException as exc:
                self.results.append((time.monotonic(), repr(exc), None))
            self.halt.wait(0.05)

    def failures(self) -> list:
        return [r for r in self.results if r[1] != 200]


class Stream(threading.Thread):
    """One streamed completion of exactly ``tokens`` tokens (ignore_eos), read to its end."""

    def __init__(self, base_url: str, tokens: int) -> None:
        super().__init__(daemon=True)
        self.base_url, self.tokens = base_url, tokens
        self.chunks = 0
        self.completion_tokens: int | None = None  # from the usage chunk at the end
        self.finish: str | None = None
        self.done = False
        self.error: str | None = None
        self.ended_at: float | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            resp = requests.post(self.base_url + "/v1/completions", stream=True, timeout=300,
                                 json={"model": MODEL, "prompt": "Once upon a time",
                                       "max_tokens": self.tokens, "ignore_eos": True,
                                       "stream": True,
                                       "stream_options": {"include_usage": True}})
            for line in resp.iter_lines():
                if line == b"data: [DONE]":
                    self.done = True
                elif line.startswith(b"data: "):
                    data = json.loads(line[6:])
                    if "error" in data:
                        self.error = str(data["error"])
                    for choice in data.get("choices", []):
                        self.chunks += 1
                        self.finish = choice.get("finish_reason") or self.finish
                    if data.get("usage"):
                        self.completion_tokens = data["usage"]["completion_tokens"]
                    if self.chunks >= 3:
                        self.started.set()
        except requests.RequestException as exc:
            self.error = repr(exc)
        finally:
            self.ended_at = time.monotonic()
            self.started.set()


def test_seed_config_and_script_command_serve_a_chat(tmp_path, real_models, engine_binary):
    """The original design's service_config.yaml (its /opt paths replaced) with its command
    `python ollama_server/main.py --debug`: blobs folder, manifests subfolder, null default
    model, tensor_split string, gpu_layers 999, threads 32."""
    cfg = seed_config_for(real_models, engine_binary.parent, tmp_path / "service_config.yaml")
    svc = ServiceProcess(tmp_path, models_dir=None, script=True,
                         args=["--config", str(cfg), "--debug"])
    try:
        svc.wait_ready()
        body = health(svc.base_url)
        assert body["default_model"] == "gemma3:270m"  # null: the first model available
        assert body["models_available"] == 2 and body["config"]["file"] == str(cfg)
        oai = openai.OpenAI(base_url=svc.base_url + "/v1", api_key="x", max_retries=0,
                            timeout=120)
        answer = oai.chat.completions.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Say hello"}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
        assert "--tensor-split 0.25,0.25,0.25,0.25" in svc.log_path.read_text()
    finally:
        assert svc.stop() == 0, svc.log()


def test_sighup_reloads_settings_and_restarts_only_changed_engines(tmp_path, real_models,
                                                                   engine_binary):
    cfg = tmp_path / "service.yaml"
    cfg.write_text("keep_alive: 600\n")
    svc = ServiceProcess(tmp_path, real_models, args=["--config", str(cfg)])
    try:
        svc.wait_ready()
        oai = openai.OpenAI(base_url=svc.base_url + "/v1", api_key="x", max_retries=0,
                            timeout=120)

        def chat(client=oai):
            return client.chat.completions.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])

        def reload_and_wait(text: str, reloads: int, refused: bool = False) -> dict:
            cfg.write_text(text)
            svc.proc.send_signal(signal.SIGHUP)

            def settled() -> dict | None:
                status = health(svc.base_url)["config"]
                done = status["last_error"] if refused else status["reloads"] == reloads
                return status if done else None

            return wait_for(settled, "the reload")

        chat()
        (engine,) = svc.engines()
        worker = svc.worker_pids()
        # Settings read per request: the API key and keep_alive; the engine keeps running.
        status = reload_and_wait("keep_alive: 900\napi_key: k-1\n", 1)
        assert status["last_error"] is None
        with pytest.raises(openai.AuthenticationError):
            chat()
        keyed = openai.OpenAI(base_url=svc.base_url + "/v1", api_key="k-1", max_retries=0,
                              timeout=120)
        chat(keyed)
        assert svc.engines() == [engine] and svc.worker_pids() == worker
        # An engine setting: the idle engine restarts with it.
        reload_and_wait("keep_alive: 900\napi_key: k-1\nthreads: 1\n", 2)
        wait_for(lambda: not pid_alive(engine), "the old engine to stop")
        chat(keyed)
        (new_engine,) = svc.engines()
        assert new_engine != engine
        assert "--threads 1" in Path(f"/proc/{new_engine}/cmdline").read_bytes().replace(
            b"\0", b" ").decode()
        # A bad file: refused, one log line naming the key, the old settings stay.
        status = reload_and_wait("keep_alive: 900\napi_key: k-1\nthreads: many\n", 2, True)
        assert "threads" in status["last_error"] and status["reloads"] == 2
        with pytest.raises(openai.AuthenticationError):
            chat()
        chat(keyed)
        assert svc.engines() == [new_engine]
        refused = [line for line in svc.log_path.read_text().splitlines()
                   if "configuration reload refused" in line]
        # One line from each process that reloads (with several workers: each, and the pool).
        assert 1 <= len(refused) <= 3 and all("threads" in line for line in refused)
    finally:
        assert svc.stop() == 0, svc.log()


def test_update_without_downtime_then_graceful_stop(tmp_path, real_models, engine_binary):
    # A drain long enough for the stream on any machine: it must finish, not be cut.
    svc = ServiceProcess(tmp_path, real_models,
                         extra_env={"OLLAMA_SERVER_SHUTDOWN_TIMEOUT": "900"})
    new_master, engines = None, []
    try:
        svc.wait_ready()
        old_workers = set(svc.worker_pids())  # its workers (and engine pool)
        poller = Poller(svc.base_url)
        poller.start()
        stream = Stream(svc.base_url, tokens=400)
        stream.start()
        assert stream.started.wait(120) and stream.error is None, stream.error
        (old_engine,) = svc.engines()
        messages: list[str] = []
        assert update(svc.proc.pid, timeout=900, say=messages.append) == 0, messages
        svc.proc.wait(timeout=30)
        stream.join(timeout=300)
        poller.halt.set()
        poller.join()
        # Every poll answered, first by the old workers, then by the new ones.
        assert not poller.failures(), poller.failures()[:5]
        served_by_new = [t for t, _, pid in poller.results if pid not in old_workers | {None}]
        assert served_by_new, "no /health answer came from the new worker"
        assert poller.results[0][2] in old_workers
        # The stream ran across the handover and completed on the old worker.
        assert stream.ended_at > served_by_new[0]
        assert stream.error is None and stream.done and stream.finish == "length"
        assert stream.completion_tokens == 400
        assert not pid_alive(old_engine) and not [p for p in old_workers if pid_alive(p)]
        new_worker = health(svc.base_url)["pid"]
        new_master = parent_of(new_worker)
        assert new_master != svc.proc.pid
        r = requests.post(svc.base_url + "/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        engines = service_engines(new_master)
        assert len(engines) == 1
    finally:
        if new_master is not None:
            os.kill(new_master, signal.SIGTERM)
            wait_gone([new_master, *children_of(new_master)])
            assert not [p for p in engines if pid_alive(p)]
        svc.stop()


def stream_then_sigterm(svc: ServiceProcess, tokens: int) -> tuple[Stream, list[int]]:
    """Start a stream of ``tokens`` tokens, then SIGTERM the service; (stream, its engine and
    worker pids)."""
    svc.wait_ready()
    stream = Stream(svc.base_url, tokens=tokens)
    stream.start()
    assert stream.started.wait(120) and stream.error is None, stream.error
    pids = svc.engines() + svc.worker_pids()
    svc.proc.send_signal(signal.SIGTERM)
    return stream, pids


def test_sigterm_drains_streams_and_refuses_new_requests(tmp_path, real_models, engine_binary):
    svc = ServiceProcess(tmp_path, real_models,
                         extra_env={"OLLAMA_SERVER_SHUTDOWN_TIMEOUT": "900"})
    try:
        stream, pids = stream_then_sigterm(svc, 200)
        # New connections are refused at once while the stream goes on.
        wait_for(lambda: refused(svc.base_url), "new connections to be refused", 30)
        assert stream.ended_at is None
        stream.join(timeout=300)
        assert stream.error is None and stream.done and stream.completion_tokens == 200
        assert svc.proc.wait(timeout=120) == 0
    finally:
        svc.stop()
    assert not [p for p in pids if pid_alive(p)]


def test_sigterm_cuts_streams_at_shutdown_timeout(tmp_path, real_models, engine_binary):
    svc = ServiceProcess(tmp_path, real_models, extra_env={"OLLAMA_SERVER_SHUTDOWN_TIMEOUT": "1"})
    try:
        stream, pids = stream_then_sigterm(svc, 20000)
        assert svc.proc.wait(timeout=120) == 0
        stream.join(timeout=60)
        # Cut: an error frame (then [DONE], as OpenAI ends a failed stream), no usage.
        assert stream.completion_tokens is None and stream.chunks < 20000
        assert "the service stopped this engine" in (stream.error or "")
    finally:
        svc.stop()
    assert not [p for p in pids if pid_alive(p)]


def refused(base_url: str) -> bool:
    try:
        requests.get(base_url + "/health", timeout=5)
    except requests.ConnectionError:
        return True
    return False
