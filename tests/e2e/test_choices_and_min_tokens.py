"""OpenAI's ``n`` and vLLM's ``min_tokens`` on the real engine, driven by the openai SDK."""

from __future__ import annotations

import openai
import pytest
import requests

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
POEM = [{"role": "user", "content": "Write a short poem."}]
YES_NO = [{"role": "user", "content": "Reply with one word: yes or no. Is the sky blue?"}]


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=300)


def test_n_choices_whole_with_usage_summed(client):
    resp = client.chat.completions.create(model=MODEL, messages=POEM, n=3, max_tokens=12,
                                          temperature=1.0, seed=7,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason == "length" for c in resp.choices)
    # Every choice generated its 12 tokens; the prompt is counted once.
    single = client.chat.completions.create(model=MODEL, messages=POEM, max_tokens=1)
    assert resp.usage.completion_tokens == 36
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens


def test_n_choices_stream_interleaved_then_one_usage_chunk(client):
    stream = client.chat.completions.create(model=MODEL, messages=POEM, n=2, max_tokens=24,
                                            temperature=1.0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 48
    order = [c.choices[0] for c in chunks[:-1]]
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks[:-1])
    texts = {0: "", 1: ""}
    for choice in order:
        texts[choice.index] += choice.delta.content or ""
    assert texts[0] and texts[1]
    assert [c.finish_reason for c in order if c.finish_reason] == ["length", "length"]
    # Generated side by side in two slots: choice 1 has text before choice 0 is done.
    first_of_1 = next(i for i, c in enumerate(order) if c.index == 1 and c.delta.content)
    end_of_0 = next(i for i, c in enumerate(order) if c.index == 0 and c.finish_reason)
    assert first_of_1 < end_of_0


def test_n_with_completions_logprobs_and_tools(client):
    resp = client.completions.create(model=MODEL, prompt="The capital of France is", n=2,
                                     max_tokens=5, logprobs=2, temperature=1.0,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(len(c.logprobs.tokens) == 5 and len(c.logprobs.top_logprobs[0]) >= 1
               for c in resp.choices)
    assert resp.usage.completion_tokens == 10
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    called = client.chat.completions.create(
        model=MODEL, n=2, max_tokens=60, tools=[tool], tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    for choice in called.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name == "get_weather"


def test_n_out_of_range_is_refused_as_openai_does(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=POEM, n=129)
    assert err.value.code == "integer_above_max_value" and err.value.param == "n"


def test_min_tokens_holds_back_the_end_of_sequence(client):
    plain = client.chat.completions.create(model=MODEL, messages=YES_NO, max_tokens=60,
                                           temperature=0)
    assert plain.usage.completion_tokens < 30  # the model ends early on its own
    held = client.chat.completions.create(model=MODEL, messages=YES_NO, max_tokens=60,
                                          temperature=0, extra_body={"min_tokens": 30})
    assert held.usage.completion_tokens >= 30
    assert held.usage.prompt_tokens == plain.usage.prompt_tokens
    # One answer: it starts as the plain one did, then goes on.
    assert held.choices[0].message.content.startswith(plain.choices[0].message.content)


def test_min_tokens_holds_back_stop_strings_and_stop_token_ids(client, base_url):
    spaced = client.chat.completions.create(model=MODEL, messages=YES_NO, max_tokens=60,
                                            temperature=0, stop=[" "],
                                            extra_body={"min_tokens": 20})
    text = spaced.choices[0].message.content
    assert " " in text and spaced.usage.completion_tokens >= 20
    assert spaced.choices[0].finish_reason == "stop"
    assert spaced.choices[0].model_extra.get("stop_reason") == " "
    dot = requests.post(base_url + "/tokenize", json={"model": MODEL, "prompt": ".",
                                                      "add_special_tokens": False},
                        timeout=60).json()["tokens"]
    assert len(dot) == 1
    banned = client.chat.completions.create(model=MODEL, messages=YES_NO, max_tokens=60,
                                            temperature=0, logprobs=True,
                                            extra_body={"min_tokens": 25,
                                                        "stop_token_ids": dot})
    tokens = [t.token for t in banned.choices[0].logprobs.content]
    assert banned.usage.completion_tokens >= 25
    assert "." not in tokens[:25]


def test_min_tokens_on_completions_and_its_limits(client):
    resp = client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=40, temperature=0, stop=["\n"],
                                     extra_body={"min_tokens": 12})
    assert resp.usage.completion_tokens >= 12 and "\n" in resp.choices[0].text
    exact = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=8, temperature=0,
                                      extra_body={"min_tokens": 8})
    assert exact.usage.completion_tokens == 8 and exact.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=YES_NO, max_tokens=20,
                                       response_format={"type": "json_object"},
                                       extra_body={"min_tokens": 5})
    assert err.value.param == "min_tokens"
