"""Monitoring over the Flask client with the scripted executor: /metrics, /api/requests,
/api/progress, /health, the dashboard's page and data, and request ids in log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ollama_server.config import load_config
from ollama_server.core.errors import EngineFailed
from ollama_server.core.request_tracker import RequestTracker
from ollama_server.core.schemas import Finish, TextDelta, Usage
from ollama_server.logs import RequestIdFilter, request_id_var
from ollama_server.models.manager import ModelManager
from tests.helpers import FakeExecutor

MODEL = "tiny:latest"


def scrape(client) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, through prometheus_client's parser."""
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(client, stream: bool = False, headers: dict | None = None, max_tokens: int = 8):
    return client.post("/v1/chat/completions", headers=headers or {}, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens, "stream": stream})


def test_metrics_count_requests_tokens_and_latency(client):
    assert chat(client).status_code == 200
    resp = chat(client, stream=True)
    assert resp.status_code == 200 and b"[DONE]" in resp.data
    m = scrape(client)
    labels = {"dialect": "openai", "model": MODEL}
    assert val(m, "ollama_server_requests_total", status="completed", **labels) == 2
    assert val(m, "ollama_server_prompt_tokens_total", **labels) == 10
    assert val(m, "ollama_server_generated_tokens_total", **labels) == 4
    assert val(m, "ollama_server_time_to_first_token_seconds_count", **labels) == 2
    assert val(m, "ollama_server_request_duration_seconds_count", **labels) == 2
    assert val(m, "vllm:prompt_tokens_total", model_name=MODEL) == 10
    assert val(m, "vllm:generation_tokens_total", model_name=MODEL) == 4
    assert val(m, "vllm:time_to_first_token_seconds_count", model_name=MODEL) == 2
    assert val(m, "vllm:e2e_request_latency_seconds_count", model_name=MODEL) == 2
    assert val(m, "vllm:request_success_total", model_name=MODEL, finished_reason="stop") == 2
    assert val(m, "tgi_request_count") == 2 and val(m, "tgi_request_success") == 2
    assert val(m, "tgi_request_duration_count") == 2
    assert val(m, "tgi_request_generated_tokens_sum") == 4
    assert val(m, "tgi_request_input_length_sum") == 10
    # Per request: the queue, the prompt and generated sizes, the time per output token.
    assert val(m, "vllm:request_queue_time_seconds_count", model_name=MODEL) == 2
    assert val(m, "vllm:request_prompt_tokens_sum", model_name=MODEL) == 10
    assert val(m, "vllm:request_generation_tokens_sum", model_name=MODEL) == 4
    assert val(m, "vllm:time_per_output_token_seconds_count", model_name=MODEL) == 2
    assert val(m, "tgi_request_queue_duration_count") == 2
    assert val(m, "tgi_request_inference_duration_count") == 2
    assert val(m, "tgi_request_mean_time_per_token_duration_count") == 2
    assert val(m, "ollama_server_models_loaded") == 1
    assert val(m, "ollama_server_model_loaded", model=MODEL, state="ready",
               context_length="4096") == 1
    assert val(m, "ollama_server_requests_in_flight", model=MODEL) == 0
    assert val(m, "vllm:num_requests_running", model_name=MODEL) == 0
    assert val(m, "tgi_batch_current_size") == 0 and val(m, "tgi_queue_size") == 0
    assert ("ollama_server_engine_restarts_total", ()) in m


def test_metrics_families_have_the_peer_types(client):
    chat(client)
    text = client.get("/metrics").get_data(as_text=True)
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["vllm:num_requests_running"] == "gauge"
    assert types["vllm:num_requests_waiting"] == "gauge"
    assert types["vllm:prompt_tokens"] == "counter"
    assert types["vllm:generation_tokens"] == "counter"
    assert types["vllm:time_to_first_token_seconds"] == "histogram"
    assert types["vllm:e2e_request_latency_seconds"] == "histogram"
    assert types["tgi_request_duration"] == "histogram"
    assert types["tgi_request_generated_tokens"] == "histogram"
    assert types["tgi_request_input_length"] == "histogram"
    for name in ("vllm:request_queue_time_seconds", "vllm:request_prompt_tokens",
                 "vllm:request_generation_tokens", "vllm:time_per_output_token_seconds",
                 "tgi_request_queue_duration", "tgi_request_inference_duration",
                 "tgi_request_mean_time_per_token_duration"):
        assert types[name] == "histogram", name
    assert types["tgi_queue_size"] == "gauge" and types["tgi_batch_current_size"] == "gauge"
    # Exact TGI names (no _total): exposed untyped, see metrics.py.
    assert "tgi_request_count 1.0" in text.splitlines()
    assert "tgi_request_success 1.0" in text.splitlines()
    assert not any(line.startswith("tgi_request_count_total") for line in text.splitlines())


