"""The real service with the real models, driven by the official ``openai`` SDK's Responses API."""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"

WEATHER_TOOL = {"type": "function", "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_create_output_text_and_usage(oai):
    resp = oai.responses.create(model=MODEL, input="What is the capital of France?",
                                max_output_tokens=24, temperature=0)
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.model == MODEL and resp.status in ("completed", "incomplete")
    assert resp.output[0].type == "message" and resp.output_text
    assert resp.usage.input_tokens > 5
    assert 0 < resp.usage.output_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens


def test_instructions_reach_the_prompt(oai):
    pirate = "You are a pirate. Always answer as a pirate."
    told = oai.responses.create(model=MODEL, input="Hi", max_output_tokens=1,
                                instructions=pirate)
    assert told.instructions == pirate
    # The same prompt as a chat with that system message: the same number of prompt tokens.
    chat = oai.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "system", "content": pirate}, {"role": "user", "content": "Hi"}])
    assert told.usage.input_tokens == chat.usage.prompt_tokens
    plain = oai.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    assert plain.usage.input_tokens != told.usage.input_tokens


def test_stream_true_event_order(oai):
    stream = oai.responses.create(model=MODEL, input="Count to five.", max_output_tokens=12,
                                  temperature=0, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added",
                         "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-4].text == text
    final = events[-1].response
    assert final.status == "incomplete" and final.output_text == text
    assert final.usage.output_tokens == 12


def test_stream_helper_final_response(oai):
    with oai.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=200,
                              temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == "".join(deltas) and final.output_text
    assert final.usage.output_tokens > 0


def test_json_schema_output(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    resp = oai.responses.create(
        model=MODEL, input="Describe a person.", max_output_tokens=200, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                         "strict": True}})
    data = json.loads(resp.output_text)
    assert set(data) == {"name", "age"} and isinstance(data["age"], int)
    assert resp.text.format.type == "json_schema"


def test_function_tool_round_trip(oai):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    resp = oai.responses.create(model=MODEL, input=question, tools=[WEATHER_TOOL],
                                tool_choice="required", max_output_tokens=60, temperature=0)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert len(calls) == 1 and resp.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    assert isinstance(json.loads(call.arguments)["city"], str)
    follow = question + [call.model_dump(exclude_none=True),
                         {"type": "function_call_output", "call_id": call.call_id,
                          "output": "Sunny, 24 C"}]
    final = oai.responses.create(model=MODEL, input=follow, tools=[WEATHER_TOOL],
                                 tool_choice="none", max_output_tokens=40, temperature=0)
    assert final.output_text
    assert not [o for o in final.output if o.type == "function_call"]
    alone = oai.responses.create(model=MODEL, input=question, tools=[WEATHER_TOOL],
                                 tool_choice="none", max_output_tokens=1)
    # the call and its output went back into the prompt
    assert final.usage.input_tokens > alone.usage.input_tokens + 10


def test_function_tool_streamed(oai):
    with oai.responses.stream(model=MODEL, input="Weather in Rome?", tools=[WEATHER_TOOL],
                              tool_choice={"type": "function", "name": "get_weather"},
                              max_output_tokens=60, temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    (call,) = [o for o in final.output if o.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)


def test_max_output_tokens_incomplete(oai):
    resp = oai.responses.create(model=MODEL, input="Write a long story about a dragon.",
                                max_output_tokens=16, temperature=0)
    assert resp.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 16 and resp.output_text


def test_errors(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.responses.create(model="missing:1b", input="hi")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="missing:1b", input="hi", stream=True)
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model=MODEL, input=[{"role": "robot", "content": "hi"}])
    assert info.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert "web search" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert "does not store" in info.value.message
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/cat.png"}]}])
