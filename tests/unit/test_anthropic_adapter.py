"""Pure tests of the Anthropic Messages adapter: request translation, stream event sequences,
the non-streamed body, models pages and the error formatter (no Flask, no engine)."""

from __future__ import annotations

import json

import pytest

from ollama_server.adapters.anthropic import (
    AnthropicStream,
    anthropic_error,
    anthropic_messages_to_internal,
    anthropic_model,
    anthropic_models_page,
    internal_to_anthropic_message,
    strip_billing_header,
    thinking_signature,
    tool_use_id,
)
from ollama_server.core.errors import (
    AuthenticationError,
    ContextLengthExceeded,
    EngineFailed,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
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

USAGE = Usage(prompt_tokens=30, completion_tokens=7, cached_tokens=20)


def body(**extra):
    out = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    out.update(extra)
    return out


# --- requests --------------------------------------------------------------------------------

def test_minimal_request():
    req = anthropic_messages_to_internal(body(temperature=0.2, top_p=0.9, top_k=5,
                                              stop_sequences=["END", "##"]))
    assert req.dialect == "anthropic" and req.model == "m" and req.max_tokens == 50
    assert [(m.role, m.content) for m in req.messages] == [("user", "hi")]
    assert (req.temperature, req.top_p, req.top_k) == (0.2, 0.9, 5)
    assert req.stop == ["END", "##"] and req.stream is False and req.reasoning is None


@pytest.mark.parametrize("system, expected", [
    ("Be brief.", "Be brief."),
    ([{"type": "text", "text": "A"}, {"type": "text", "text": "B",
                                      "cache_control": {"type": "ephemeral"}}], "A\nB"),
    ([{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.1.e51; "
                               "cc_entrypoint=cli; cch=a5145;"},
      {"type": "text", "text": "You are Claude Code."}], "You are Claude Code."),
    ("x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; cch=a5145;"
     "You are Claude Code.", "You are Claude Code."),
    ("x-anthropic-billing-header: cc_version=1; cch=00000;\nRules.", "Rules."),
    ("x-anthropic-billing-header: something else\nRules.", "Rules."),
    ("Rules.\nx-anthropic-billing-header: cch=1;", "Rules.\nx-anthropic-billing-header: cch=1;"),
])
def test_system_forms_and_billing_line(system, expected):
    req = anthropic_messages_to_internal(body(system=system))
    assert req.messages[0].role == "system" and req.messages[0].content == expected


def test_billing_line_alone_leaves_no_system_message():
    req = anthropic_messages_to_internal(body(system=[
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2; cch=abcde;"}]))
    assert [m.role for m in req.messages] == ["user"]
    assert strip_billing_header("x-anthropic-billing-header: cch=1;") == ""


def test_two_requests_differing_only_in_cch_give_the_same_prompt():
    def system(cch):
        return [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.1.e51; "
                                         f"cc_entrypoint=cli; cch={cch};"},
                {"type": "text", "text": "You are a coding agent."}]
    a = anthropic_messages_to_internal(body(system=system("11111")))
    b = anthropic_messages_to_internal(body(system=system("22222")))
    assert a.messages == b.messages


def test_content_blocks_tools_and_results():
    req = anthropic_messages_to_internal(body(
        tools=[{"name": "get_weather", "description": "Weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "cache_control": {"type": "ephemeral"}}],
        metadata={"user_id": "u1"},
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?",
                                          "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should call it.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "Thanks"}]},
        ]))
    roles = [m.role for m in req.messages]
    assert roles == ["user", "assistant", "tool", "user"]
    assistant = req.messages[1]
    assert assistant.content == "Let me check." and assistant.reasoning == "I should call it."
    assert assistant.tool_calls == [ToolCall("toolu_1", "get_weather", '{"city": "Paris"}')]
    tool = req.messages[2]
    assert (tool.content, tool.tool_call_id, tool.name) == ("18C", "toolu_1", "get_weather")
    assert req.messages[3].content == "Thanks"
    assert req.tools[0].name == "get_weather" and req.tools[0].parameters["type"] == "object"


def test_image_base64_becomes_data_url():
    req = anthropic_messages_to_internal(body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "What is this?"}]}]))
    assert req.messages[0].images == ["data:image/png;base64,iVBORw0KGgo="]
    assert req.messages[0].content == "What is this?"


