"""The real service: /metrics parsed with prometheus_client's parser after real requests,
/api/progress of a live stream, /health, request ids in the real log file, and the gauges a
gateway reads (KV cache, cache config, GPUs) with one worker and with several."""

from __future__ import annotations

import json
import re
import time
import uuid

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServiceProcess, host_gpus, pid_alive

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    resp = requests.get(base_url + "/metrics", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_metrics_match_the_requests_sent(base_url, oai):
    oai.chat.completions.create(model=MODEL, max_tokens=1,
                                messages=[{"role": "user", "content": "hi"}])  # load it
    before = scrape(base_url)
    usages = []
    for question in ("Name a color.", "Name a fruit."):
        resp = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12,
            temperature=0)
        usages.append(resp.usage)
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=20,
        stream=True, stream_options={"include_usage": True}, temperature=0))
    usages.append(chunks[-1].usage)
    usages.append(oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=9,
                                         temperature=0).usage)
    # A prompt longer than the model's whole context fails after it was tracked.
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=4)
    after = scrape(base_url)

    sent = len(usages)
    prompt = sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    labels = {"dialect": "openai", "model": MODEL}
    assert delta(before, after, "ollama_server_requests_total", status="completed",
                 **labels) == sent
    assert delta(before, after, "ollama_server_requests_total", status="failed", **labels) == 1
    assert delta(before, after, "ollama_server_generated_tokens_total", **labels) == generated
    assert delta(before, after, "vllm:generation_tokens_total", model_name=MODEL) == generated
    assert delta(before, after, "tgi_request_generated_tokens_sum") == generated
    # The failed request never reached the engine's prompt evaluation: it adds no tokens.
    assert delta(before, after, "ollama_server_prompt_tokens_total", **labels) == prompt
    assert delta(before, after, "vllm:prompt_tokens_total", model_name=MODEL) == prompt
    assert delta(before, after, "ollama_server_time_to_first_token_seconds_count",
                 **labels) == sent
    assert delta(before, after, "vllm:time_to_first_token_seconds_count",
                 model_name=MODEL) == sent
    assert delta(before, after, "ollama_server_request_duration_seconds_count",
                 **labels) == sent + 1
    assert delta(before, after, "vllm:e2e_request_latency_seconds_count",
                 model_name=MODEL) == sent + 1
    assert delta(before, after, "vllm:request_success_total", model_name=MODEL,
                 finished_reason="abort") == 1
    assert delta(before, after, "tgi_request_count") == sent + 1
    assert delta(before, after, "tgi_request_success") == sent
    assert after[("ollama_server_model_loaded", (("context_length", "8192"),
                                                 ("model", MODEL), ("state", "ready")))] == 1
    assert after[("ollama_server_models_loaded", ())] >= 1
    assert after[("vllm:num_requests_running", (("model_name", MODEL),))] == 0
    assert after[("ollama_server_engine_restarts_total", ())] == 0


def test_metrics_prompt_tokens_of_completed_requests(base_url, oai):
    before = scrape(base_url)
    usage = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_tokens=3).usage
    after = scrape(base_url)
    assert delta(before, after, "ollama_server_prompt_tokens_total", dialect="openai",
                 model=MODEL) == usage.prompt_tokens
    assert delta(before, after, "tgi_request_input_length_sum") == usage.prompt_tokens


def test_progress_of_a_live_stream(base_url):
    resp = requests.post(base_url + "/v1/chat/completions", stream=True, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 200, "ignore_eos": True, "stream": True})
    assert resp.status_code == 200
    rid = resp.headers["X-Request-Id"]
    seen = []
    content_chunks = 0
    for line in resp.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        choices = json.loads(line[6:])["choices"]
        if choices and choices[0]["delta"].get("content"):
            content_chunks += 1
            if content_chunks % 25 == 0 and content_chunks < 200:
                progress = requests.get(f"{base_url}/api/progress/{rid}", timeout=10).json()
                # The service counts a token before it sends it.
                assert progress["tokens_generated"] >= content_chunks
                seen.append(progress)
    resp.close()
    assert content_chunks == 200 and len(seen) == 7
    tokens = [p["tokens_generated"] for p in seen]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1] < 200, tokens
    assert all(p["state"] == "generating" and p["max_tokens"] == 200 for p in seen)
    assert all(0 < p["progress"] < 1 for p in seen)
    assert all(p["prompt_tokens"] > 5 for p in seen)  # known once the prompt is evaluated
    assert all(p["id"] == rid and p["dialect"] == "openai" and p["model"] == MODEL
               for p in seen)
    final = requests.get(f"{base_url}/api/progress/{rid}", timeout=10).json()
    assert (final["state"], final["tokens_generated"], final["progress"]) == ("completed", 200,
                                                                              1.0)
    assert final["finish_reason"] == "length"
    assert final["ttft_ms"] > 0 and final["tokens_per_second"] > 0


def test_requests_list_and_health(base_url):
    body = requests.get(base_url + "/api/requests", timeout=10).json()
    assert body["recent"] and body["totals"]["requests"] >= len(body["recent"])
    health = requests.get(base_url + "/health", timeout=10)
    assert health.status_code == 200
    h = health.json()
    assert h["status"] == "ok" and h["engine"].endswith("llama-server")
    assert h["models_available"] >= 2
    loaded = {m["name"]: m for m in h["models_loaded"]}
    assert loaded[MODEL]["pid"] and loaded[MODEL]["port"] and loaded[MODEL]["state"] == "ready"


LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - \S+ - [A-Z]+ - \[([^\]]*)\] ")


def test_log_lines_of_a_stream_carry_its_request_id(base_url, service):
    rid = "e2e-log-" + uuid.uuid4().hex[:8]
    resp = requests.post(base_url + "/v1/chat/completions", headers={"X-Request-Id": rid},
                         json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                               "max_tokens": 5, "stream": True}, timeout=60)
    assert resp.status_code == 200 and resp.headers["X-Request-Id"] == rid
    log_file = service.log_path.parent / "logs" / "server.log"
    deadline = time.monotonic() + 10
    mine: list[str] = []
    while time.monotonic() < deadline and not mine:
        mine = [line for line in log_file.read_text().splitlines() if f"request {rid} " in line]
        time.sleep(0.2)
    # "request <id> completed" is logged inside the stream, after the view returned.
    assert mine, f"no line about {rid} in {log_file}"
    for line in mine:
        match = LINE.match(line)
        assert match and match.group(1) == rid, line


# --- issue 21: what a gateway reads, with one worker and with several ----------------------

@pytest.fixture(scope="module", params=["1", "2"], ids=["one-worker", "two-workers"])
def gateway_service(request, tmp_path_factory, real_models, engine_binary):
    """The real service with one worker (its engines are its children) or two (an engine pool
    process owns the engines and renders /metrics for both)."""
    svc = ServiceProcess(tmp_path_factory.mktemp(f"gateway{request.param}"), real_models,
                         args=["--parallel", "2"],
                         extra_env={"OLLAMA_SERVER_WORKERS": request.param})
    svc.ready_or_stopped()
    svc.workers = request.param
    yield svc
    engines = svc.engines()
    code = svc.stop()
    assert not [p for p in engines if pid_alive(p)], "llama-server left after the stop"
    assert code == 0, svc.log()


def kv_usage(found: dict) -> float | None:
    return found.get(("vllm:kv_cache_usage_perc", (("model_name", MODEL),)))


def test_kv_cache_and_cache_config_for_a_gateway(gateway_service):
    base = gateway_service.base_url
    pool = requests.get(base + "/health", timeout=30).json()["engine_pool"]
    assert (pool is not None) == (gateway_service.workers == "2")  # the mode under test
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model=MODEL, max_tokens=8,
                                            messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].message.content
    found = scrape(base)
    assert 0.0 <= kv_usage(found) <= 1.0
    (context,) = [dict(k)["context_length"] for (n, k) in found
                  if n == "ollama_server_model_loaded" and dict(k)["model"] == MODEL]
    configs = {k: v for (n, k), v in found.items() if n == "vllm:cache_config_info"}
    (labels,) = [dict(k) for k in configs if dict(k)["model_name"] == MODEL]
    assert configs[tuple(sorted(labels.items()))] == 1.0
    # The KV cache is what the slots share (kv_pool_size: by default several contexts).
    (pool,) = [m["kv_pool_size"] for m in requests.get(base + "/api/ps", timeout=30).json()[
        "models"] if m["name"] == MODEL]
    assert context == "8192" and pool % 8192 == 0
    assert labels["num_gpu_blocks"] == labels["kv_cache_size_tokens"] == str(pool)
    assert (labels["block_size"], labels["cache_dtype"], labels["enable_prefix_caching"]) == (
        "1", "f16", "True")
    assert int(labels["kv_cache_memory_bytes"]) > 0  # the engine's KV buffers, from its log

    # In the middle of a long stream its slot holds the prompt and the tokens so far.
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=4000, stream=True, extra_body={"ignore_eos": True})
    chunks, usage = 0, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
        if chunks >= 8:
            # An engine that does not answer within the timeout is left out of a scrape:
            # read on (the stream goes on for thousands of tokens) and scrape again.
            usage = kv_usage(scrape(base))
            if usage is not None or chunks >= 40:
                break
    stream.close()
    assert usage is not None, "no vllm:kv_cache_usage_perc sample while the stream ran"
    assert 0.0 < usage <= 1.0
    assert usage * int(labels["kv_cache_size_tokens"]) >= chunks  # prompt + tokens so far

    # The stream cancelled, its slot is idle again: the cache counts as free.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = scrape(base)
        if kv_usage(found) == 0.0 and found[("vllm:num_requests_running",
                                             (("model_name", MODEL),))] == 0:
            break
        time.sleep(0.2)
    assert kv_usage(found) == 0.0


def test_gpu_series_or_one_line_saying_why_not(gateway_service):
    base = gateway_service.base_url
    texts = []
    for _ in range(3):
        requests.get(base + "/health", timeout=30)
        texts.append(requests.get(base + "/metrics", timeout=30).text)
    log_file = gateway_service.log_path.parent / "logs" / "server.log"
    said = [line for line in log_file.read_text().splitlines() if "no NVIDIA GPU" in line]
    if host_gpus():  # a host with a GPU: its series, nothing said
        assert all("ollama_server_gpu_utilization_ratio{" in t for t in texts)
        assert said == []
        return
    assert all("ollama_server_gpu_" not in text for text in texts)
    # One line for the service: a single worker says it, or the engine pool (its workers
    # say it at debug level only).
    assert len(said) == 1 and " - INFO - " in said[0], said
    assert "NVML not found" in said[0]

