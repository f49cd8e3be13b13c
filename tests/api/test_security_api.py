"""Issue 12 through the Flask test client with the scripted executor: keys on every route,
400s (never 500s) for what the engine cannot take, the overload answers with Retry-After, the
per-key limit and the request timeout, each in its dialect's shape.

The settings are changed on the live configuration object between requests: the service reads
them per request (what a configuration reload relies on).
"""

from __future__ import annotations

import json
import logging

import pytest

from ollama_server.api.common import dialect_for_request
from ollama_server.api.security import KEY, PUBLIC, ROUTE_ACCESS
from ollama_server.core.schemas import Finish, TextDelta, Usage

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-9876543210"}
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def config(app):
    """The app's live configuration, with the tiny model as default and two keys."""
    cfg = app.extensions["ollama_server"].config
    cfg.default_model = "tiny"
    cfg.api_keys = dict(KEYS)
    return cfg


def concrete(rule: str) -> str:
    return (rule.replace("<path:model_id>", "tiny").replace("<request_id>", "abc")
            .replace("<digest>", "sha256:" + "0" * 64))


def assert_dialect_error(resp, path: str, method: str = "POST", kind: str | None = None):
    """The error body has the shape of the path's dialect; returns its message."""
    body = resp.get_json()
    dialect = dialect_for_request(path, method, {})
    if dialect == "anthropic":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        if kind:
            assert body["error"]["type"] == kind
        return body["error"]["message"]
    if dialect == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]["message"]
    if dialect == "tgi":
        assert set(body) == {"error", "error_type"}, body
        return body["error"]
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


GUARDED = sorted(r for r, a in ROUTE_ACCESS.items() if a == KEY)


@pytest.mark.parametrize("route", GUARDED)
def test_every_guarded_route_needs_a_valid_key(client, config, route):
    method, rule = route.split(" ", 1)
    path = concrete(rule)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
        resp = client.open(path, method=method, json={}, headers=headers)
        assert resp.status_code == 401, (route, headers, resp.get_data(as_text=True))
        if method != "HEAD":
            assert_dialect_error(resp, path, method)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    for headers in (ALICE, {"x-api-key": KEYS["bob"]}, {"api-key": KEYS["bob"]},
                    {"Authorization": "Bearer wrong", "x-api-key": KEYS["alice"]}):
        resp = client.open(path, method=method, json={}, headers=headers)
        assert resp.status_code != 401, (route, headers)


def test_401_bodies_per_dialect(client, config):
    r = client.post("/v1/chat/completions", json={})
    assert r.get_json()["error"]["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in r.get_json()["error"]["message"]
    r = client.post("/v1/messages", json={}, headers={"x-api-key": "wrong"})
    assert r.get_json()["error"]["type"] == "authentication_error"
    r = client.post("/api/chat", json={})
    assert r.status_code == 401 and "missing API key" in r.get_json()["error"]
    r = client.post("/generate", json={"inputs": "x"})
    assert r.get_json()["error_type"] == "authentication"


@pytest.mark.parametrize("route", sorted(r for r, a in ROUTE_ACCESS.items() if a == PUBLIC))
def test_public_routes_answer_without_a_key(client, config, route):
    method, path = route.split(" ", 1)
    assert client.open(path, method=method).status_code == 200


def test_metrics_is_public_unless_configured(client, config):
    assert client.get("/metrics").status_code == 200
    config.metrics_require_key = True  # applies to the next request: no restart
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=ALICE).status_code == 200


def test_keys_change_with_the_configuration(client, config):
    assert client.get("/api/tags").status_code == 401
    config.api_keys = None
    assert client.get("/api/tags").status_code == 200
    config.api_key = "single"
    assert client.get("/api/tags", headers={"x-api-key": "single"}).status_code == 200
    assert client.get("/api/tags", headers=ALICE).status_code == 401


def test_the_caller_is_named_never_the_key(client, config, caplog):
    caplog.set_level(logging.INFO)
    r = client.post("/v1/chat/completions", headers=ALICE,
                    json={"model": "tiny", "messages": MSGS})
    assert r.status_code == 200
    listing = client.get("/api/requests", headers=ALICE)
    assert listing.get_json()["recent"][0]["caller"] == "alice"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'ollama_server_key_requests_total{key="alice",status="completed"} 1.0' in metrics
    client.post("/v1/chat/completions", json={}, headers={"x-api-key": "not-" + KEYS["bob"]})
    dash = client.get("/dashboard/data", headers=ALICE).get_data(as_text=True)
    everything = (listing.get_data(as_text=True) + metrics + dash + caplog.text)
    assert "(key alice)" in caplog.text
    for key in KEYS.values():
        assert key not in everything


