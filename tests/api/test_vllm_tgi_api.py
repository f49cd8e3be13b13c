"""vLLM's and TGI's routes through the Flask test client with the scripted FakeExecutor."""

from __future__ import annotations

import json

import pytest

from ollama_server.core.errors import EngineFailed, Overloaded
from ollama_server.core.schemas import Finish, TextDelta, TokenInfo, Usage

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def default_tiny(app, script):
    """TGI routes serve config.default_model: point it at the tiny store's model, and answer
    with engine tokens (ids, texts, logprobs) as the raw-prompt path does."""
    app.extensions["ollama_server"].config.default_model = "tiny"
    script.events = [
        TextDelta("Hel", [TokenInfo(5, "Hel", -0.5, top=[("Hel", -0.5, 5), ("He", -1.0, 6)])]),
        TextDelta("lo", [TokenInfo(6, "lo", -0.25, top=[("lo", -0.25, 6)])]),
        Finish("length", Usage(prompt_tokens=3, completion_tokens=2))]


def sse_objects(resp):
    text = resp.get_data(as_text=True)
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data:{") for f in frames), text  # no space after "data:"
    return [json.loads(f[5:]) for f in frames]


# --- TGI -------------------------------------------------------------------------------------

def test_generate_with_details(client, fake_engines):
    r = client.post("/generate", json={"inputs": "a b c", "parameters": {
        "details": True, "decoder_input_details": True, "top_n_tokens": 2,
        "max_new_tokens": 5}})
    assert r.status_code == 200
    body = r.get_json()
    assert body["generated_text"] == "Hello"
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 2
    assert [t["id"] for t in d["tokens"]] == [5, 6]
    assert [p["text"] for p in d["prefill"]] == ["a", "b", "c"]
    assert d["top_tokens"][0][1]["text"] == "He"
    assert r.headers["x-generated-tokens"] == "2" and r.headers["x-prompt-tokens"] == "3"
    req = fake_engines[-1].requests[-1]
    assert req.raw and req.prompt == "a b c" and req.max_tokens == 5 and req.logprobs
    assert req.model == "tiny" and req.temperature == 0.0  # greedy without do_sample


def test_compat_route_answers_an_array_or_a_stream(client):
    r = client.post("/", json={"inputs": "a b", "parameters": {"details": True}})
    assert r.status_code == 200 and isinstance(r.get_json(), list)
    assert r.get_json()[0]["details"]["tokens"][1]["text"] == "lo"
    r = client.post("/", json={"inputs": "a b", "parameters": {"details": True},
                               "stream": True})
    objs = sse_objects(r)
    assert [o["token"]["id"] for o in objs] == [5, 6]
    assert objs[0]["generated_text"] is None and objs[0]["details"] is None
    assert objs[-1]["generated_text"] == "Hello"
    assert objs[-1]["details"] == {"finish_reason": "length", "generated_tokens": 2,
                                   "seed": None, "input_length": 3}


def test_generate_stream_route(client):
    r = client.post("/generate_stream", json={"inputs": "a", "parameters": {}})
    assert r.mimetype == "text/event-stream" and r.headers["X-Accel-Buffering"] == "no"
    objs = sse_objects(r)
    assert len(objs) == 2 and objs[-1]["details"] is None and objs[-1]["generated_text"]


def test_return_full_text_and_truncate(client, fake_engines):
    r = client.post("/generate", json={"inputs": "a b c d", "parameters": {
        "return_full_text": True, "truncate": 2, "max_new_tokens": 2}})
    assert r.get_json()["generated_text"] == "a b c dHello"
    assert fake_engines[-1].requests[-1].prompt == [3, 4]  # the engine ids of the last 2


@pytest.mark.parametrize("params,message", [
    ({"temperature": 0}, "Input validation error: `temperature` must be strictly positive"),
    ({"max_new_tokens": 5000}, "Input validation error: `inputs` tokens + `max_new_tokens` "
                               "must be <= 4096. Given: 1 `inputs` tokens and 5000 "
                               "`max_new_tokens`"),
    ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not allowed for this endpoint"),
    ({"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
])
def test_validation_errors_are_422(client, params, message):
    r = client.post("/generate", json={"inputs": "a", "parameters": params})
    assert r.status_code == 422
    assert r.get_json()["error_type"] == "validation" and message in r.get_json()["error"]


def test_empty_inputs(client):
    r = client.post("/generate", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422
    assert r.get_json() == {"error": "Input validation error: `inputs` cannot be empty",
                            "error_type": "validation"}


def test_stream_errors_are_events_of_a_200_stream(client):
    r = client.post("/generate_stream", json={"inputs": "", "parameters": {}})
    assert r.status_code == 200
    assert sse_objects(r) == [{"error": "Input validation error: `inputs` cannot be empty",
                               "error_type": "validation"}]


def test_engine_errors(client, script):
    script.error = Overloaded("queue full")
    r = client.post("/generate", json={"inputs": "a"})
    assert r.status_code == 429
    assert r.get_json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    script.error = EngineFailed("crashed")
    r = client.post("/generate", json={"inputs": "a"})
    assert r.status_code == 424 and r.get_json()["error_type"] == "generation"


def test_mid_stream_error(client, script):
    script.fail_after = 1
    script.mid_error = EngineFailed("lost the engine")
    objs = sse_objects(client.post("/generate_stream", json={"inputs": "a"}))
    assert objs[-1] == {"error": "Request failed during generation: lost the engine",
                        "error_type": "generation"}


def test_unknown_tgi_route_and_bad_json(client):
    r = client.post("/generate", data="{nope", content_type="application/json")
    assert r.status_code == 422 and r.get_json()["error_type"] == "validation"


def test_info(client):
    info = client.get("/info").get_json()
    assert info["model_id"] == "tiny:latest" and info["max_total_tokens"] == 4096
    assert info["max_input_tokens"] == 4095 and info["max_best_of"] == 1


def test_tgi_tokenize(client):
    r = client.post("/tokenize", json={"inputs": "a bb"})
    assert r.get_json() == [{"id": 1, "text": "a", "start": 0, "stop": 1},
                            {"id": 2, "text": "bb", "start": 2, "stop": 4}]
    r = client.post("/tokenize", json={"inputs": ""})
    assert r.status_code == 422 and r.get_json()["error_type"] == "validation"


@pytest.mark.parametrize("name", ["dummy", "tgi"])
def test_placeholder_models_on_chat(client, fake_engines, name):
    r = client.post("/v1/chat/completions", json={"model": name, "messages": MSGS})
    assert r.status_code == 200
    assert fake_engines[-1].name == "tiny:latest"


def test_other_unknown_models_are_still_404(client):
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": MSGS})
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "model_not_found"


# --- vLLM ------------------------------------------------------------------------------------

def test_vllm_tokenize_prompt_and_messages(client):
    r = client.post("/tokenize", json={"model": "tiny", "prompt": "a b c",
                                       "return_token_strs": True})
    assert r.get_json() == {"count": 3, "max_model_len": 4096, "tokens": [1, 2, 3],
                            "token_strs": ["a", "b", "c"]}
    r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "x y"}]})
    assert r.get_json()["count"] == 2 and r.get_json()["token_strs"] is None
    r = client.post("/tokenize", json={"prompt": 3})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "prompt"


