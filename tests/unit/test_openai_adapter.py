"""Table tests of the OpenAI translation (no Flask, no engine)."""

from __future__ import annotations

import base64
import struct

import pytest

from ollama_server.adapters import openai as oa
from ollama_server.core.errors import (
    ContextLengthExceeded,
    EngineFailed,
    InvalidRequest,
    ModelNotFound,
)
from ollama_server.core.schemas import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ollama_server.service.generation import Result

MSG = [{"role": "user", "content": "hi"}]


def test_chat_request_fields():
    req = oa.openai_chat_to_internal({
        "model": "m", "messages": [{"role": "developer", "content": "be nice"},
                                   {"role": "user", "content": [
                                       {"type": "text", "text": "a"},
                                       {"type": "image_url",
                                        "image_url": {"url": "data:image/png;base64,AA"}}]}],
        "max_completion_tokens": 9, "temperature": 0.2, "top_p": 0.5, "stop": "x",
        "seed": 4, "stream": True, "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "required", "logprobs": True, "top_logprobs": 3,
        "user": "ignored", "store": False, "metadata": {"a": 1}})
    assert req.messages[0].role == "system"
    assert req.messages[1].content == "a" and req.messages[1].images
    assert (req.max_tokens, req.temperature, req.top_p, req.stop, req.seed) == \
        (9, 0.2, 0.5, ["x"], 4)
    assert req.stream and req.json_schema == {} and req.tool_choice == "required"
    assert req.tools[0].name == "f" and req.top_logprobs == 3


@pytest.mark.parametrize("body,param", [
    ({"messages": MSG}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"model": "m", "messages": MSG, "temperature": 3}, "temperature"),
    ({"model": "m", "messages": MSG, "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": MSG, "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "messages": MSG, "n": 0}, "n"),
    ({"model": "m", "messages": MSG, "n": 129}, "n"),
    ({"model": "m", "messages": MSG, "n": "2"}, "n"),
    ({"model": "m", "messages": MSG, "stop": [1]}, "stop"),
    ({"model": "m", "messages": MSG, "response_format": {"type": "xml"}}, "response_format"),
    ({"model": "m", "messages": MSG, "response_format": {"type": "json_schema"}},
     "response_format"),
    ({"model": "m", "messages": MSG, "response_format": {"type": "json_object",
                                                          "value": "not json"}},
     "response_format"),
    ({"model": "m", "messages": MSG, "response_format": {"type": "regex", "value": ""}},
     "response_format"),
    ({"model": "m", "messages": MSG, "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": "m", "messages": MSG, "tool_choice": "required"}, "tool_choice"),
    ({"model": "m", "messages": MSG, "tool_choice": {"type": "function",
                                                      "function": {"name": "g"}}},
     "tool_choice"),
    ({"model": "m", "messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, "messages"),
])
def test_chat_request_errors_name_the_field(body, param):
    with pytest.raises(InvalidRequest) as err:
        oa.openai_chat_to_internal(body)
    assert err.value.param == param


def test_n_is_bounded_in_openais_words():
    assert oa.openai_chat_to_internal({"model": "m", "messages": MSG}).n == 1
    assert oa.openai_chat_to_internal({"model": "m", "messages": MSG, "n": 128}).n == 128
    assert oa.openai_completion_to_internal({"model": "m", "prompt": "x", "n": 3}).n == 3
    for n, code, words in [
            (129, "integer_above_max_value",
             "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 "
             "instead."),
            (0, "integer_below_min_value",
             "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 "
             "instead.")]:
        with pytest.raises(InvalidRequest) as err:
            oa.openai_chat_to_internal({"model": "m", "messages": MSG, "n": n})
        body, status = oa.openai_error(err.value)
        assert status == 400
        assert body == {"error": {"message": words, "type": "invalid_request_error",
                                  "param": "n", "code": code}}


def test_completion_request():
    req = oa.openai_completion_to_internal({"model": "m", "prompt": ["abc"], "logprobs": 2})
    assert req.prompt == "abc" and req.max_tokens == 16 and req.top_logprobs == 2
    assert oa.openai_completion_to_internal({"model": "m", "prompt": [1, 2]}).prompt == [1, 2]
    with pytest.raises(InvalidRequest):
        oa.openai_completion_to_internal({"model": "m", "prompt": ["a", "b"]})
    with pytest.raises(InvalidRequest):
        oa.openai_completion_to_internal({"model": "m"})


def test_chat_stream_sequence_with_usage():
    conv = oa.OpenAIChatStream("m", include_usage=True)
    chunks = []
    for event in [TextDelta("He"), ReasoningDelta("hmm"), ToolCallDelta(0, "c1", "f", ""),
                  ToolCallDelta(0, None, None, "{}"),
                  Finish("tool_calls", Usage(prompt_tokens=3, completion_tokens=4,
                                             reasoning_tokens=1))]:
        chunks += conv.process(event)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "He"}
    assert chunks[2]["choices"][0]["delta"]["reasoning_content"] == "hmm"
    call = chunks[3]["choices"][0]["delta"]["tool_calls"][0]
    assert call == {"index": 0, "id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": ""}}
    assert chunks[4]["choices"][0]["delta"]["tool_calls"][0] == {
        "index": 0, "function": {"arguments": "{}"}}
    assert chunks[5]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["usage"] is None for c in chunks[:6])
    assert chunks[6]["choices"] == [] and chunks[6]["usage"]["total_tokens"] == 7
    assert chunks[6]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 1
    assert len({c["id"] for c in chunks}) == 1


