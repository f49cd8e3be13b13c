"""An engine that dies by a signal while loading (as an AMX build does on an AMX CPU), seen
through the API: the error names the signal and the fix in each dialect, /health reports the
model, and a start that crashes twice is not retried on every request."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ollama_server.config import load_config
from ollama_server.core.engine.exits import REBUILD_COMMAND
from ollama_server.core.request_tracker import RequestTracker
from ollama_server.models.manager import ModelManager

MODEL = "tiny:latest"


@pytest.fixture
def crashing_engine(tmp_path) -> tuple[Path, Path]:
    """(binary, counter): an "engine" that logs a line, counts its runs and dies by SIGILL."""
    counter = tmp_path / "runs"
    script = tmp_path / "llama-server"
    script.write_text(f"#!/bin/sh\necho run >> {counter}\n"
                      "echo 'load_tensors: loading model tensors' >&2\nkill -ILL $$\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, counter


@pytest.fixture
def crash_client(tiny_store, tmp_path, crashing_engine):
    binary, _ = crashing_engine
    config = load_config(overrides={"models_dir": str(tiny_store), "default_model": MODEL,
                                    "log_dir": str(tmp_path / "logs")}, environ={})
    manager = ModelManager(config, engine_binary=binary)  # the real LLAMAExecutor
    from ollama_server.api.app import create_app

    app = create_app(config, manager=manager, tracker=RequestTracker())
    yield app.test_client()
    manager.shutdown()


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_signal_death_in_openai_and_ollama_dialects_and_health(crash_client, crashing_engine):
    _, counter = crashing_engine
    assert crash_client.get("/health").status_code == 200  # nothing tried yet

    resp = crash_client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 500
    err = resp.get_json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for words in ("SIGILL", "illegal instruction", REBUILD_COMMAND, "while loading",
                  "load_tensors"):
        assert words in err["message"]

    resp = crash_client.post("/api/chat", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert resp.status_code == 500
    body = resp.get_json()
    assert list(body) == ["error"] and "SIGILL" in body["error"]
    assert REBUILD_COMMAND in body["error"]
    assert runs(counter) == 2

    # Two failed starts in a row: the third request gets the same error at once.
    resp = crash_client.post("/api/generate", json={"model": MODEL, "prompt": "x",
                                                    "stream": False})
    assert resp.status_code == 500
    assert "SIGILL" in resp.get_json()["error"]
    assert "not retried for another" in resp.get_json()["error"]
    assert runs(counter) == 2

    health = crash_client.get("/health")
    assert health.status_code == 503
    data = health.get_json()
    assert data["status"] == "unhealthy"
    [failed] = data["failed_models"]
    assert failed["name"] == MODEL and "SIGILL" in failed["error"]
    assert failed["failed_starts"] == 2 and failed["retry_in_s"] > 0


def test_anthropic_dialect_names_the_signal(crash_client):
    resp = crash_client.post("/v1/messages", json={
        "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 500
    body = resp.get_json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "SIGILL" in body["error"]["message"]