def test_vllm_detokenize(client):
    assert client.post("/detokenize", json={"tokens": [1, 2]}).get_json() == {
        "prompt": "t1 t2"}
    r = client.post("/detokenize", json={"tokens": "x"})
    assert r.status_code == 400 and "tokens" in r.get_json()["error"]["message"]


def test_vllm_version_and_ping(client):
    assert client.get("/version").get_json() == {"version": "0.11.0"}
    assert client.get("/ping").status_code == 200
    assert client.post("/ping").status_code == 200


def test_vllm_legacy_generate(client, fake_engines):
    r = client.post("/generate", json={"prompt": "Hi ", "max_tokens": 3, "top_k": 2})
    assert r.get_json() == {"text": ["Hi Hello"]}
    req = fake_engines[-1].requests[-1]
    assert req.prompt == "Hi " and req.max_tokens == 3 and req.top_k == 2
    r = client.post("/generate", json={"prompt": "Hi ", "stream": True})
    lines = [json.loads(line) for line in r.get_data(as_text=True).splitlines() if line]
    assert lines == [{"text": ["Hi Hel"]}, {"text": ["Hi Hello"]}]
    r = client.post("/generate", json={"prompt": "Hi", "min_p": 5})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "min_p"


def test_vllm_extras_on_chat(client, fake_engines):
    r = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MSGS, "guided_choice": ["yes", "no"],
        "stop_token_ids": [7], "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.1})
    assert r.status_code == 200
    req = fake_engines[-1].requests[-1]
    assert req.grammar == 'root ::= "yes" | "no"\n'
    assert req.stop == ["t7"]  # the stop token's text (FakeExecutor.detokenize)
    assert (req.top_k, req.min_p, req.repeat_penalty) == (3, 0.1, 1.1)


def test_vllm_include_stop_str_in_output(client, script):
    script.events = [TextDelta("1"), Finish("stop_sequence", Usage(1, 1), stop_sequence=",")]
    body = {"model": "tiny", "messages": MSGS, "stop": [","]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.get_json()["choices"][0]["message"]["content"] == "1"
    r = client.post("/v1/chat/completions", json={**body, "include_stop_str_in_output": True})
    assert r.get_json()["choices"][0]["message"]["content"] == "1,"


def test_vllm_reasoning_fields(client, script):
    script.events = [TextDelta("<think>hmm</think>ok"), Finish("stop", Usage(1, 2))]
    r = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MSGS, "chat_template_kwargs": {"enable_thinking": True}})
    msg = r.get_json()["choices"][0]["message"]
    assert msg["content"] == "ok" and msg["reasoning_content"] == msg["reasoning"] == "hmm"


@pytest.mark.parametrize("extra,param", [({"prompt_logprobs": 2}, "prompt_logprobs"),
                                         ({"guided_regex": "(?=a)"}, "guided_regex"),
                                         ({"min_tokens": 4, "guided_choice": ["a"]},
                                          "min_tokens")])
def test_vllm_unsupported_fields_are_400(client, extra, param):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSGS, **extra})
    assert r.status_code == 400
    assert r.get_json()["error"]["param"] == param
