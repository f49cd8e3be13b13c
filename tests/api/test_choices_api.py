"""``n`` > 1 and ``min_tokens`` through the Flask test client with the scripted executor: the
shapes OpenAI and vLLM give, and what the core sends to the engine."""

from __future__ import annotations

import json

from ollama_server.core.errors import EngineFailed
from ollama_server.core.schemas import Finish, PromptInfo, TextDelta, TokenInfo, Usage

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def sse(resp) -> list[dict]:
    frames = [f[6:] for f in resp.get_data(as_text=True).split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def test_chat_n_choices_whole(client, fake_engines):
    body = client.post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": 7}).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "Hello world" for c in body["choices"])
    assert all(c["finish_reason"] == "stop" for c in body["choices"])
    # The prompt is counted once, generated tokens of every choice summed.
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["total_tokens"] == 11
    # One stream per choice, seeds moved by the index so seeded choices differ.
    assert sorted(r.seed for r in fake_engines[0].requests) == [7, 8, 9]
    assert all(r.n == 3 for r in fake_engines[0].requests)


def test_chat_n_stream_interleaves_choices_and_ends_with_summed_usage(client):
    chunks = sse(client.post("/v1/chat/completions", json={
        **CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}}))
    roles = [c["choices"][0]["index"] for c in chunks[:2]]
    assert roles == [0, 1] and all(c["choices"][0]["delta"]["role"] == "assistant"
                                   for c in chunks[:2])
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"]
                and c["choices"][0]["index"] == index]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == "Hello world"
        assert [ch["finish_reason"] for ch in mine if ch["finish_reason"]] == ["stop"]
    assert all(len(c["choices"]) == 1 for c in chunks[:-1])
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["prompt_tokens"] == 5
    # Without include_usage there is no usage chunk at all.
    plain = sse(client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True}))
    assert all(c["choices"] for c in plain) and all("usage" not in c for c in plain)


def test_completions_n_whole_and_streamed_with_echo(client):
    req = {"model": "tiny", "prompt": "Say:", "n": 2, "echo": True, "max_tokens": 5}
    body = client.post("/v1/completions", json=req).get_json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "Say:Hello world"),
                                                                 (1, "Say:Hello world")]
    assert body["usage"]["completion_tokens"] == 4
    chunks = sse(client.post("/v1/completions", json={**req, "stream": True}))
    for index in (0, 1):
        text = "".join(c["choices"][0]["text"] for c in chunks
                       if c["choices"] and c["choices"][0]["index"] == index)
        assert text == "Say:Hello world"


def test_vllm_legacy_generate_gives_every_choice(client):
    body = client.post("/generate", json={"model": "tiny", "prompt": "Say:", "n": 2}).get_json()
    assert body == {"text": ["Say:Hello world", "Say:Hello world"]}
    resp = client.post("/generate", json={"model": "tiny", "prompt": "Say:", "n": 2,
                                          "stream": True})
    lines = [json.loads(x) for x in resp.get_data(as_text=True).splitlines()]
    assert lines[-1] == {"text": ["Say:Hello world", "Say:Hello world"]}


def test_a_failing_choice_fails_the_whole_answer(client, script):
    script.fail_after = 1
    script.mid_error = EngineFailed("llama-server crashed")
    chunks = sse(client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True}))
    assert "llama-server crashed" in chunks[-1]["error"]["message"]


def test_n_out_of_range_is_openais_error(client):
    resp = client.post("/v1/chat/completions", json={**CHAT, "n": 129})
    assert resp.status_code == 400
    assert resp.get_json()["error"] == {
        "message": "Invalid 'n': integer above maximum value. Expected a value <= 128, but "
                   "got 129 instead.",
        "type": "invalid_request_error", "param": "n", "code": "integer_above_max_value"}


def _tokens(*pairs: tuple[int, str]) -> list[TextDelta]:
    return [TextDelta(text, tokens=[TokenInfo(id=i, text=text)]) for i, text in pairs]


def test_min_tokens_is_two_engine_requests_that_make_one_answer(client, script, fake_engines):
    script.events = [PromptInfo(4), *_tokens((11, "A"), (12, "B")),
                     Finish("length", Usage(prompt_tokens=4, completion_tokens=2))]
    resp = client.post("/v1/chat/completions", json={
        **CHAT, "min_tokens": 2, "max_tokens": 5, "stop": ["."], "stop_token_ids": [42],
        "logit_bias": {"7": 1.5}})
    body = resp.get_json()
    assert body["choices"][0]["message"]["content"] == "ABAB"
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 4
    first, second = fake_engines[0].requests
    prompt = [1]  # the fake's tokenization of its rendered template ("hi")
    # Part one: only the minimum, nothing may end it.
    assert (first.prompt, first.max_tokens, first.stop, first.ignore_eos) == \
        (prompt, 2, [], True)
    assert first.logit_bias == {7: 1.5, 42: float("-inf")} and first.messages is None
    # Part two: the same tokens plus those generated, with the request's own stopping.
    assert second.prompt == prompt + [11, 12] and second.max_tokens == 3
    assert "." in second.stop and not second.ignore_eos and second.min_tokens is None
    assert second.logit_bias == {7: 1.5}


def test_min_tokens_equal_to_max_tokens_is_one_request(client, script, fake_engines):
    script.events = [*_tokens((11, "A"), (12, "B")), Finish("length", Usage(3, 2))]
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "x",
                                                "min_tokens": 2, "max_tokens": 2}).get_json()
    assert body["choices"][0]["text"] == "AB"
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(fake_engines[0].requests) == 1
