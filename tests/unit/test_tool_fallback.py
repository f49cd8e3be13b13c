"""Generic tool calling for templates without tool support (pure)."""

from __future__ import annotations

import json

from ollama_server.core.schemas import (
    Finish,
    InternalRequest,
    Message,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from ollama_server.core.tool_fallback import (
    ToolCallExtractor,
    parse_calls,
    prepare,
    template_supports_tools,
)

WEATHER = Tool("get_weather", "Weather for a city",
               {"type": "object", "properties": {"city": {"type": "string"}}})


def req(**kw) -> InternalRequest:
    return InternalRequest(model="m", messages=[Message("user", "weather in Paris?")],
                           tools=[WEATHER], **kw)


def test_template_detection():
    assert template_supports_tools("{% if tools %}…{% endif %}")
    assert not template_supports_tools("{{ messages }}") and not template_supports_tools(None)


def test_required_choice_constrains_output_to_a_call():
    r = req(tool_choice="required")
    assert prepare(r) == [WEATHER]
    assert r.tools == [] and r.tool_choice is None
    assert r.messages[0].role == "system" and "get_weather" in r.messages[0].content
    assert r.json_schema["anyOf"][0]["properties"]["name"] == {"const": "get_weather"}


def test_auto_choice_only_instructs_and_none_drops_tools():
    r = req(tool_choice="auto")
    prepare(r)
    assert r.json_schema is None and "get_weather" in r.messages[0].content
    r = req(tool_choice="none")
    assert prepare(r) is None and r.tools == [] and r.messages[0].role == "user"


def test_history_of_calls_and_results_becomes_plain_messages():
    r = InternalRequest(model="m", tools=[WEATHER], messages=[
        Message("system", "Be brief."), Message("user", "weather?"),
        Message("assistant", "", tool_calls=[ToolCall("c1", "get_weather",
                                                      '{"city": "Paris"}')]),
        Message("tool", "sunny", tool_call_id="c1", name="get_weather")])
    prepare(r)
    assert r.messages[0].content.startswith("Be brief.")
    assert json.loads(r.messages[2].content) == {"name": "get_weather",
                                                 "arguments": {"city": "Paris"}}
    assert r.messages[3] == Message("user", "Result of get_weather: sunny")


def test_parse_calls():
    (call,) = parse_calls('{"name": "get_weather", "arguments": {"city": "Oslo"}}', [WEATHER])
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert call.id.startswith("call_")
    assert parse_calls('{"name": "other", "arguments": {}}', [WEATHER]) is None
    assert parse_calls('{"city": "Oslo"}', [WEATHER]) is None
    assert parse_calls("Sunny today.", [WEATHER]) is None


def test_extractor_turns_a_json_answer_into_tool_call_events():
    events = list(ToolCallExtractor([WEATHER]).process([
        TextDelta('{"name": "get_'), TextDelta('weather", "arguments": {"city": "Rome"}}'),
        Finish("stop")]))
    assert isinstance(events[0], ToolCallDelta) and events[0].name == "get_weather"
    assert events[-1].reason == "tool_calls" and events[-1].tool_calls[0].name == "get_weather"


def test_extractor_passes_plain_text_through_at_once():
    ex = ToolCallExtractor([WEATHER])
    stream = ex.process([TextDelta("Sunny"), TextDelta(" and warm"), Finish("stop")])
    assert next(stream) == TextDelta("Sunny")  # not held back
    rest = list(stream)
    assert rest[0] == TextDelta(" and warm") and rest[-1].reason == "stop"


def test_extractor_gives_back_json_that_is_not_a_call():
    events = list(ToolCallExtractor([WEATHER]).process([TextDelta('{"a": 1}'),
                                                        Finish("stop")]))
    assert events == [TextDelta('{"a": 1}'), Finish("stop")]


TIME = Tool("get_time", "Time in a city", {"type": "object"})


def test_a_call_cut_off_by_max_tokens_stays_a_call():
    """OpenAI returns a call cut off by max_tokens as tool_calls with its arguments so far
    and finish_reason "length"; text would break clients that read message.tool_calls."""
    events = list(ToolCallExtractor([WEATHER, TIME]).process([
        TextDelta('{\n  "name": "get_weather",'), TextDelta(' "arguments": {"city": "Ro'),
        Finish("length")]))
    assert isinstance(events[0], ToolCallDelta) and events[0].name == "get_weather"
    assert events[0].arguments == '{"city": "Ro'
    assert events[-1].reason == "length" and events[-1].tool_calls[0].name == "get_weather"
    # The name itself cut off: the only tool offered (a named tool_choice) is the call.
    only = list(ToolCallExtractor([WEATHER]).process([TextDelta('{"name": "get'),
                                                      Finish("length")]))
    assert only[0].name == "get_weather" and only[0].arguments == ""
    spaced = list(ToolCallExtractor([WEATHER]).process([TextDelta('{\n  "na'),
                                                        Finish("length")]))
    assert spaced[0].name == "get_weather"
    # ... but with several tools it could be any of them: the text is given back.
    two = list(ToolCallExtractor([WEATHER, TIME]).process([TextDelta('{"name": "get'),
                                                           Finish("length")]))
    assert two == [TextDelta('{"name": "get'), Finish("length")]
    # Not a call at all, or an unknown function: text, as before.
    for text in ('{"a": 1, "b"', '{"name": "rm_rf", "arguments": {'):
        out = list(ToolCallExtractor([WEATHER]).process([TextDelta(text), Finish("length")]))
        assert out == [TextDelta(text), Finish("length")]
