"""Failure paths of the real service: disconnects, engine crashes, shutdown, big prompts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import openai
import pytest
import requests

from tests.helpers import ServiceProcess, pid_alive, wait_for

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"


def engine_of(base_url: str, model: str = MODEL) -> dict:
    for m in requests.get(base_url + "/health", timeout=10).json()["models_loaded"]:
        if m["name"] == model:
            return m
    raise AssertionError(f"{model} is not loaded")


def slots_busy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/slots", timeout=5) as resp:
        return any(s.get("is_processing") for s in json.load(resp))


def test_client_disconnect_stops_generation_in_engine(base_url):
    resp = requests.post(base_url + "/v1/chat/completions", stream=True, timeout=60, json={
        "model": MODEL, "stream": True, "max_tokens": 3000, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Write a very long story."}]})
    lines = resp.iter_lines()
    got = 0
    for line in lines:
        if line.startswith(b"data: "):
            got += 1
            if got == 5:
                break
    rid = resp.headers["X-Request-Id"]
    port = engine_of(base_url)["port"]
    assert slots_busy(port)
    resp.close()
    deadline = time.monotonic() + 10
    while slots_busy(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not slots_busy(port), "the engine kept generating for a client that left"
    status = requests.get(f"{base_url}/api/progress/{rid}", timeout=5).json()
    assert status["state"] == "cancelled" and status["tokens_generated"] < 3000


# An answer that cannot end before its 3000-token cap, whatever the machine's speed: the
# schema wants 1900 items (a digit and a separator each, at least 3800 tokens) before the
# closing bracket, and the engine's grammar allows no end of generation before that. Dialects
# without ignore_eos use it. (llama.cpp's grammars refuse repetitions over 2000.)
_LONG_BY_CONSTRUCTION = {"type": "array", "items": {"const": 7}, "minItems": 1900}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"max_tokens": 3000, "ignore_eos": True,
                              "messages": [{"role": "user", "content": "Write a long story."}]}),
    ("/api/generate", {"prompt": "Write a long story.", "stream": False,
                       "format": _LONG_BY_CONSTRUCTION, "options": {"num_predict": 3000}}),
    ("/v1/messages", {"max_tokens": 3000,
                      "output_config": {"format": {"type": "json_schema",
                                                   "schema": _LONG_BY_CONSTRUCTION}},
                      "messages": [{"role": "user", "content": "Write a long story."}]}),
])
def test_a_client_that_leaves_a_non_streamed_answer_stops_it(base_url, path, body):
    """Nothing is written to a non-streamed answer until it is done, so the generation
    itself looks for the hang-up: the engine stops within a moment, as Ollama's does.
    Each body asks for 3000 tokens that the engine cannot end early (ignore_eos, or a schema
    that needs more), so the answer outlasts the client's 1.5 s on any machine."""
    rid = f"leaves-{path.strip('/').replace('/', '-')}-{time.monotonic_ns()}"
    requests.post(base_url + "/api/generate", json={"model": MODEL}, timeout=120)  # loaded
    port = engine_of(base_url)["port"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(base_url + path, json={"model": MODEL, **body}, timeout=(5, 1.5),
                      headers={"X-Request-Id": rid, "anthropic-version": "2023-06-01"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = requests.get(f"{base_url}/api/progress/{rid}", timeout=5).json()
        if status["state"] in ("cancelled", "completed", "failed"):
            break
        time.sleep(0.1)
    assert status["state"] == "cancelled", status
    assert status["tokens_generated"] < 3000
    deadline = time.monotonic() + 10
    while slots_busy(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not slots_busy(port), "the engine kept generating for a client that left"


def test_engine_killed_mid_request_then_next_request_works(base_url):
    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    oai.chat.completions.create(model=MODEL, max_tokens=1,
                                messages=[{"role": "user", "content": "hi"}])
    stream = oai.chat.completions.create(
        model=MODEL, stream=True, max_tokens=2000, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Write a very long story."}])
    with pytest.raises(openai.APIError) as err:
        for i, _ in enumerate(stream):
            if i == 3:
                os.kill(engine_of(base_url)["pid"], signal.SIGKILL)
    assert "llama-server" in str(err.value.message)
    resp = oai.chat.completions.create(model=MODEL, max_tokens=3,
                                       messages=[{"role": "user", "content": "hi"}])
    assert resp.usage.completion_tokens == 3
    assert engine_of(base_url)["restarts"] >= 1


def test_prompt_beyond_default_context_raises_it_up_to_the_trained_one(base_url):
    # gemma3:270m is trained for 32768 tokens; the service loads it with 8192 and grows it
    # when a prompt needs more, instead of refusing or truncating.
    prompt = "apple " * 10000
    resp = requests.post(base_url + "/v1/completions", timeout=300, json={
        "model": "gemma3:270m", "prompt": prompt, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] > 8192
    assert engine_of(base_url, "gemma3:270m")["context_length"] == 16384
    resp = requests.post(base_url + "/v1/completions", timeout=60, json={
        "model": "gemma3:270m", "prompt": "apple " * 40000, "max_tokens": 2})
    assert resp.status_code == 400
    assert "32768" in resp.json()["error"]["message"]
    requests.post(base_url + "/api/generate", json={"model": "gemma3:270m", "keep_alive": 0},
                  timeout=30)


def test_a_larger_num_ctx_waits_for_the_streams_in_progress(base_url):
    """Open WebUI and other Ollama clients send their own num_ctx: a request asking for more
    context than the engine runs with restarts it, and must not cut off the streams it serves
    (Ollama, too, reloads a runner only once it is idle)."""
    model = "gemma3:270m"
    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    stream = oai.chat.completions.create(
        model=model, stream=True, max_tokens=300, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Write a very long story."}])
    chunks = iter(stream)
    next(chunks)
    assert engine_of(base_url, model)["context_length"] == 8192
    answer: dict = {}

    def bigger() -> None:
        answer["response"] = requests.post(base_url + "/api/chat", timeout=300, json={
            "model": model, "stream": False, "options": {"num_ctx": 16384, "num_predict": 2},
            "messages": [{"role": "user", "content": "Hi"}]})
        answer["at"] = time.monotonic()

    asker = threading.Thread(target=bigger, daemon=True)
    asker.start()
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
    stream_ended = time.monotonic()
    asker.join(300)
    assert usage is not None and usage.completion_tokens == 300  # whole, not cut off
    resp = answer["response"]
    assert resp.status_code == 200 and resp.json()["done"], resp.text
    assert answer["at"] > stream_ended  # it waited for the stream
    assert engine_of(base_url, model)["context_length"] == 16384
    requests.post(base_url + "/api/generate", json={"model": model, "keep_alive": 0},
                  timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_shutdown_stops_every_engine(tmp_path, real_models, engine_binary, sig):
    svc = ServiceProcess(tmp_path, real_models)
    try:
        svc.wait_ready()
        for model in ("smollm2:135m", "gemma3:270m"):
            r = requests.post(svc.base_url + "/v1/completions", timeout=120,
                              json={"model": model, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
        engines = svc.engines()
        assert len(engines) == 2
    finally:
        code = svc.stop(sig)
    assert code == 0, svc.log()
    assert not [p for p in engines if pid_alive(p)]


def test_engines_die_with_a_killed_worker(tmp_path, real_models, engine_binary):
    """kill -9 of the one gunicorn worker (its timeout, the OOM killer) leaves no llama-server
    running on: the kernel kills it (PR_SET_PDEATHSIG), and the new worker starts its own.
    (With several workers the engines are the pool's: tests/e2e/test_workers.py.)"""
    svc = ServiceProcess(tmp_path, real_models, extra_env={"OLLAMA_SERVER_WORKERS": "1"})
    try:
        svc.wait_ready()
        r = requests.post(svc.base_url + "/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        (worker,) = svc.worker_pids()
        (engine,) = svc.engines()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not pid_alive(engine), "the orphaned llama-server to be killed", 30)
        svc.wait_ready()  # gunicorn's master starts a new worker, which loads its own engine
        r = requests.post(svc.base_url + "/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert [p for p in svc.engines() if p != engine]
        # And when the whole service is killed at once, nothing is left either.
        engines = svc.engines()
        workers = svc.worker_pids()
        os.kill(svc.proc.pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        for pid in engines:
            wait_for(lambda pid=pid: not pid_alive(pid), f"llama-server {pid} to be killed", 30)
    finally:
        svc.stop()