def test_system_messages_inside_messages_are_accepted():
    req = anthropic_messages_to_internal(body(system="Top.", messages=[
        {"role": "system", "content": "More rules."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "system", "content": [{"type": "text", "text": "Reminder."}]},
        {"role": "user", "content": "c"}]))
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", "Top.\nMore rules."), ("user", "a"), ("assistant", "b"),
        ("user", "Reminder.\nc")]


def test_consecutive_turns_are_joined_and_assistant_prefill_kept():
    req = anthropic_messages_to_internal(body(messages=[
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "The answer is"}]))
    assert [(m.role, m.content) for m in req.messages] == [("user", "a\nb"),
                                                          ("assistant", "The answer is")]


@pytest.mark.parametrize("choice, expected_choice, tools", [
    ({"type": "auto"}, "auto", ["a", "b"]),
    ({"type": "any"}, "required", ["a", "b"]),
    ({"type": "none"}, "none", ["a", "b"]),
    ({"type": "tool", "name": "b"}, "required", ["b"]),
])
def test_tool_choice(choice, expected_choice, tools):
    schema = {"type": "object", "properties": {}}
    req = anthropic_messages_to_internal(body(
        tools=[{"name": "a", "input_schema": schema}, {"name": "b", "input_schema": schema}],
        tool_choice=choice))
    assert req.tool_choice == expected_choice
    assert [t.name for t in req.tools] == tools


def test_disable_parallel_tool_use():
    req = anthropic_messages_to_internal(body(
        tools=[{"name": "a", "input_schema": {"type": "object"}}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True}))
    assert req.parallel_tool_calls is False


@pytest.mark.parametrize("thinking, reasoning", [
    ({"type": "enabled", "budget_tokens": 1024}, True),
    ({"type": "disabled"}, False),
    ({"type": "adaptive"}, True),
    (None, None),
])
def test_thinking(thinking, reasoning):
    req = anthropic_messages_to_internal(body(max_tokens=2000, thinking=thinking))
    assert req.reasoning is reasoning


def test_grammar_and_output_format_pass_through():
    req = anthropic_messages_to_internal(body(grammar='root ::= "yes"'))
    assert req.grammar == 'root ::= "yes"'
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = anthropic_messages_to_internal(body(output_config={
        "format": {"type": "json_schema", "schema": schema}}))
    assert req.json_schema == schema


def test_count_tokens_body_needs_no_max_tokens():
    b = body()
    del b["max_tokens"]
    assert anthropic_messages_to_internal(b, require_max_tokens=False).max_tokens is None


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"model": ""}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}, "messages"),
    ({"system": 5}, "system"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"stop_sequences": [1]}, "stop_sequences"),
    ({"stop_sequences": "x"}, "stop_sequences"),
    ({"tools": [{"name": "a"}]}, "tools"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools"),
    ({"tool_choice": {"type": "tool", "name": "zzz"}}, "tool_choice"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "thinking"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),  # >= max_tokens
    ({"thinking": {"type": "enabled"}}, "thinking"),
    ({"grammar": 3}, "grammar"),
    ({"stream": "yes"}, "stream"),
    ({"metadata": "u"}, "metadata"),
])
def test_invalid_requests(change, param):
    b = body(max_tokens=1500)
    for key, value in change.items():
        if value is None:
            b.pop(key)
        else:
            b[key] = value
    with pytest.raises(InvalidRequest) as info:
        anthropic_messages_to_internal(b)
    assert info.value.param == param


# --- stream event sequences ------------------------------------------------------------------

def run(events, **kw):
    conv = AnthropicStream("m", "msg_1", **kw)
    frames = conv.start()
    for e in events:
        frames += conv.process(e)
    return frames


def names(frames):
    out = []
    for name, data in frames:
        assert data["type"] == name  # every payload repeats its type
        delta = data.get("delta", {}).get("type") if name == "content_block_delta" else None
        block = data["content_block"]["type"] if name == "content_block_start" else None
        out.append(f"{name}:{delta or block}" if (delta or block) else name)
    return out


