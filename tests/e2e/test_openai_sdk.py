"""The real service with the real models, driven by the official ``openai`` SDK."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import struct
import time

import openai
import pytest
import requests

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_chat_completion(oai):
    resp = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0, seed=1)
    choice = resp.choices[0]
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 5
    assert 0 < resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_with_usage(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])


def test_seed_makes_output_repeatable(oai):
    def ask():
        return oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a word."}],
            max_tokens=10, temperature=1.0, seed=42).choices[0].message.content
    assert ask() == ask()


def test_stop_sequence(oai):
    resp = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=30,
                                  temperature=0, stop=[" 8"])
    assert resp.choices[0].finish_reason == "stop"
    assert " 8" not in resp.choices[0].text


def test_completion_and_stream(oai):
    resp = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text
    assert resp.usage.completion_tokens == 8
    parts = list(oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=8,
                                        temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == resp.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


def test_json_object_and_schema(oai):
    resp = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content":
                                'Reply with exactly this JSON: {"answer": "yes"}'}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0)
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    resp = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema}},
        max_tokens=200, temperature=0)
    data = json.loads(resp.choices[0].message.content)
    assert set(data) == {"name", "age"} and isinstance(data["age"], int)


def test_models(oai):
    ids = [m.id for m in oai.models.list().data]
    assert MODEL in ids and "gemma3:270m" in ids
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("missing:1b")


def test_embeddings_float_and_base64(oai):
    # The SDK asks for base64 by default and decodes it.
    resp = oai.embeddings.create(model=MODEL, input=["hello world", "goodbye"])
    assert len(resp.data) == 2 and len(resp.data[0].embedding) == 576
    assert resp.usage.prompt_tokens > 0
    flt = oai.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert flt.data[0].embedding == pytest.approx(resp.data[0].embedding, abs=1e-5)


def test_embeddings_base64_raw(base_url):
    body = requests.post(base_url + "/v1/embeddings", json={
        "model": MODEL, "input": "hi", "encoding_format": "base64"}, timeout=60).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(raw) // 4}f", raw)) == 576


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="nope:7b",
                                    messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert err.value.body["code"] == "model_not_found"


def test_bad_body_is_400(oai, base_url):
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                    temperature=5)
    resp = requests.post(base_url + "/v1/chat/completions", data="{not json",
                         headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_prompt_over_context_is_400_naming_both_numbers(oai):
    long = "word " * 9000  # smollm2's trained context is 8192 tokens
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}],
                                    max_tokens=5)
    message = err.value.body["message"]
    assert "8192" in message and "9031" in message
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["param"] == "messages"
    # The error names the field the prompt came in.
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt=long, max_tokens=5)
    assert err.value.body["code"] == "context_length_exceeded"
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model=MODEL, input=long, max_output_tokens=16)
    assert err.value.body["param"] == "input"


def test_eight_concurrent_streams_run_together(oai):
    def one(i):
        t0 = time.monotonic()
        stream = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Write a story number {i}."}],
            max_tokens=48, temperature=0.7, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})  # a story may end sooner (seen: 40 tokens)
        first = None
        n = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.monotonic() - t0
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return first, time.monotonic() - t0, n

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    wall = time.monotonic() - t0
    assert all(n == 48 for _, _, n in results)
    # Run one after another, 8 streams take at least the sum of their durations; with
    # parallel slots in one engine they overlap, so the wall time is clearly shorter.
    assert wall < 0.8 * sum(d for _, d, _ in results)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def test_tool_call_round_trip(oai):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    resp = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                       tool_choice="required", max_tokens=60, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    final = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                                        tool_choice="none", max_tokens=40, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    alone = oai.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=1)
    # the call and its result went back into the prompt
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + 10


def test_legacy_functions_are_answered_as_a_function_call(oai):
    """The deprecated ``functions`` / ``function_call`` get the deprecated answer form:
    ``message.function_call`` and ``finish_reason: "function_call"``, streamed or not."""
    fn = WEATHER_TOOL["function"]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    resp = oai.chat.completions.create(model=MODEL, messages=messages, functions=[fn],
                                       function_call={"name": "get_weather"}, max_tokens=60,
                                       temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert isinstance(json.loads(choice.message.function_call.arguments)["city"], str)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, functions=[fn],
                                              function_call={"name": "get_weather"},
                                              max_tokens=60, temperature=0, stream=True))
    calls = [c.choices[0].delta.function_call for c in chunks
             if c.choices and c.choices[0].delta.function_call]
    assert calls[0].name == "get_weather"
    assert "".join(c.arguments or "" for c in calls) == choice.message.function_call.arguments
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "function_call"


def test_a_tool_call_cut_off_by_max_tokens_is_still_a_tool_call(oai):
    """OpenAI returns a forced call that max_tokens cut off as tool_calls (its arguments
    incomplete) with finish_reason "length": clients read message.tool_calls[0]."""
    resp = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice="required", max_tokens=8, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "length", choice
    assert choice.message.tool_calls[0].function.name == "get_weather", choice
    assert not choice.message.content


def test_tool_call_streamed(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL], tool_choice={"type": "function",
                                           "function": {"name": "get_weather"}},
        max_tokens=60, temperature=0, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id
    args = "".join(tc.function.arguments or "" for tc in calls)
    assert "city" in json.loads(args)
    # OpenAI ends a forced named function with "stop" ("tool_calls" for auto and required).
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(oai):
    resp = oai.chat.completions.create(model=MODEL, max_tokens=3, logprobs=True,
                                       top_logprobs=2,
                                       messages=[{"role": "user", "content": "Hi"}])
    content = resp.choices[0].logprobs.content
    assert len(content) == 3
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == resp.choices[0].message.content


@pytest.mark.parametrize("top", [None, 0])
def test_chat_logprobs_without_alternatives(oai, top):
    """``logprobs: true`` alone (or with ``top_logprobs: 0``, as the Vercel AI SDK sends it)
    still returns each token's logprob, with no alternatives, streamed or not."""
    extra = {} if top is None else {"top_logprobs": top}
    resp = oai.chat.completions.create(model=MODEL, max_tokens=3, logprobs=True, **extra,
                                       messages=[{"role": "user", "content": "Hi"}])
    content = resp.choices[0].logprobs.content
    assert len(content) == 3 and all(t.logprob <= 0 and t.top_logprobs == [] for t in content)
    chunks = list(oai.chat.completions.create(model=MODEL, max_tokens=3, logprobs=True,
                                              stream=True, **extra,
                                              messages=[{"role": "user", "content": "Hi"}]))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert len(streamed) == 3 and all(t.top_logprobs == [] for t in streamed)
