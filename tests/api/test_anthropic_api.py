"""The Anthropic Messages blueprint through Flask's test client, with a scripted executor."""

from __future__ import annotations

import json
from pathlib import Path

from ollama_server.core.errors import ContextLengthExceeded, EngineFailed, Overloaded
from ollama_server.core.schemas import Finish, ReasoningDelta, TextDelta, ToolCall, Usage

MSG = {"model": "tiny", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "anything"}


def events(resp):
    """(event name, data) of an Anthropic SSE body; every frame must have an ``event:`` line."""
    out = []
    for frame in resp.get_data(as_text=True).split("\n\n"):
        if not frame.strip():
            continue
        lines = frame.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        out.append((lines[0][7:], json.loads(lines[1][6:])))
    return out


def test_message_non_stream(client, fake_engines):
    resp = client.post("/v1/messages", json={**MSG, "temperature": 0.1, "top_k": 3,
                                             "stop_sequences": ["END"],
                                             "metadata": {"user_id": "u"}}, headers=HEADERS)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["id"].startswith("msg_") and body["type"] == "message"
    assert body["role"] == "assistant" and body["model"] == "tiny"
    assert body["content"] == [{"type": "text", "text": "Hello world"}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"] == {"input_tokens": 5, "output_tokens": 2,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    req = fake_engines[0].requests[0]
    assert (req.dialect, req.max_tokens, req.temperature, req.top_k, req.stop) == (
        "anthropic", 20, 0.1, 3, ["END"])
    assert resp.headers["request-id"] == resp.headers["X-Request-Id"]


def test_stream_event_sequence(client, script):
    script.events = [ReasoningDelta("think"), TextDelta("Hi"), TextDelta("!"),
                     Finish("length", Usage(prompt_tokens=9, completion_tokens=3,
                                            cached_tokens=4))]
    resp = client.post("/v1/messages", json={**MSG, "stream": True, "max_tokens": 2000,
                                             "thinking": {"type": "enabled",
                                                          "budget_tokens": 1024}},
                       headers=HEADERS)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    assert resp.headers["X-Accel-Buffering"] == "no"
    evs = events(resp)
    assert [n for n, _ in evs] == [
        "message_start", "content_block_start", "ping", "content_block_delta",
        "content_block_delta", "content_block_stop", "content_block_start",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    assert [d["delta"]["type"] for n, d in evs if n == "content_block_delta"] == [
        "thinking_delta", "signature_delta", "text_delta", "text_delta"]
    final = evs[-2][1]
    assert final["delta"]["stop_reason"] == "max_tokens"
    assert final["usage"]["input_tokens"] == 5 and final["usage"]["cache_read_input_tokens"] == 4


def test_thinking_disabled_strips_reasoning(client, script, fake_engines):
    script.events = [TextDelta("<think>secret</think>"), TextDelta("Answer"),
                     Finish("stop", Usage(5, 3))]
    body = client.post("/v1/messages", json={**MSG, "thinking": {"type": "disabled"}}).get_json()
    assert body["content"] == [{"type": "text", "text": "Answer"}]
    assert fake_engines[0].requests[0].reasoning is False


def test_thinking_enabled_gives_a_thinking_block_first(client, script):
    script.events = [TextDelta("<think>sky is blue</think>"), TextDelta("Blue."),
                     Finish("stop", Usage(5, 3))]
    body = client.post("/v1/messages", json={**MSG, "max_tokens": 1500, "thinking": {
        "type": "enabled", "budget_tokens": 1024}}).get_json()
    assert [b["type"] for b in body["content"]] == ["thinking", "text"]
    assert body["content"][0]["thinking"] == "sky is blue" and body["content"][0]["signature"]


def test_tool_use_non_stream_and_round_trip(client, script, fake_engines):
    call = ToolCall("abc", "get_weather", '{"city": "Paris"}')
    script.events = [Finish("tool_calls", Usage(5, 4), tool_calls=[call])]
    tools = [{"name": "get_weather", "description": "Weather",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    body = client.post("/v1/messages", json={**MSG, "tools": tools,
                                             "tool_choice": {"type": "any"}}).get_json()
    assert body["stop_reason"] == "tool_use"
    block = body["content"][0]
    assert block == {"type": "tool_use", "id": "toolu_abc", "name": "get_weather",
                     "input": {"city": "Paris"}}
    script.events = [TextDelta("It is 18C."), Finish("stop", Usage(9, 4))]
    again = client.post("/v1/messages", json={**MSG, "tools": tools, "messages": [
        MSG["messages"][0], {"role": "assistant", "content": body["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"],
                                      "content": "18C"}]}]}).get_json()
    assert again["content"][0]["text"] == "It is 18C."
    # The core may render tool turns as text for a template without tools (tool_fallback):
    # either way the call and its result reach the engine.
    sent = fake_engines[0].requests[1].messages
    assert "get_weather" in sent[-2].content or sent[-2].tool_calls[0].id == "toolu_abc"
    assert "18C" in sent[-1].content


def test_stop_sequence_reported(client, script):
    script.events = [TextDelta("1, 2"), Finish("stop_sequence", Usage(5, 2),
                                               stop_sequence=", 3")]
    body = client.post("/v1/messages", json={**MSG, "stop_sequences": [", 3"]}).get_json()
    assert body["stop_reason"] == "stop_sequence" and body["stop_sequence"] == ", 3"


def test_a_full_context_window_is_its_own_stop_reason(client, script):
    script.events = [TextDelta("a b"), Finish("length", Usage(8181, 11), context_full=True)]
    body = client.post("/v1/messages", json=MSG).get_json()
    assert body["stop_reason"] == "model_context_window_exceeded"
    final = [e for e in events(client.post("/v1/messages", json={**MSG, "stream": True}))
             if e[0] == "message_delta"][-1][1]
    assert final["delta"]["stop_reason"] == "model_context_window_exceeded"
    # The other dialects call it a length stop.
    body = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MSG["messages"]}).get_json()
    assert body["choices"][0]["finish_reason"] == "length"