def test_chat_stream_without_usage_has_no_usage_key():
    conv = oa.OpenAIChatStream("m")
    chunks = conv.process(TextDelta("x")) + conv.process(Finish("length"))
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_response_shapes():
    result = Result(text="", tool_calls=[ToolCall("call_1", "f", '{"a": 1}')],
                    finish=Finish("tool_calls", Usage(1, 2)))
    body = oa.internal_to_openai_chat(result, "m")
    msg = body["choices"][0]["message"]
    assert msg["content"] is None and msg["tool_calls"][0]["function"]["name"] == "f"
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    named = oa.internal_to_openai_chat(result, "m", named_tool=True)  # OpenAI's own quirk
    assert named["choices"][0]["finish_reason"] == "stop"
    assert oa.named_tool_choice({"tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert not oa.named_tool_choice({"tool_choice": "required"})
    body = oa.internal_to_openai_chat(Result(text="hi", finish=Finish("stop_sequence")), "m")
    assert body["choices"][0]["finish_reason"] == "stop"


def test_embeddings_shapes():
    inputs, fmt, dims = oa.openai_embeddings_inputs({"input": "x",
                                                     "encoding_format": "base64"})
    assert inputs == ["x"] and fmt == "base64" and dims is None
    body = oa.internal_to_openai_embeddings([[1.0, 0.0, 0.0]], "m", 2, "base64", None)
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert struct.unpack("<3f", raw) == (1.0, 0.0, 0.0)
    body = oa.internal_to_openai_embeddings([[3.0, 4.0, 1.0]], "m", 2, "float", 2)
    assert body["data"][0]["embedding"] == pytest.approx([0.6, 0.8])
    for bad in ({"input": ""}, {"input": []}, {"input": "x", "encoding_format": "f16"},
                {"input": [1, "a"]}):
        with pytest.raises(InvalidRequest):
            oa.openai_embeddings_inputs(bad)


def test_error_bodies():
    body, status = oa.openai_error(ModelNotFound("x:1"))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "`x:1`" in body["error"]["message"]
    body, status = oa.openai_error(ContextLengthExceeded(9000, 8192))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    body, status = oa.openai_error(EngineFailed("dead"))
    assert status == 500 and body["error"]["type"] == "server_error"


def test_stop_reason_names_the_matched_stop_string():
    body = oa.internal_to_openai_chat(
        Result(text="1, 2", finish=Finish("stop_sequence", stop_sequence=" 3")), "m")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["stop_reason"] == " 3"
    body = oa.internal_to_openai_completion(Result(text="x", finish=Finish("length")), "m")
    assert body["choices"][0]["stop_reason"] is None
    chunk = oa.OpenAIChatStream("m").process(Finish("stop_sequence", stop_sequence="END"))[-1]
    assert chunk["choices"][0]["stop_reason"] == "END"


@pytest.mark.parametrize("fmt", [
    {"type": "json_object", "value": {"type": "object", "required": ["a"]}},
    {"type": "json_object", "value": '{"type": "object", "required": ["a"]}'},
    {"type": "json", "value": {"type": "object", "required": ["a"]}},
])
def test_tgi_grammar_form_of_response_format_is_a_schema(fmt):
    """huggingface_hub's chat_completion sends OpenAI's json_schema in TGI's grammar form."""
    req = oa.openai_chat_to_internal({"model": "m", "messages": MSG, "response_format": fmt})
    assert req.json_schema == {"type": "object", "required": ["a"]}


def test_tgi_regex_response_format_is_a_grammar():
    req = oa.openai_chat_to_internal({"model": "m", "messages": MSG,
                                      "response_format": {"type": "regex", "value": "[ab]+"}})
    assert req.grammar and req.json_schema is None
