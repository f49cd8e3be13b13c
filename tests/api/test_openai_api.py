"""The OpenAI blueprint through Flask's test client, with a scripted executor."""

from __future__ import annotations

import json

from ollama_server.core.errors import ContextLengthExceeded, EngineFailed
from ollama_server.core.schemas import Finish, TextDelta, Usage

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def sse(resp):
    frames = [f[6:] for f in resp.get_data(as_text=True).split("\n\n") if f.startswith("data: ")]
    return frames[:-1], frames[-1]


def test_chat_non_stream(client, fake_engines):
    resp = client.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["choices"][0]["message"]["content"] == "Hello world"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0}}
    req = fake_engines[0].requests[0]
    assert req.temperature == 0.5  # from the manifest's params layer
    assert resp.headers["X-Request-Id"]


def test_chat_stream_frames(client):
    resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["X-Accel-Buffering"] == "no"
    frames, done = sse(resp)
    assert done == "[DONE]"
    chunks = [json.loads(f) for f in frames]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) \
        == "Hello world"
    assert chunks[-1]["usage"]["total_tokens"] == 7


def test_error_after_first_byte_is_an_error_chunk_then_done(client, script):
    script.fail_after = 1
    script.mid_error = EngineFailed("llama-server exited with code -9")
    frames, done = sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert done == "[DONE]"
    last = json.loads(frames[-1])
    assert last["error"]["type"] == "server_error" and "-9" in last["error"]["message"]


def test_context_error_before_first_byte_is_400(client, script):
    script.error = ContextLengthExceeded(5000, 4096)
    resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "5000" in err["message"] and "4096" in err["message"]


def test_unknown_model_404(client):
    resp = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "model_not_found"


def test_bad_json_and_wrong_types(client):
    resp = client.post("/v1/chat/completions", data="{nope",
                       content_type="application/json")
    assert resp.status_code == 400
    assert resp.get_json()["error"]["type"] == "invalid_request_error"
    resp = client.post("/v1/chat/completions", data="[1,2]", content_type="application/json")
    assert resp.status_code == 400
    resp = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": "ten"})
    assert resp.status_code == 400 and resp.get_json()["error"]["param"] == "max_tokens"


def test_unmatched_url_and_method_are_openai_shaped(client):
    resp = client.get("/v1/does-not-exist")
    assert resp.status_code == 404 and "error" in resp.get_json()
    assert isinstance(resp.get_json()["error"], dict)
    resp = client.get("/v1/chat/completions")
    assert resp.status_code == 405 and isinstance(resp.get_json()["error"], dict)
    assert "POST" in resp.headers["Allow"].split(", ")  # RFC 9110: a 405 names them
    # The anthropic SDK's header makes an unknown /v1 route an Anthropic-shaped 404.
    resp = client.post("/v1/foo", json={}, headers={"anthropic-version": "2023-06-01"})
    assert resp.status_code == 404
    assert resp.get_json()["type"] == "error"
    assert resp.get_json()["error"]["type"] == "not_found_error"


def test_huge_body_is_413(app, client):
    app.config["MAX_CONTENT_LENGTH"] = 1000
    resp = client.post("/v1/chat/completions", data="x" * 5000,
                       content_type="application/json")
    assert resp.status_code == 413
    assert resp.get_json()["error"]["code"] == "request_too_large"


def test_models_and_embeddings(client):
    data = client.get("/v1/models").get_json()["data"]
    assert {m["id"] for m in data} == {"tiny:latest", "ns/other:v1"}
    assert client.get("/v1/models/ns/other:v1").get_json()["max_model_len"] == 4096
    assert client.get("/v1/models/zzz").status_code == 404
    body = client.post("/v1/embeddings", json={"model": "tiny", "input": ["a", "b"],
                                               "encoding_format": "float"}).get_json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 6


def test_progress_is_tracked_under_the_response_request_id(client):
    resp = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc123"})
    assert resp.headers["X-Request-Id"] == "abc123"
    status = client.get("/api/progress/abc123").get_json()
    assert status["state"] == "completed" and status["tokens_generated"] == 2


def test_client_disconnect_closes_the_engine_stream(client, script, fake_engines):
    script.events = [TextDelta("x")] * 50 + [Finish("length", Usage(1, 50))]
    resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                       buffered=False)
    it = resp.response
    next(iter(it))
    resp.close()  # what the WSGI server does when the client goes away
    assert fake_engines[0].streams[0].closed
    status = client.get("/api/requests").get_json()
    assert status["active"] == [] and status["recent"][0]["state"] == "cancelled"


def test_api_key(tiny_store, tmp_path):
    from pathlib import Path

    from ollama_server.api.app import create_app
    from ollama_server.config import load_config
    from ollama_server.models.manager import ModelManager

    config = load_config(overrides={"models_dir": str(tiny_store), "api_key": "sekret"},
                         environ={})
    app = create_app(config, ModelManager(config, engine_binary=Path("/bin/true")))
    c = app.test_client()
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert c.get("/v1/models", headers={"x-api-key": "sekret"}).status_code == 200
    app.extensions["ollama_server"].manager.shutdown()


def test_cors_preflight_and_allowed_origins(client):
    pre = client.options("/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    resp = client.get("/v1/models", headers={"Origin": "http://127.0.0.1:8080"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8080"
    assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
    other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers


def test_cors_origins_are_configurable():
    from ollama_server.config import load_config

    assert load_config(environ={"OLLAMA_SERVER_CORS_ORIGINS": "*"}).cors_origins == ["*"]
    extra = load_config(environ={"OLLAMA_ORIGINS": "https://chat.example"}).cors_origins
    assert "https://chat.example" in extra and "http://localhost:*" in extra