def test_billing_line_never_reaches_the_engine(client, fake_engines):
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.1.e51; "
                                       "cc_entrypoint=cli; cch=1a2b3;"},
              {"type": "text", "text": "You are a helpful agent."}]
    client.post("/v1/messages", json={**MSG, "system": system})
    assert fake_engines[0].requests[0].messages[0].content == "You are a helpful agent."


def test_error_after_first_byte_is_an_error_event(client, script):
    script.fail_after = 1
    script.mid_error = EngineFailed("llama-server exited with code -9")
    resp = client.post("/v1/messages", json={**MSG, "stream": True})
    assert resp.status_code == 200
    evs = events(resp)
    assert evs[0][0] == "message_start"
    name, data = evs[-1]
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "api_error",
                                               "message": "llama-server exited with code -9"}}
    assert "message_stop" not in [n for n, _ in evs]


def test_overloaded_mid_stream_and_before(client, script):
    script.fail_after = 1
    script.mid_error = Overloaded("busy")
    evs = events(client.post("/v1/messages", json={**MSG, "stream": True}))
    assert evs[-1][1]["error"]["type"] == "overloaded_error"
    script.fail_after = None
    script.error = Overloaded("busy")
    resp = client.post("/v1/messages", json={**MSG, "stream": True})
    assert resp.status_code == 529 and resp.get_json()["error"]["type"] == "overloaded_error"


