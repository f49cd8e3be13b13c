"""The real service with the real models, driven by the official ``anthropic`` SDK."""

from __future__ import annotations

import uuid

import anthropic
import httpx
import pytest
import requests

from tests.helpers import ServiceProcess, pid_alive

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "input_schema": {"type": "object",
                            "properties": {"city": {"type": "string",
                                                    "enum": ["Paris", "London"]}},
                            "required": ["city"]}}
# A forced answer with a think block: the lower-case part is the reasoning.
# This SDK version has no sampling parameters; the service accepts them as extra fields.
T0 = {"temperature": 0}
THINK_GRAMMAR = 'root ::= "<think>" [a-z ]{3,30} "</think>" [A-Za-z .]{3,30}'


@pytest.fixture(scope="module")
def claude(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0, timeout=120)


def test_messages_create(claude):
    msg = claude.messages.create(
        model=MODEL, max_tokens=12, extra_body=T0,
        system=[{"type": "text", "text": "You are a helpful assistant.",
                 "cache_control": {"type": "ephemeral"}}],
        metadata={"user_id": "e2e"},
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == MODEL
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 10
    assert 0 < msg.usage.output_tokens <= 12
    assert msg._request_id


def test_max_tokens_stop_reason(claude):
    msg = claude.messages.create(model=MODEL, max_tokens=3, extra_body=T0, messages=[
        {"role": "user", "content": "Write a long story about a dragon."}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


def test_stream_text_and_final_message(claude):
    with claude.messages.stream(model=MODEL, max_tokens=16, extra_body=T0, messages=[
            {"role": "user", "content": "Count to five."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 16
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > 5
    # The same answer without streaming (temperature 0).
    msg = claude.messages.create(model=MODEL, max_tokens=16, extra_body=T0, messages=[
        {"role": "user", "content": "Count to five."}])
    assert msg.content[0].text == text


def test_raw_stream_event_order(claude):
    stream = claude.messages.create(model=MODEL, max_tokens=5, extra_body=T0, stream=True,
                                    messages=[{"role": "user", "content": "Hi"}])
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    # message_start carries the prompt size (uncached + read from the cache), as the real
    # API does, and it matches the final count.
    start = events[0].message.usage
    final = next(e for e in events if e.type == "message_delta").usage
    assert start.input_tokens + start.cache_read_input_tokens > 10
    assert start.input_tokens + start.cache_read_input_tokens == \
        final.input_tokens + final.cache_read_input_tokens
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}  # the SDK drops ``ping``


def test_count_tokens_matches_the_engine(claude):
    system = "You are terse."
    messages = [{"role": "user", "content": "Name three colors."}]
    counted = claude.messages.count_tokens(model=MODEL, system=system, messages=messages)
    msg = claude.messages.create(model=MODEL, max_tokens=2, system=system, messages=messages)
    processed = msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert counted.input_tokens == processed


def test_count_tokens_counts_the_tools(claude):
    """smollm2's template does not render tools, so they go into the prompt as text: the
    count must include them, as the generation's usage does."""
    tools = [{"name": "get_weather", "description": "The weather in a city.",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}]
    messages = [{"role": "user", "content": "Say hi"}]
    bare = claude.messages.count_tokens(model=MODEL, messages=messages)
    counted = claude.messages.count_tokens(model=MODEL, messages=messages, tools=tools)
    msg = claude.messages.create(model=MODEL, max_tokens=2, messages=messages, tools=tools)
    assert counted.input_tokens > bare.input_tokens
    assert counted.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens


def test_models_carry_the_request_id_header(claude):
    page = claude.models.with_raw_response.list()
    assert page.headers["request-id"] == page.headers["x-request-id"]
    model = claude.models.with_raw_response.retrieve(MODEL)
    assert model.headers["request-id"]


def test_stop_sequences(claude):
    msg = claude.messages.create(
        model=MODEL, max_tokens=20, stop_sequences=["gamma"],
        messages=[{"role": "user", "content": "Say the first Greek letters."}],
        extra_body={"grammar": 'root ::= "alpha beta gamma delta"'})
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "gamma"
    assert msg.content[0].text == "alpha beta "
    with claude.messages.stream(
            model=MODEL, max_tokens=20, stop_sequences=["gamma"],
            messages=[{"role": "user", "content": "Say the first Greek letters."}],
            extra_body={"grammar": 'root ::= "alpha beta gamma delta"'}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "gamma"


def test_a_tool_use_cut_off_by_max_tokens(claude):
    msg = claude.messages.create(model=MODEL, max_tokens=8, tools=[WEATHER],
                                 extra_body={"temperature": 0.0},
                                 tool_choice={"type": "tool", "name": "get_weather"},
                                 messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert msg.stop_reason == "max_tokens", msg
    assert [b.type for b in msg.content] == ["tool_use"] and msg.content[0].name == "get_weather"


def test_tools_round_trip(claude):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    msg = claude.messages.create(model=MODEL, max_tokens=120, extra_body=T0, tools=[WEATHER],
                                 tool_choice={"type": "tool", "name": "get_weather"},
                                 messages=[question])
    assert msg.stop_reason == "tool_use", msg
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1
    use = uses[0]
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    assert use.input["city"] in ("Paris", "London")
    # The same call streamed: input_json_delta pieces add up to the parsed input.
    with claude.messages.stream(model=MODEL, max_tokens=120, extra_body=T0, tools=[WEATHER],
                                tool_choice={"type": "any"}, messages=[question]) as stream:
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed and streamed[0].id.startswith("toolu_")
    assert streamed[0].input["city"] in ("Paris", "London")
    # The result goes back as a tool_result block; the model answers in text.
    answer = claude.messages.create(
        model=MODEL, max_tokens=30, extra_body=T0, tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=[question, {"role": "assistant", "content": msg.content},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": use.id,
                       "content": [{"type": "text", "text": "Sunny, 24 degrees"}]}]}])
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content[0].type == "text" and answer.content[0].text.strip()


def test_thinking_blocks_from_a_forced_think_block(claude):
    kwargs = dict(model=MODEL, max_tokens=1100,
                  thinking={"type": "enabled", "budget_tokens": 1024},
                  messages=[{"role": "user", "content": "Is the sky blue?"}],
                  extra_body={"grammar": THINK_GRAMMAR, "temperature": 0})
    msg = claude.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    thinking, text = msg.content
    assert thinking.thinking and set(thinking.thinking) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert thinking.signature and "<think>" not in text.text and text.text.strip()
    with claude.messages.stream(**kwargs) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == thinking.thinking
    assert final.content[0].signature == thinking.signature
    assert "thinking" in kinds and "signature" in kinds and "text" in kinds
    # The thinking block goes back in the next turn and is accepted.
    again = claude.messages.create(
        model=MODEL, max_tokens=8, extra_body=T0,
        thinking={"type": "disabled"},
        messages=[kwargs["messages"][0], {"role": "assistant", "content": msg.content},
                  {"role": "user", "content": "Thanks."}])
    assert all(b.type != "thinking" for b in again.content)


def test_thinking_disabled_strips_reasoning(claude):
    msg = claude.messages.create(model=MODEL, max_tokens=60,
                                 thinking={"type": "disabled"},
                                 messages=[{"role": "user", "content": "Is the sky blue?"}],
                                 extra_body={"grammar": THINK_GRAMMAR, "temperature": 0})
    assert [b.type for b in msg.content] == ["text"]
    assert "<think>" not in msg.content[0].text and "</think>" not in msg.content[0].text


def test_models_in_anthropic_shape(claude):
    page = claude.models.list()
    ids = [m.id for m in page.data]
    assert MODEL in ids and "gemma3:270m" in ids
    assert all(m.type == "model" and m.created_at for m in page.data)
    one = claude.models.retrieve(MODEL)
    assert one.id == MODEL and one.display_name == MODEL
    assert one.max_input_tokens == 8192
    assert [m.id for m in claude.models.list(limit=1)] == ids  # auto-pagination by after_id
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("missing:1b")


def test_errors(claude, base_url):
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="missing:1b", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.post("/v1/messages", cast_to=httpx.Response,
                    body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}])
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model=MODEL, max_tokens=5, messages=[
            {"role": "user", "content": "hi"}], extra_body={"grammar": "root ::= ("})
    with pytest.raises(anthropic.NotFoundError):
        claude.post("/v1/messages/nope", cast_to=httpx.Response, body={})
    resp = requests.post(base_url + "/v1/messages", data="{bad json",
                         headers={"content-type": "application/json",
                                  "anthropic-version": "2023-06-01"}, timeout=30)
    assert resp.status_code == 400
    assert resp.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": resp.json()["error"]["message"]},
                           "request_id": resp.headers["request-id"]}
    resp = requests.get(base_url + "/v1/messages", timeout=30)
    assert resp.status_code == 405 and resp.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, real_models, engine_binary):
    """A second service with an API key and a 1 MB body limit (it never loads a model)."""
    svc = ServiceProcess(tmp_path_factory.mktemp("guarded"), real_models,
                         extra_env={"OLLAMA_SERVER_API_KEY": "sekret",
                                    "OLLAMA_SERVER_MAX_BODY_MB": "1"})
    try:
        svc.wait_ready()
        yield svc
    finally:
        code = svc.stop()
        assert not [p for p in svc.engine_pids if pid_alive(p)]
        assert code == 0, svc.log()