# --- bad input: 400, never 500 --------------------------------------------------------------------

BAD_BODIES = [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00"}]}', "content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
     b'"temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}', "max_tokens"),
    (b'{"model": "tiny", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nests"),
]
ROUTES = ["/v1/chat/completions", "/chat/completions", "/v1/messages", "/api/chat",
          "/api/generate", "/generate", "/v1/embeddings", "/api/embed", "/tokenize",
          "/v1/responses", "/api/create", "/api/show"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("raw, named", BAD_BODIES)
def test_bad_bodies_get_400_in_the_dialect(client, config, path, raw, named):
    resp = client.post(path, data=raw, headers={**ALICE, "Content-Type": "application/json"})
    expected = 422 if dialect_for_request(path, "POST", {}) == "tgi" else 400
    assert resp.status_code == expected, resp.get_data(as_text=True)
    assert named in assert_dialect_error(resp, path)


def test_embedding_input_over_the_batch(client, config):
    long = "word " * 2000
    r = client.post("/v1/embeddings", headers=ALICE, json={"model": "tiny", "input": long})
    assert r.status_code == 400 and "512 tokens" in r.get_json()["error"]["message"]
    r = client.post("/api/embed", headers=ALICE, json={"model": "tiny", "input": long})
    assert r.status_code == 200  # Ollama's truncate (default true) cuts it
    r = client.post("/api/embed", headers=ALICE,
                    json={"model": "tiny", "input": long, "truncate": False})
    assert r.status_code == 400 and "512 tokens" in r.get_json()["error"]


def test_token_default_and_cap_reach_the_engine(client, config, fake_engines):
    config.token_limits = {"tiny": {"default": 7, "cap": 9}}
    client.post("/api/generate", headers=ALICE, json={"model": "tiny", "prompt": "x",
                                                      "stream": False})
    client.post("/v1/chat/completions", headers=ALICE,
                json={"model": "tiny", "messages": MSGS, "max_tokens": 500})
    assert [r.max_tokens for r in fake_engines[-1].requests] == [7, 9]


# --- overload, per-key limit, timeout -------------------------------------------------------------

OVERLOAD = [  # path, body, status, check
    ("/v1/chat/completions", {"model": "tiny", "messages": MSGS}, 429,
     lambda b: b["error"]["type"] == "server_overloaded"),
    ("/v1/embeddings", {"model": "tiny", "input": "x"}, 429,
     lambda b: b["error"]["type"] == "server_overloaded"),
    ("/v1/messages", {"model": "tiny", "messages": MSGS, "max_tokens": 5}, 529,
     lambda b: b["error"]["type"] == "overloaded_error"),
    ("/api/chat", {"model": "tiny", "messages": MSGS}, 503,
     lambda b: b == {"error": "server busy, please try again.  maximum pending requests "
                              "exceeded"}),
    ("/api/generate", {"model": "tiny", "prompt": "x"}, 503, lambda b: "busy" in b["error"]),
    ("/generate", {"inputs": "x"}, 429,
     lambda b: b == {"error": "Model is overloaded", "error_type": "overloaded"}),
    ("/generate", {"prompt": "x"}, 429, lambda b: b["error"]["type"] == "server_overloaded"),
]


def occupy_every_slot(client, config) -> str:
    """Take every slot of the tiny model and allow no waiting (max_queue 0); its name."""
    config.max_queue = 0
    manager = client.application.extensions["ollama_server"].manager
    name = manager.resolve("tiny").name
    for _ in range(config.parallel):
        manager.queue.enter(name, config.parallel, 0, 60)
    return name


@pytest.mark.parametrize("path, body, status, check", OVERLOAD)
def test_a_full_queue_is_refused_at_once_with_retry_after(client, config, path, body, status,
                                                           check):
    name = occupy_every_slot(client, config)
    resp = client.post(path, json=body, headers=ALICE)
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert check(resp.get_json())
    assert int(resp.headers["Retry-After"]) >= 1
    queue = client.application.extensions["ollama_server"].manager.queue
    assert queue.snapshot()[name]["refused"] == 1


def test_a_full_queue_in_a_tgi_stream_is_an_event(client, config):
    occupy_every_slot(client, config)
    resp = client.post("/generate_stream", json={"inputs": "x"}, headers=ALICE)
    assert resp.status_code == 200  # as TGI: errors of a stream are events
    assert json.loads(resp.get_data(as_text=True)[5:]) == {
        "error": "Model is overloaded", "error_type": "overloaded"}


def test_per_key_limit(client, config):
    config.max_requests_per_key = 1
    tracker = client.application.extensions["ollama_server"].tracker
    tracker.start("held", "tiny", "openai", caller="alice")
    r = client.post("/v1/chat/completions", headers=ALICE,
                    json={"model": "tiny", "messages": MSGS})
    assert r.status_code == 429 and r.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert "max_requests_per_key" in r.get_json()["error"]["message"]
    assert r.headers["Retry-After"] == "1"
    r = client.post("/v1/messages", headers=ALICE,
                    json={"model": "tiny", "messages": MSGS, "max_tokens": 5})
    assert r.status_code == 429 and r.get_json()["error"]["type"] == "rate_limit_error"
    r = client.post("/api/embed", headers=ALICE, json={"model": "tiny", "input": "x"})
    assert r.status_code == 429
    r = client.post("/generate", headers=ALICE, json={"inputs": "x"})
    assert r.status_code == 429 and r.get_json()["error_type"] == "rate_limit"
    bob = client.post("/v1/chat/completions", headers={"x-api-key": KEYS["bob"]},
                      json={"model": "tiny", "messages": MSGS})
    assert bob.status_code == 200
    tracker.finish("held")
    assert client.post("/v1/chat/completions", headers=ALICE,
                       json={"model": "tiny", "messages": MSGS}).status_code == 200
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'ollama_server_key_refused_total{key="alice"} 4.0' in metrics


def test_request_timeout_ends_a_slow_generation_in_the_dialect(client, config, script):
    config.request_timeout = 0.05
    script.delay = 0.1
    script.events = [TextDelta("a"), TextDelta("b"), TextDelta("c"),
                     Finish("stop", Usage(prompt_tokens=1, completion_tokens=3))]
    r = client.post("/v1/chat/completions", headers=ALICE,
                    json={"model": "tiny", "messages": MSGS})
    assert r.status_code == 504 and r.get_json()["error"]["code"] == "timeout"
    assert "request_timeout" in r.get_json()["error"]["message"]
    r = client.post("/v1/messages", headers=ALICE,
                    json={"model": "tiny", "messages": MSGS, "max_tokens": 5})
    assert r.status_code == 504 and r.get_json()["error"]["type"] == "timeout_error"
    r = client.post("/api/chat", headers=ALICE,
                    json={"model": "tiny", "messages": MSGS, "stream": True})
    lines = [json.loads(x) for x in r.get_data(as_text=True).splitlines()]
    assert "request_timeout" in lines[-1]["error"]
    r = client.post("/v1/chat/completions", headers=ALICE,
                    json={"model": "tiny", "messages": MSGS, "stream": True})
    frames = r.get_data(as_text=True).split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert json.loads(frames[-3][6:])["error"]["code"] == "timeout"
    listing = client.get("/api/requests", headers=ALICE).get_json()
    assert all(s["state"] == "failed" for s in listing["recent"][:4])
    manager = client.application.extensions["ollama_server"].manager
    assert manager.queue.snapshot()[manager.resolve("tiny").name]["busy"] == 0


# --- found by the fuzzer ------------------------------------------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "assistant", "content": "", "tool_calls": 1e-45}]}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "assistant", "content": "", "tool_calls": [1e-45]}]}),
    ("/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}),
    ("/v1/messages/count_tokens", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}]}]}),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": [1, 2],
                       "images": ["iVBORw0KGgo="]}),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": "not tokens"}),
])
def test_bodies_that_gave_500s(client, config, path, body):
    resp = client.post(path, json=body, headers=ALICE)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert_dialect_error(resp, path)


@pytest.mark.parametrize("path", ["/chat/completions", "/completions", "/embeddings",
                                  "/api/chat/completions"])
def test_openai_aliases_answer_openai_errors(client, config, path):
    resp = client.post(path, data=b"{", headers={**ALICE, "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert set(resp.get_json()["error"]) == {"message", "type", "param", "code"}


def test_streams_stay_one_frame_per_line_with_unicode_line_breaks(client, config, script):
    # U+0085 and U+2028 in text: httpx's iter_lines() (the ollama client) splits on them.
    script.events = [TextDelta("a\x85b"), TextDelta("c\u2028d"),
                     Finish("stop", Usage(prompt_tokens=1, completion_tokens=2))]
    r = client.post("/api/chat", headers=ALICE, json={"model": "tiny", "messages": MSGS})
    lines = r.get_data(as_text=True).splitlines()
    assert "".join(json.loads(x)["message"]["content"] for x in lines) == "a\x85bc\u2028d"
    r = client.post("/v1/chat/completions", headers=ALICE,
                    json={"model": "tiny", "messages": MSGS, "stream": True})
    frames = [x for x in r.get_data(as_text=True).splitlines() if x.startswith("data: {")]
    assert all(json.loads(x[6:]) for x in frames)