def test_errors_before_first_byte(client, script):
    def err(resp, status, kind):
        assert resp.status_code == status, resp.get_data(as_text=True)
        body = resp.get_json()
        assert body["type"] == "error" and body["error"]["type"] == kind
        assert body["error"]["message"]
        assert body["request_id"] == resp.headers["request-id"]  # as Anthropic's bodies
        return body

    err(client.post("/v1/messages", json={**MSG, "model": "zzz"}), 404, "not_found_error")
    no_max = {k: v for k, v in MSG.items() if k != "max_tokens"}
    body = err(client.post("/v1/messages", json=no_max), 400, "invalid_request_error")
    assert "max_tokens" in body["error"]["message"]
    err(client.post("/v1/messages", data="{not json", content_type="application/json"),
        400, "invalid_request_error")
    err(client.post("/v1/messages", json=[1]), 400, "invalid_request_error")
    err(client.post("/v1/messages/nope", json=MSG), 404, "not_found_error")
    err(client.get("/v1/messages"), 405, "invalid_request_error")
    url_image = {"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "https://example.com/a.png"}}]}
    err(client.post("/v1/messages", json={**MSG, "messages": [url_image]}), 400,
        "invalid_request_error")
    script.error = ContextLengthExceeded(5000, 4096)
    err(client.post("/v1/messages", json=MSG), 400, "invalid_request_error")
    script.error = EngineFailed("could not start")
    resp = client.post("/v1/messages", json=MSG)
    err(resp, 500, "api_error")
    assert resp.headers["x-should-retry"] == "false"


def test_huge_body_is_413(app, client):
    app.config["MAX_CONTENT_LENGTH"] = 1000
    resp = client.post("/v1/messages", data="x" * 5000, content_type="application/json")
    assert resp.status_code == 413
    assert resp.get_json()["error"]["type"] == "request_too_large"


def test_count_tokens_uses_the_template_and_tokenizer(client, fake_engines):
    resp = client.post("/v1/messages/count_tokens", json={
        "model": "ns/other:v1", "messages": [{"role": "user", "content": "one two three"}]})
    assert resp.status_code == 200
    # The fake template concatenates contents ("Be brief." — the model's system prompt —
    # then the message, "Be brief.one two three"); the fake tokenizer counts words.
    assert resp.get_json() == {"input_tokens": 4}
    resp = client.post("/v1/messages/count_tokens", json={"model": "zzz", "messages": [
        {"role": "user", "content": "x"}]})
    assert resp.status_code == 404 and resp.get_json()["error"]["type"] == "not_found_error"


def test_models_in_anthropic_shape_with_the_version_header(client):
    page = client.get("/v1/models", headers=HEADERS).get_json()
    assert set(page) == {"data", "has_more", "first_id", "last_id"}
    ids = [m["id"] for m in page["data"]]
    assert set(ids) == {"tiny:latest", "ns/other:v1"} and page["has_more"] is False
    item = page["data"][0]
    assert item["type"] == "model" and item["display_name"] == item["id"]
    assert item["created_at"].endswith("Z") and item["max_input_tokens"] == 4096
    one = client.get("/v1/models/ns/other:v1", headers=HEADERS).get_json()
    assert one["type"] == "model" and one["id"] == "ns/other:v1"
    missing = client.get("/v1/models/zzz", headers=HEADERS)
    assert missing.status_code == 404 and missing.get_json()["error"]["type"] == "not_found_error"
    limited = client.get("/v1/models?limit=1", headers=HEADERS).get_json()
    assert len(limited["data"]) == 1 and limited["has_more"] is True
    # Without the header the same path keeps the OpenAI shape.
    assert client.get("/v1/models").get_json()["object"] == "list"


def test_api_key_headers(tiny_store, tmp_path):
    from ollama_server.api.app import create_app
    from ollama_server.config import load_config
    from ollama_server.models.manager import ModelManager

    config = load_config(overrides={"models_dir": str(tiny_store), "api_key": "sekret",
                                    "log_dir": str(tmp_path / "logs")}, environ={})
    app = create_app(config, ModelManager(config, engine_binary=Path("/bin/true")))
    c = app.test_client()
    resp = c.post("/v1/messages/count_tokens", json=MSG, headers={"x-api-key": "wrong"})
    assert resp.status_code == 401
    assert resp.get_json()["error"]["type"] == "authentication_error"
    ok = {"anthropic-version": "2023-06-01"}
    assert c.get("/v1/models", headers={**ok, "x-api-key": "sekret"}).status_code == 200
    assert c.get("/v1/models", headers={**ok, "Authorization": "Bearer sekret"}
                 ).status_code == 200
    assert c.get("/v1/models", headers=ok).get_json()["error"]["type"] == \
        "authentication_error"
    app.extensions["ollama_server"].manager.shutdown()