def test_text_stream():
    frames = run([TextDelta("Hel"), TextDelta(""), TextDelta("lo"),
                  Finish("stop", USAGE)])
    assert names(frames) == [
        "message_start", "content_block_start:text", "ping", "content_block_delta:text_delta",
        "content_block_delta:text_delta", "content_block_stop", "message_delta", "message_stop"]
    start = frames[0][1]["message"]
    assert start["id"] == "msg_1" and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 0
    assert frames[1][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    delta = frames[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 10, "output_tokens": 7,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 20}


def test_thinking_then_text_stream():
    frames = run([ReasoningDelta("let me "), ReasoningDelta("think"), TextDelta("Answer."),
                  Finish("stop", USAGE)])
    assert names(frames) == [
        "message_start", "content_block_start:thinking", "ping",
        "content_block_delta:thinking_delta", "content_block_delta:thinking_delta",
        "content_block_delta:signature_delta", "content_block_stop",
        "content_block_start:text", "content_block_delta:text_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert frames[1][1]["content_block"] == {"type": "thinking", "thinking": "",
                                             "signature": ""}
    assert frames[5][1]["delta"]["signature"] == thinking_signature("let me think")
    assert [d["index"] for n, d in frames if n.startswith("content_block")] == \
        [0, 0, 0, 0, 0, 1, 1, 1]


def test_thinking_only_stream_closes_with_signature():
    frames = run([ReasoningDelta("hmm"), Finish("length", USAGE)])
    assert names(frames)[-4:] == ["content_block_delta:signature_delta", "content_block_stop",
                                  "message_delta", "message_stop"]
    assert frames[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_tool_use_stream():
    call = ToolCall("abc123", "get_weather", '{"city": "Paris"}')
    frames = run([TextDelta("Checking."),
                  ToolCallDelta(0, "abc123", "get_weather", '{"city"'),
                  ToolCallDelta(0, arguments=': "Paris"}'),
                  Finish("tool_calls", USAGE, tool_calls=[call])])
    assert names(frames) == [
        "message_start", "content_block_start:text", "ping", "content_block_delta:text_delta",
        "content_block_stop", "content_block_start:tool_use",
        "content_block_delta:input_json_delta", "content_block_delta:input_json_delta",
        "content_block_stop", "message_delta", "message_stop"]
    block = frames[5][1]
    assert block["index"] == 1
    assert block["content_block"] == {"type": "tool_use", "id": "toolu_abc123",
                                      "name": "get_weather", "input": {}}
    parts = "".join(d["delta"]["partial_json"] for n, d in frames
                    if n == "content_block_delta" and d["index"] == 1)
    assert json.loads(parts) == {"city": "Paris"}
    assert frames[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_tool_use_named_only_at_finish():
    frames = run([Finish("tool_calls", USAGE, tool_calls=[ToolCall("x", "f", '{"a": 1}')])])
    assert names(frames) == [
        "message_start", "content_block_start:tool_use", "ping",
        "content_block_delta:input_json_delta", "content_block_stop", "message_delta",
        "message_stop"]


def test_two_tool_calls_get_two_blocks():
    frames = run([ToolCallDelta(0, "a", "f", "{}"), ToolCallDelta(1, "b", "g", "{}"),
                  Finish("tool_calls", USAGE, tool_calls=[ToolCall("a", "f"),
                                                          ToolCall("b", "g")])])
    starts = [d for n, d in frames if n == "content_block_start"]
    assert [(s["index"], s["content_block"]["name"]) for s in starts] == [(0, "f"), (1, "g")]


def test_stop_sequence_stream():
    frames = run([TextDelta("1, 2"), Finish("stop_sequence", USAGE, stop_sequence=", 3")])
    assert frames[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": ", 3"}


def test_max_tokens_stream():
    frames = run([TextDelta("a b c"), Finish("length", USAGE)])
    assert frames[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


def test_empty_answer_has_no_blocks():
    frames = run([Finish("stop", USAGE)])
    assert names(frames) == ["message_start", "message_delta", "message_stop"]


def test_events_after_finish_are_ignored():
    conv = AnthropicStream("m")
    conv.process(Finish("stop", USAGE))
    assert conv.process(TextDelta("late")) == []


def test_mid_stream_error():
    conv = AnthropicStream("m")
    frames = conv.start() + conv.process(TextDelta("partial"))
    frames += conv.error(Overloaded("engine busy"))
    assert names(frames)[-1] == "error"
    assert frames[-1][1] == {"type": "error", "error": {"type": "overloaded_error",
                                                        "message": "engine busy"}}
    assert conv.error(EngineFailed("crashed"))[0][1]["error"]["type"] == "api_error"


# --- non-streamed body -----------------------------------------------------------------------

def test_message_body_with_all_blocks():
    finish = Finish("tool_calls", USAGE, tool_calls=[ToolCall("call_1", "f", '{"x": [1]}')])
    result = Result(text="Sure.", reasoning="thought", tool_calls=finish.tool_calls,
                    finish=finish)
    out = internal_to_anthropic_message(result, "m", "msg_9")
    assert out["id"] == "msg_9" and out["type"] == "message" and out["role"] == "assistant"
    assert out["content"] == [
        {"type": "thinking", "thinking": "thought", "signature": thinking_signature("thought")},
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "toolu_call_1", "name": "f", "input": {"x": [1]}}]
    assert out["stop_reason"] == "tool_use" and out["stop_sequence"] is None
    assert out["usage"]["input_tokens"] == 10 and out["usage"]["cache_read_input_tokens"] == 20


@pytest.mark.parametrize("finish, reason, seq", [
    (Finish("stop"), "end_turn", None),
    (Finish("length"), "max_tokens", None),
    (Finish("stop_sequence", stop_sequence="END"), "stop_sequence", "END"),
    # A tool call cut off by max_tokens: Anthropic says max_tokens (its tool_use incomplete).
    (Finish("length", tool_calls=[ToolCall("c", "f", '{"x": ')]), "max_tokens", None),
])
def test_message_body_stop_reasons(finish, reason, seq):
    out = internal_to_anthropic_message(Result(text="x", finish=finish), "m")
    assert out["id"].startswith("msg_")
    assert (out["stop_reason"], out["stop_sequence"]) == (reason, seq)


def test_bad_tool_arguments_become_empty_input():
    finish = Finish("tool_calls", tool_calls=[ToolCall("1", "f", "{not json")])
    out = internal_to_anthropic_message(Result(tool_calls=finish.tool_calls, finish=finish), "m")
    assert out["content"] == [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]


def test_tool_use_ids():
    assert tool_use_id("toolu_x") == "toolu_x"
    assert tool_use_id("abc") == "toolu_abc"
    assert tool_use_id(None).startswith("toolu_") and len(tool_use_id("")) > 10


# --- models ----------------------------------------------------------------------------------

class Info:
    def __init__(self, name, ctx=8192):
        self.name, self.context_length, self.modified_at = name, ctx, 1700000000.0


def test_model_object():
    assert anthropic_model(Info("a:1")) == {"type": "model", "id": "a:1", "display_name": "a:1",
                                            "created_at": "2023-11-14T22:13:20Z",
                                            "max_input_tokens": 8192}


def test_models_pages():
    infos = [Info(n) for n in "abcde"]
    page = anthropic_models_page(infos, {})
    assert [m["id"] for m in page["data"]] == list("abcde")
    assert (page["has_more"], page["first_id"], page["last_id"]) == (False, "a", "e")
    page = anthropic_models_page(infos, {"limit": "2"})
    assert ([m["id"] for m in page["data"]], page["has_more"]) == (["a", "b"], True)
    page = anthropic_models_page(infos, {"limit": "2", "after_id": "b"})
    assert [m["id"] for m in page["data"]] == ["c", "d"] and page["has_more"]
    page = anthropic_models_page(infos, {"limit": "2", "before_id": "e"})
    assert [m["id"] for m in page["data"]] == ["c", "d"] and page["has_more"]
    page = anthropic_models_page([], {})
    assert page == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    for bad in ({"limit": "0"}, {"limit": "x"}, {"after_id": "zz"}):
        with pytest.raises(InvalidRequest):
            anthropic_models_page(infos, bad)


# --- errors ----------------------------------------------------------------------------------

def _status(status):
    exc = ServiceError("x")
    exc.status = status
    return exc


@pytest.mark.parametrize("exc, kind, status", [
    (InvalidRequest("bad"), "invalid_request_error", 400),
    (ContextLengthExceeded(9000, 8192), "invalid_request_error", 400),
    (AuthenticationError("no key"), "authentication_error", 401),
    (_status(403), "permission_error", 403),
    (ModelNotFound("x:1"), "not_found_error", 404),
    (NotFound("no route"), "not_found_error", 404),
    (PayloadTooLarge("big"), "request_too_large", 413),
    (_status(429), "rate_limit_error", 429),
    (EngineFailed("crash"), "api_error", 500),
    (ServiceError("boom"), "api_error", 500),
    (Overloaded("busy"), "overloaded_error", 529),
])
def test_error_formatter(exc, kind, status):
    out, code = anthropic_error(exc)
    assert code == status
    assert out["type"] == "error" and out["error"]["type"] == kind
    assert isinstance(out["error"]["message"], str) and out["error"]["message"]


def test_method_not_allowed_keeps_its_status():
    exc = InvalidRequest("method GET is not allowed")
    exc.status = 405
    out, code = anthropic_error(exc)
    assert code == 405 and out["error"]["type"] == "invalid_request_error"