def test_metrics_failed_requests(client, script):
    script.error = EngineFailed("llama-server crashed")
    assert chat(client).status_code == 500
    script.error = None
    script.fail_after, script.mid_error = 1, EngineFailed("died mid-stream")
    resp = chat(client, stream=True)
    assert resp.status_code == 200 and b'"error"' in resp.data
    m = scrape(client)
    assert val(m, "ollama_server_requests_total", dialect="openai", model=MODEL,
               status="failed") == 2
    assert val(m, "ollama_server_requests_total", dialect="openai", model=MODEL,
               status="completed") == 0
    assert val(m, "vllm:request_success_total", model_name=MODEL, finished_reason="abort") == 2
    assert val(m, "tgi_request_count") == 2 and val(m, "tgi_request_success") == 0
    # Only the mid-stream failure produced a first token.
    assert val(m, "ollama_server_time_to_first_token_seconds_count", dialect="openai",
               model=MODEL) == 1
    assert client.get("/api/requests").get_json()["totals"]["errors"] == 2


def test_metrics_in_flight_and_waiting(app, client):
    resp = client.post("/v1/chat/completions", buffered=False, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    tracker = app.extensions["ollama_server"].tracker
    tracker.start("queued-1", MODEL, "ollama")  # a request still waiting in the queue
    m = scrape(client)
    assert val(m, "ollama_server_requests_in_flight", model=MODEL) == 2
    assert val(m, "ollama_server_requests_waiting", model=MODEL) == 1
    assert val(m, "vllm:num_requests_running", model_name=MODEL) == 1
    assert val(m, "vllm:num_requests_waiting", model_name=MODEL) == 1
    assert val(m, "tgi_batch_current_size") == 1 and val(m, "tgi_queue_size") == 1
    b"".join(resp.response)
    resp.close()
    tracker.finish("queued-1")
    m = scrape(client)
    assert val(m, "ollama_server_requests_in_flight", model=MODEL) == 0
    assert val(m, "vllm:num_requests_waiting", model_name=MODEL) == 0


def test_engine_restarts_stay_counted_after_unload(app, client, fake_engines):
    chat(client)
    fake_engines[0].restarts = 2
    assert val(scrape(client), "ollama_server_engine_restarts_total") == 2
    app.extensions["ollama_server"].manager.unload(MODEL)
    m = scrape(client)
    assert val(m, "ollama_server_engine_restarts_total") == 2
    assert val(m, "ollama_server_models_loaded") == 0


def test_each_app_has_its_own_registry(app, client, tiny_store, script, tmp_path):
    from ollama_server.api.app import create_app

    config = load_config(overrides={"models_dir": str(tiny_store),
                                    "log_dir": str(tmp_path / "logs2")}, environ={})
    manager = ModelManager(config, executor_factory=lambda info, ctx: FakeExecutor(
        info.name, ctx, script), engine_binary=Path("/bin/true"))
    other = create_app(config, manager=manager, tracker=RequestTracker())
    try:
        chat(client)
        assert val(scrape(other.test_client()), "tgi_request_count") == 0
        assert val(scrape(client), "tgi_request_count") == 1
    finally:
        manager.shutdown()


def test_requests_list_active_and_recent(client):
    resp = chat(client)
    rid = resp.headers["X-Request-Id"]
    body = client.get("/api/requests").get_json()
    assert body["active"] == []
    row = body["recent"][0]
    assert row["id"] == rid
    assert (row["state"], row["dialect"], row["model"]) == ("completed", "openai", MODEL)
    assert (row["prompt_tokens"], row["tokens_generated"], row["max_tokens"]) == (5, 2, 8)
    assert row["progress"] == 1.0 and row["finish_reason"] == "stop"
    assert body["totals"] == {"requests": 1, "errors": 0, "prompt_tokens": 5,
                              "generated_tokens": 2}


def test_progress_follows_a_stream_by_its_request_id(client, script):
    script.events = [TextDelta("a"), TextDelta("b"), TextDelta("c"),
                     Finish("length", Usage(prompt_tokens=4, completion_tokens=3))]
    resp = chat(client, stream=True, headers={"X-Request-Id": "client-id-1"}, max_tokens=3)
    assert resp.headers["X-Request-Id"] == "client-id-1" and b"[DONE]" in resp.data
    # buffered=False: the generator runs only as we read it.
    resp = client.post("/v1/chat/completions", buffered=False,
                       json={"model": MODEL, "max_tokens": 3, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]})
    rid = resp.headers["X-Request-Id"]
    seen = []
    for frame in resp.response:
        text = frame.decode() if isinstance(frame, bytes) else frame
        if not text.startswith("data: {"):
            continue
        choices = json.loads(text[6:])["choices"]
        if choices and choices[0]["delta"].get("content"):
            seen.append(client.get(f"/api/progress/{rid}").get_json())
    resp.close()
    assert [p["tokens_generated"] for p in seen] == [1, 2, 3]
    assert all(p["state"] == "generating" for p in seen)
    assert [p["progress"] for p in seen] == pytest.approx([1 / 3, 2 / 3, 1.0])
    done = client.get(f"/api/progress/{rid}").get_json()
    assert (done["state"], done["progress"], done["finish_reason"]) == ("completed", 1.0,
                                                                         "length")
    assert done["ttft_ms"] is not None
    first = client.get("/api/progress/client-id-1").get_json()
    assert first["tokens_generated"] == 3 and first["state"] == "completed"


