"""Responses API translation (pure): requests, response objects, and stream event sequences.

Every produced object is also parsed by the official ``openai`` SDK's models, so a shape the
SDK cannot read fails here.
"""

from __future__ import annotations

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from ollama_server.adapters.responses import (
    ResponsesStream,
    internal_to_response,
    response_envelope,
    responses_to_internal,
)
from ollama_server.core.errors import EngineFailed, InvalidRequest
from ollama_server.core.schemas import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ollama_server.service.generation import Result

EVENT = TypeAdapter(ResponseStreamEvent)
IMG = "data:image/png;base64,iVBORw0KGgo="


def body(**kw):
    return {"model": "m", "input": "hi", **kw}


# --- requests --------------------------------------------------------------------------------

def test_string_input_and_instructions():
    req = responses_to_internal(body(instructions="Be terse.", max_output_tokens=20,
                                     temperature=0.3, top_p=0.9, stream=True))
    assert [(m.role, m.content) for m in req.messages] == [("system", "Be terse."),
                                                          ("user", "hi")]
    assert (req.max_tokens, req.temperature, req.top_p, req.stream) == (20, 0.3, 0.9, True)


def test_message_items_roles_and_parts():
    req = responses_to_internal(body(input=[
        {"role": "developer", "content": "dev"},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "s"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "look"},
                                     {"type": "input_image", "image_url": IMG}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
    ]))
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "dev"), ("system", "s"), ("user", "look"), ("assistant", "ok")]
    assert req.messages[2].images == [IMG]


def test_function_call_round_trip_items():
    req = responses_to_internal(body(input=[
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": '{"a":1}'},
        {"type": "function_call", "call_id": "c2", "name": "get", "arguments": {"a": 2}},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "rain"}]},
    ]))
    user, asst, t1, t2 = req.messages
    assert asst.role == "assistant" and asst.reasoning == "think"
    assert [(c.id, c.name, c.arguments) for c in asst.tool_calls] == [
        ("c1", "get", '{"a":1}'), ("c2", "get", '{"a": 2}')]
    assert (t1.role, t1.content, t1.tool_call_id, t1.name) == ("tool", "sunny", "c1", "get")
    assert (t2.content, t2.tool_call_id) == ("rain", "c2")


def test_tools_tool_choice_text_format_reasoning():
    tool = {"type": "function", "name": "get", "description": "d", "strict": True,
            "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}
    req = responses_to_internal(body(
        tools=[tool], tool_choice={"type": "function", "name": "get"},
        parallel_tool_calls=False, reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "x", "strict": True,
                         "schema": {"type": "object"}}},
        store=False, metadata={"k": "v"}, user="u", truncation="auto", unknown_field=1))
    assert req.tools[0].name == "get" and req.tools[0].parameters["properties"]
    assert req.tool_choice == {"name": "get"} and req.parallel_tool_calls is False
    assert req.reasoning is False and req.json_schema == {"type": "object"}
    assert responses_to_internal(body(text={"format": {"type": "json_object"}})).json_schema == {}
    assert responses_to_internal(body(text={"format": {"type": "text"}})).json_schema is None
    assert responses_to_internal(body(reasoning={"effort": "high"})).reasoning is True
    assert responses_to_internal(body(tool_choice="required", tools=[tool])).tool_choice == \
        "required"


@pytest.mark.parametrize("fields,param", [
    ({"model": None}, "model"),
    ({"input": None}, "input"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input"),
    ({"input": [{"type": "file_search_call"}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image",
                                              "image_url": "https://x/y.png"}]}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "any"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"reasoning": {"effort": "max"}}, "reasoning.effort"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
])
def test_bad_requests(fields, param):
    with pytest.raises(InvalidRequest) as info:
        responses_to_internal(body(**fields))
    assert info.value.param == param


def test_previous_response_id_message_says_why():
    with pytest.raises(InvalidRequest, match="does not store responses"):
        responses_to_internal(body(previous_response_id="resp_1"))


# --- answers ---------------------------------------------------------------------------------

def envelope(**kw):
    b = body(**kw)
    return response_envelope(b, responses_to_internal(b), "resp_test")