def test_auth_and_huge_body(guarded):
    bad = anthropic.Anthropic(base_url=guarded.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "authentication_error"
    good = anthropic.Anthropic(base_url=guarded.base_url, api_key="sekret", max_retries=0)
    assert MODEL in [m.id for m in good.models.list()]
    bearer = anthropic.Anthropic(base_url=guarded.base_url, auth_token="sekret", max_retries=0)
    assert MODEL in [m.id for m in bearer.models.list()]
    with pytest.raises(anthropic.APIStatusError) as info:
        good.messages.create(model=MODEL, max_tokens=5,
                             messages=[{"role": "user", "content": "x" * 2_000_000}])
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"


def test_prompt_cache_survives_the_billing_line(claude, capsys):
    """Claude Code's billing line changes every request; the engine must still reuse the
    cached prefix on the second turn."""
    topic = uuid.uuid4().hex  # a system prompt no earlier request has put in the cache
    rules = " ".join(f"Rule {i}: keep answers short and mention item {i} of {topic}."
                     for i in range(60))

    def system(first_line):
        return [{"type": "text", "text": first_line},
                {"type": "text", "text": "You are a coding agent. " + rules,
                 "cache_control": {"type": "ephemeral"}}]

    def billing():
        return (f"x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; "
                f"cch={uuid.uuid4().hex[:5]};")

    turn1_messages = [{"role": "user", "content": "Say hello."}]
    turn1 = claude.messages.create(model=MODEL, max_tokens=8, extra_body=T0,
                                   system=system(billing()), messages=turn1_messages)
    turn2_messages = [*turn1_messages, {"role": "assistant", "content": turn1.content},
                      {"role": "user", "content": "Now say goodbye."}]
    turn2 = claude.messages.create(model=MODEL, max_tokens=8, extra_body=T0,
                                   system=system(billing()), messages=turn2_messages)
    # Control: a first line that is not the billing line and changes is not stripped, so
    # the prefix cache misses from the start.
    control = claude.messages.create(model=MODEL, max_tokens=8, extra_body=T0,
                                     system=system(f"session {uuid.uuid4().hex}"),
                                     messages=turn2_messages)
    u1, u2, uc = turn1.usage, turn2.usage, control.usage
    with capsys.disabled():
        print(f"\nprompt cache: turn 1 input={u1.input_tokens} cache_read="
              f"{u1.cache_read_input_tokens}; turn 2 input={u2.input_tokens} cache_read="
              f"{u2.cache_read_input_tokens}; control input={uc.input_tokens} cache_read="
              f"{uc.cache_read_input_tokens}")
    assert u1.input_tokens > 700
    assert u2.input_tokens + u2.cache_read_input_tokens > u1.input_tokens
    assert u2.cache_read_input_tokens >= u1.input_tokens * 0.9
    assert u2.input_tokens < u1.input_tokens / 10
    assert uc.input_tokens > u1.input_tokens * 0.9



def test_assistant_prefill_returns_only_the_continuation(claude):
    prefill = '{"name":'
    msg = claude.messages.create(
        model=MODEL, max_tokens=12, extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Give a person as JSON."},
                  {"role": "assistant", "content": prefill}])
    text = msg.content[0].text
    assert text and not text.startswith(prefill)
    with claude.messages.stream(
            model=MODEL, max_tokens=12, extra_body={"temperature": 0},
            messages=[{"role": "user", "content": "Give a person as JSON."},
                      {"role": "assistant", "content": prefill}]) as stream:
        streamed = "".join(stream.text_stream)
    # Greedy output can differ between a cached and an uncached prompt; the echo must not.
    assert streamed and not streamed.startswith(prefill)