def test_progress_unknown_id_is_404(client):
    resp = client.get("/api/progress/nope")
    assert resp.status_code == 404
    assert "nope" in json.dumps(resp.get_json())


def test_health_ok(client):
    resp = client.get("/health")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "ok" and body["models_available"] == 2
    assert body["engine"] == "/bin/true" and "gpu" in body


def test_health_503_when_the_engine_cannot_be_found(tiny_store, tmp_path, script):
    from ollama_server.api.app import create_app

    config = load_config(overrides={"models_dir": str(tiny_store),
                                    "llama_cpp_path": str(tmp_path / "no-llama.cpp"),
                                    "log_dir": str(tmp_path / "logs")}, environ={})
    manager = ModelManager(config, executor_factory=lambda info, ctx: FakeExecutor(
        info.name, ctx, script))
    try:
        resp = create_app(config, manager=manager).test_client().get("/health")
    finally:
        manager.shutdown()
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["status"] == "unhealthy"
    assert "no-llama.cpp" in body["error"] and "llama-server" in body["error"]


def test_dashboard_page_is_self_contained(client):
    resp = client.get("/dashboard")
    assert resp.status_code == 200 and resp.content_type.startswith("text/html")
    html = resp.get_data(as_text=True)
    assert "<style>" in html and "<script>" in html
    # No external asset of any kind: no src/href attributes, no URL schemes, no imports.
    for needle in ("src=", "href=", "http://", "https://", "@import", "<link"):
        assert needle not in html, needle
    assert 'name="viewport"' in html


def test_dashboard_data(client, fake_engines):
    chat(client)
    resp = client.post("/v1/chat/completions", buffered=False, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "max_tokens": 8})
    data = client.get("/dashboard/data").get_json()
    b"".join(resp.response)
    resp.close()
    (model,) = data["models"]
    assert model["name"] == MODEL and model["context_length"] == 4096
    assert model["pid"] == fake_engines[0].pid and model["port"] == 1
    assert model["size"] > 0 and model["in_flight"] == 1
    if data["gpu"] is None:
        assert model["gpu_memory_mib"] is None
    assert [r["state"] for r in data["active"]] == ["processing"]
    assert data["active"][0]["max_tokens"] == 8
    assert data["recent"][0]["state"] == "completed"
    assert data["totals"]["requests"] == 2 and data["totals"]["in_flight"] == 1
    series = data["throughput"]["tokens_per_second"]
    assert len(series) == 60 and sum(series) > 0
    assert sorted(data["models_available"]) == ["ns/other:v1", MODEL]
    after = client.get("/dashboard/data").get_json()
    assert after["models"][0]["in_flight"] == 0
    assert after["models"][0]["expires_in_s"] == pytest.approx(300, abs=2)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_request_id_on_lines_logged_inside_a_stream(client):
    handler = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        resp = chat(client, stream=True, headers={"X-Request-Id": "rid-in-stream"})
        assert b"[DONE]" in resp.data
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    # Logged by the Generation when the stream ends, after the view returned.
    ends = [r for r in handler.records if r.getMessage().startswith("request rid-in-stream ")]
    assert ends and all(r.request_id == "rid-in-stream" for r in ends)
    # The id does not leak out of its request.
    assert request_id_var.get() == "-"