def test_non_stream_response_parses_in_the_sdk():
    result = Result(text="Hello", reasoning="hmm",
                    finish=Finish("stop", Usage(prompt_tokens=5, completion_tokens=3,
                                                cached_tokens=2, reasoning_tokens=1)))
    obj = internal_to_response(result, envelope(instructions="I", temperature=0.2))
    resp = Response.model_validate(obj)
    assert resp.id == "resp_test" and resp.status == "completed"
    assert resp.output_text == "Hello"
    assert [o.type for o in resp.output] == ["reasoning", "message"]
    assert resp.output[0].content[0].text == "hmm"
    assert resp.usage.input_tokens == 5 and resp.usage.output_tokens == 3
    assert resp.usage.total_tokens == 8
    assert resp.usage.input_tokens_details.cached_tokens == 2
    assert resp.usage.output_tokens_details.reasoning_tokens == 1
    assert resp.instructions == "I" and resp.temperature == 0.2 and resp.error is None
    assert resp.store is False  # nothing is kept, whatever the request asked


def test_non_stream_tool_calls_and_length():
    result = Result(tool_calls=[ToolCall("call_1", "get", '{"a":1}')],
                    finish=Finish("tool_calls", Usage(prompt_tokens=5, completion_tokens=3)))
    resp = Response.model_validate(internal_to_response(result, envelope()))
    assert [o.type for o in resp.output] == ["function_call"]
    call = resp.output[0]
    assert (call.call_id, call.name, call.arguments) == ("call_1", "get", '{"a":1}')
    result = Result(text="cut", finish=Finish("length", Usage(5, 16)))
    resp = Response.model_validate(internal_to_response(result, envelope()))
    assert resp.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete"


def run(events, **kw):
    conv = ResponsesStream(envelope(**kw))
    out = []
    for e in events:
        out += conv.process(e)
    for kind, data in out:
        assert data["type"] == kind
        EVENT.validate_python(data)  # every event is a valid SDK event
    seqs = [d["sequence_number"] for _, d in out]
    assert seqs == list(range(len(out)))
    return out


def types(out):
    return [k for k, _ in out]


def test_stream_text():
    out = run([TextDelta("Hel"), TextDelta(""), TextDelta("lo"),
               Finish("stop", Usage(prompt_tokens=4, completion_tokens=2))])
    assert types(out) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert out[6][1]["text"] == "Hello"
    final = Response.model_validate(out[-1][1]["response"])
    assert final.output_text == "Hello" and final.usage.total_tokens == 6
    assert final.status == "completed" and final.id == out[0][1]["response"]["id"]
    item_ids = {d.get("item_id") for _, d in out if "item_id" in d}
    assert item_ids == {final.output[0].id}


def test_stream_reasoning_then_text():
    out = run([ReasoningDelta("thi"), ReasoningDelta("nk"), TextDelta("ok"),
               Finish("stop", Usage(3, 2, reasoning_tokens=1))])
    assert types(out) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert out[6][1]["text"] == "think"
    assert [d["output_index"] for k, d in out if k == "response.output_item.added"] == [0, 1]
    final = Response.model_validate(out[-1][1]["response"])
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.usage.output_tokens_details.reasoning_tokens == 1


def test_stream_function_calls():
    out = run([ToolCallDelta(0, "call_a", "get", '{"a":'), ToolCallDelta(0, None, None, "1}"),
               ToolCallDelta(1, "call_b", "put", "{}"), Finish("tool_calls", Usage(3, 9))])
    assert types(out) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert out[5][1]["arguments"] == '{"a":1}'
    final = Response.model_validate(out[-1][1]["response"])
    assert [(o.call_id, o.name, o.arguments) for o in final.output] == [
        ("call_a", "get", '{"a":1}'), ("call_b", "put", "{}")]


def test_stream_length_is_incomplete():
    out = run([TextDelta("a b c"), Finish("length", Usage(3, 16))], max_output_tokens=16)
    assert types(out)[-1] == "response.incomplete"
    final = Response.model_validate(out[-1][1]["response"])
    assert final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.max_output_tokens == 16 and final.output[0].status == "incomplete"


def test_stream_empty_answer_is_an_empty_message():
    out = run([Finish("stop", Usage(3, 0))])
    assert "response.output_item.added" in types(out)
    assert Response.model_validate(out[-1][1]["response"]).output_text == ""


def test_stream_mid_error():
    conv = ResponsesStream(envelope())
    out = conv.process(TextDelta("par"))
    out += conv.error(EngineFailed("llama-server exited with code -9"))
    assert types(out)[-2:] == ["error", "response.failed"]
    err = out[-2][1]
    assert err["code"] == "server_error" and "-9" in err["message"]
    assert err["error"]["type"] == "server_error"  # the nested form the SDK raises on
    EVENT.validate_python(err)
    failed = Response.model_validate(out[-1][1]["response"])
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert [d["sequence_number"] for _, d in out] == list(range(len(out)))
    assert conv.process(TextDelta("more")) == []  # nothing after the failure
