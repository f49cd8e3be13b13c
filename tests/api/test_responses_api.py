"""The Responses API blueprint through Flask's test client, with a scripted executor."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import Response

from ollama_server.core.errors import ContextLengthExceeded, EngineFailed
from ollama_server.core.schemas import Finish, TextDelta, ToolCallDelta, Usage

BODY = {"model": "tiny", "input": "hi"}


def events(resp):
    """(event line, data) of each SSE frame."""
    out = []
    for frame in resp.get_data(as_text=True).split("\n\n"):
        if not frame.strip():
            continue
        name, data = frame.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ")
        out.append((name[7:], json.loads(data[6:])))
    return out


def test_non_stream(client, fake_engines):
    resp = client.post("/v1/responses", json={**BODY, "instructions": "Be brief.",
                                              "max_output_tokens": 50})
    assert resp.status_code == 200
    obj = Response.model_validate(resp.get_json())
    assert obj.object == "response" and obj.id.startswith("resp_")
    assert obj.output_text == "Hello world" and obj.status == "completed"
    assert obj.usage.input_tokens == 5 and obj.usage.output_tokens == 2
    assert obj.temperature == 0.5  # the manifest's default, echoed as used
    assert obj.instructions == "Be brief." and obj.max_output_tokens == 50
    req = fake_engines[0].requests[0]
    assert [m.role for m in req.messages] == ["system", "user"] and req.max_tokens == 50


def test_stream_events(client):
    resp = client.post("/v1/responses", json={**BODY, "stream": True})
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["X-Accel-Buffering"] == "no"
    evs = events(resp)
    assert all(name == data["type"] for name, data in evs)
    assert [d["sequence_number"] for _, d in evs] == list(range(len(evs)))
    assert [n for n, _ in evs][:2] == ["response.created", "response.in_progress"]
    assert evs[-1][0] == "response.completed"
    assert "".join(d["delta"] for n, d in evs if n == "response.output_text.delta") == \
        "Hello world"
    assert Response.model_validate(evs[-1][1]["response"]).usage.total_tokens == 7


def test_stream_tool_call_and_tools_sent(client, script, fake_engines):
    script.events = [ToolCallDelta(0, "call_1", "get", '{"city":"Paris"}'),
                     Finish("tool_calls", Usage(5, 7))]
    tool = {"type": "function", "name": "get", "parameters": {"type": "object"}}
    evs = events(client.post("/v1/responses", json={**BODY, "stream": True, "tools": [tool],
                                                    "tool_choice": "required"}))
    done = [d for n, d in evs if n == "response.function_call_arguments.done"]
    assert done[0]["arguments"] == '{"city":"Paris"}'
    final = Response.model_validate(evs[-1][1]["response"])
    assert final.output[0].type == "function_call" and final.output[0].call_id == "call_1"
    assert final.tools[0].name == "get" and final.tool_choice == "required"
    req = fake_engines[0].requests[0]
    # The tiny model's template has no tools: the core's fallback puts them in the prompt.
    assert req.tools[0].name == "get" if req.tools else \
        any('"get"' in m.content for m in req.messages)


def test_length_is_incomplete(client, script):
    script.events = [TextDelta("a b"), Finish("length", Usage(5, 2))]
    obj = client.post("/v1/responses", json={**BODY, "max_output_tokens": 2}).get_json()
    assert obj["status"] == "incomplete"
    assert obj["incomplete_details"] == {"reason": "max_output_tokens"}


def test_error_after_first_byte_is_an_error_event(client, script):
    script.fail_after = 1
    script.mid_error = EngineFailed("llama-server exited with code -9")
    evs = events(client.post("/v1/responses", json={**BODY, "stream": True}))
    names = [n for n, _ in evs]
    assert names[-2:] == ["error", "response.failed"]
    err = evs[-2][1]
    assert err["code"] == "server_error" and "-9" in err["message"]
    assert err["error"]["message"] == err["message"]


def test_errors_before_first_byte(client, script):
    resp = client.post("/v1/responses", json={**BODY, "model": "nope", "stream": True})
    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "model_not_found"
    resp = client.post("/v1/responses", json={**BODY, "tools": [{"type": "web_search"}]})
    assert resp.status_code == 400
    err = resp.get_json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "tools"
    resp = client.post("/v1/responses", json={**BODY, "previous_response_id": "resp_x"})
    assert resp.status_code == 400 and "store" in resp.get_json()["error"]["message"]
    resp = client.post("/v1/responses", data="{bad", content_type="application/json")
    assert resp.status_code == 400 and resp.get_json()["error"]["type"] == \
        "invalid_request_error"
    script.error = ContextLengthExceeded(5000, 4096)
    resp = client.post("/v1/responses", json={**BODY, "stream": True})
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "context_length_exceeded"


def test_get_is_405_openai_shaped(client):
    resp = client.get("/v1/responses")
    assert resp.status_code == 405
    assert isinstance(resp.get_json()["error"], dict)


def test_sdk_raises_on_mid_stream_error(app, script):
    """The official SDK, over WSGI, turns the mid-stream ``error`` event into an APIError."""
    script.fail_after = 1
    script.mid_error = EngineFailed("llama-server exited with code -9")
    sdk = openai.OpenAI(base_url="http://localhost/v1", api_key="x", max_retries=0,
                        http_client=httpx.Client(transport=httpx.WSGITransport(app=app)))
    seen = []
    with pytest.raises(openai.APIError, match="-9"):
        for event in sdk.responses.create(model="tiny", input="hi", stream=True):
            seen.append(event.type)
    assert seen[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in seen
