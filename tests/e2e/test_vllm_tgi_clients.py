"""The real service with the real models, driven by TGI's clients (``text_generation``,
``huggingface_hub``), the ``openai`` SDK with vLLM's extra fields, and raw HTTP for vLLM's and
TGI's own routes. The default model (``config.default_model``) is smollm2:135m."""

from __future__ import annotations

import json
import re

import openai
import pytest
import requests
import text_generation
from huggingface_hub import InferenceClient

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tgi(base_url):
    return text_generation.Client(base_url, timeout=120)


@pytest.fixture(scope="module")
def hf(base_url):
    return InferenceClient(base_url=base_url, timeout=120)


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _engine_ids(base_url, text):
    return requests.post(base_url + "/tokenize", json={"prompt": text,
                                                       "add_special_tokens": False},
                         timeout=60).json()["tokens"]


# --- TGI: text_generation.Client -------------------------------------------------------------

def test_text_generation_generate_details(tgi, base_url):
    resp = tgi.generate(PROMPT, max_new_tokens=8, decoder_input_details=True, top_n_tokens=2)
    d = resp.details
    assert resp.generated_text
    assert d.generated_tokens == len(d.tokens) == 8
    assert d.finish_reason == text_generation.types.FinishReason.Length
    assert d.seed is None  # greedy: no do_sample
    assert "".join(t.text for t in d.tokens) == resp.generated_text
    assert all(t.logprob is not None and t.logprob <= 0 for t in d.tokens)
    assert len(d.top_tokens) == 8 and all(1 <= len(top) <= 2 for top in d.top_tokens)
    # greedy decoding picks the most likely token, which the engine's top list confirms
    assert all(top[0].id == t.id for top, t in zip(d.top_tokens, d.tokens, strict=True))
    # the prompt's tokens (prefill) are the engine's tokenization of the input
    assert [p.id for p in d.prefill] == _engine_ids(base_url, PROMPT)
    # the token ids are the engine's: detokenizing them gives the generated text
    text = requests.post(base_url + "/detokenize", json={"tokens": [t.id for t in d.tokens]},
                         timeout=60).json()["prompt"]
    assert text == resp.generated_text


def test_text_generation_sampling_reports_seed(tgi):
    a = tgi.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=7, temperature=0.9)
    b = tgi.generate(PROMPT, max_new_tokens=6, do_sample=True, seed=7, temperature=0.9)
    assert a.details.seed == 7
    assert a.generated_text == b.generated_text


def test_text_generation_stop_sequence_and_full_text(tgi):
    resp = tgi.generate("1, 2, 3, 4,", max_new_tokens=20, stop_sequences=[","],
                        return_full_text=True)
    assert resp.details.finish_reason == text_generation.types.FinishReason.StopSequence
    assert resp.generated_text.startswith("1, 2, 3, 4,")
    # TGI keeps the stop sequence at the end of the generated text, streamed or not.
    resp = tgi.generate("1, 2, 3, 4,", max_new_tokens=20, stop_sequences=[" 7"])
    assert resp.generated_text == " 5, 6, 7"
    last = list(tgi.generate_stream("1, 2, 3, 4,", max_new_tokens=20,
                                    stop_sequences=[" 7"]))[-1]
    assert last.generated_text == " 5, 6, 7"
    assert last.details.finish_reason == text_generation.types.FinishReason.StopSequence


def test_text_generation_stream(tgi):
    events = list(tgi.generate_stream(PROMPT, max_new_tokens=6))
    assert len(events) == 6
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == "".join(e.token.text for e in events)
    assert last.details.finish_reason == text_generation.types.FinishReason.Length
    assert last.details.generated_tokens == 6
    assert all(isinstance(e.token.id, int) and e.token.logprob is not None for e in events)


def test_text_generation_validation_errors(tgi):
    with pytest.raises(text_generation.errors.ValidationError, match="max_new_tokens"):
        tgi.generate(PROMPT, max_new_tokens=100000)
    with pytest.raises(text_generation.errors.ValidationError, match="stop sequences"):
        tgi.generate(PROMPT, max_new_tokens=2, stop_sequences=["a", "b", "c", "d", "e"])
    with pytest.raises(text_generation.errors.ValidationError, match="best_of"):
        tgi.generate(PROMPT, max_new_tokens=2, best_of=2, do_sample=True)
    with pytest.raises(text_generation.errors.ValidationError, match="max_new_tokens"):
        list(tgi.generate_stream(PROMPT, max_new_tokens=100000))


def test_text_generation_grammar(tgi):
    grammar = text_generation.types.Grammar(type=text_generation.types.GrammarType.Regex,
                                            value=r"(yes|no)-[0-9]{2}")
    resp = tgi.generate("Answer: ", max_new_tokens=10, grammar=grammar)
    assert re.fullmatch(r"(yes|no)-[0-9]{2}", resp.generated_text), resp.generated_text
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"]}
    grammar = text_generation.types.Grammar(type=text_generation.types.GrammarType.Json,
                                            value=schema)
    resp = tgi.generate("The capital of France as JSON: ", max_new_tokens=30, grammar=grammar)
    assert isinstance(json.loads(resp.generated_text)["city"], str)


# --- TGI: huggingface_hub.InferenceClient ----------------------------------------------------

def test_hf_text_generation(hf):
    text = hf.text_generation(PROMPT, max_new_tokens=5)
    assert isinstance(text, str) and text
    out = hf.text_generation(PROMPT, max_new_tokens=5, details=True)
    assert out.details.generated_tokens == 5 and out.details.finish_reason == "length"
    assert "".join(t.text for t in out.details.tokens) == out.generated_text == text


def test_hf_text_generation_stream(hf):
    pieces = list(hf.text_generation(PROMPT, max_new_tokens=5, stream=True))
    assert len(pieces) == 5 and all(isinstance(p, str) for p in pieces)
    events = list(hf.text_generation(PROMPT, max_new_tokens=5, stream=True, details=True))
    assert events[-1].generated_text == "".join(pieces)
    assert events[-1].details.finish_reason == "length"


def test_hf_text_generation_error(hf):
    from huggingface_hub.errors import ValidationError

    with pytest.raises(ValidationError, match="max_new_tokens"):
        hf.text_generation(PROMPT, max_new_tokens=100000)


def test_hf_chat_completion_with_placeholder_model(hf):
    out = hf.chat_completion([{"role": "user", "content": "Say hi."}], max_tokens=6)
    assert out.choices[0].message.content
    chunks = list(hf.chat_completion([{"role": "user", "content": "Say hi."}], max_tokens=6,
                                     stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_hf_chat_completion_json_schema_holds(hf):
    """huggingface_hub turns OpenAI's json_schema into TGI's {type: json_object, value:
    <schema>}; the schema, not just "some JSON", must constrain the answer."""
    schema = {"type": "object", "properties": {"zzz": {"type": "integer"}},
              "required": ["zzz"], "additionalProperties": False}
    out = hf.chat_completion([{"role": "user", "content": "Describe a person."}],
                             max_tokens=30, temperature=0,
                             response_format={"type": "json_schema",
                                              "json_schema": {"name": "p", "schema": schema}})
    answer = json.loads(out.choices[0].message.content)
    assert list(answer) == ["zzz"] and isinstance(answer["zzz"], int)


# --- TGI: raw HTTP ---------------------------------------------------------------------------

def test_tgi_raw_routes(base_url):
    info = requests.get(base_url + "/info", timeout=30).json()
    assert info["model_id"] == MODEL and info["max_total_tokens"] >= 2048
    assert info["router"] == "text-generation-router"
    r = requests.post(base_url + "/generate", json={"inputs": PROMPT,
                                                    "parameters": {"max_new_tokens": 3}},
                      timeout=60)
    assert r.status_code == 200 and set(r.json()) == {"generated_text"}
    assert int(r.headers["x-generated-tokens"]) == 3
    r = requests.post(base_url + "/generate_stream",
                      json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}},
                      stream=True, timeout=60)
    frames = [line for line in r.iter_lines() if line]
    assert len(frames) == 3 and all(f.startswith(b"data:{") for f in frames)
    r = requests.post(base_url + "/generate", json={"inputs": PROMPT,
                                                    "parameters": {"temperature": 0}},
                      timeout=60)
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error: `temperature` must be strictly "
                                 "positive", "error_type": "validation"}
    toks = requests.post(base_url + "/tokenize", json={"inputs": "Hello world"},
                         timeout=60).json()
    assert "".join(t["text"] for t in toks) == "Hello world"
    assert [t["id"] for t in toks] == _engine_ids(base_url, "Hello world")
    assert toks[-1]["stop"] == len("Hello world")


# --- vLLM: openai SDK with extra_body --------------------------------------------------------

def _chat(oai, content, **extra):
    return oai.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                               "content": content}],
                                       max_tokens=extra.pop("max_tokens", 12), temperature=0,
                                       extra_body=extra)


def test_vllm_sampling_extras(oai):
    resp = _chat(oai, "Name a color.", top_k=5, min_p=0.05, repetition_penalty=1.1,
                 skip_special_tokens=True)
    assert resp.choices[0].message.content


def test_vllm_continuous_usage_stats(oai):
    """Usage on every chunk, counting up, the last one exact (vLLM's stream option)."""
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=6,
        temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content and all(c.usage.prompt_tokens > 0 for c in content)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
               for c in chunks)
    plain = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    assert [c.usage is None for c in plain] == [True] * (len(plain) - 1) + [False]


def test_vllm_guided_choice(oai):
    resp = _chat(oai, "Is the sky blue? Answer yes or no.", guided_choice=["yes", "no"])
    assert resp.choices[0].message.content in ("yes", "no")
    resp = _chat(oai, "Pick a fruit.",
                 structured_outputs={"choice": ["apple", "pear", "kiwi"]})
    assert resp.choices[0].message.content in ("apple", "pear", "kiwi")


def test_vllm_guided_json_and_regex(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    resp = _chat(oai, "Give a person as JSON.", guided_json=schema, max_tokens=40)
    data = json.loads(resp.choices[0].message.content)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)
    resp = _chat(oai, "Give a person as JSON.", structured_outputs={"json": schema},
                 max_tokens=40)
    assert isinstance(json.loads(resp.choices[0].message.content)["age"], int)
    resp = _chat(oai, "A phone number:", guided_regex=r"\d{3}-\d{4}")
    assert re.fullmatch(r"\d{3}-\d{4}", resp.choices[0].message.content)


def test_vllm_unsupported_fields_are_clear_400s(oai):
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        _chat(oai, "x", prompt_logprobs=1)
    with pytest.raises(openai.BadRequestError, match="guided"):
        _chat(oai, "x", guided_regex=r"(?=a)b")
    with pytest.raises(openai.BadRequestError, match="one kind"):
        _chat(oai, "x", guided_choice=["a"], guided_regex="a")


def test_vllm_chat_template_kwargs_and_stop_tokens(oai, base_url):
    resp = _chat(oai, "Say hello.", chat_template_kwargs={"enable_thinking": False})
    assert resp.choices[0].message.content
    kept = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8,
                                  temperature=0, stop=[","],
                                  extra_body={"include_stop_str_in_output": True})
    cut = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8,
                                 temperature=0, stop=[","])
    assert kept.choices[0].text == cut.choices[0].text + ","
    comma = _engine_ids(base_url, ",")
    resp = _chat(oai, "Count: 1, 2, 3, 4", stop_token_ids=comma, max_tokens=20)
    assert "," not in resp.choices[0].message.content
    # vLLM names the stop token by its id (an int), a stop string by its text.
    by_id = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8,
                                   temperature=0, extra_body={"stop_token_ids": comma})
    assert by_id.choices[0].model_extra["stop_reason"] in comma, by_id.choices[0]
    assert cut.choices[0].model_extra["stop_reason"] == ","


def test_vllm_completions_extras(oai):
    resp = oai.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                  extra_body={"top_k": 1, "guided_regex": "[0-9 ,]+"})
    assert re.fullmatch(r"[0-9 ,]+", resp.choices[0].text)


def test_vllm_model_card(oai):
    card = oai.models.retrieve(MODEL)
    assert card.max_model_len == 8192


# --- vLLM: raw HTTP --------------------------------------------------------------------------

def test_vllm_tokenize_detokenize(base_url):
    r = requests.post(base_url + "/tokenize", json={"model": MODEL, "prompt": "Hello world",
                                                    "return_token_strs": True}, timeout=60)
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert "".join(body["token_strs"]) == "Hello world"
    assert body["max_model_len"] >= 2048
    chat = requests.post(base_url + "/tokenize",
                         json={"model": MODEL, "messages": [{"role": "user",
                                                             "content": "Hello world"}]},
                         timeout=60).json()
    assert chat["count"] > body["count"] and chat["token_strs"] is None
    back = requests.post(base_url + "/detokenize",
                         json={"model": MODEL, "tokens": body["tokens"]}, timeout=60).json()
    assert back == {"prompt": "Hello world"}


def test_vllm_version_ping_and_legacy_generate(base_url):
    assert re.fullmatch(r"\d+\.\d+\.\d+", requests.get(base_url + "/version",
                                                       timeout=10).json()["version"])
    assert requests.get(base_url + "/ping", timeout=10).status_code == 200
    assert requests.post(base_url + "/ping", timeout=10).status_code == 200
    r = requests.post(base_url + "/generate", json={"prompt": PROMPT, "max_tokens": 4,
                                                    "temperature": 0}, timeout=60)
    text = r.json()["text"]
    assert len(text) == 1 and text[0].startswith(PROMPT) and len(text[0]) > len(PROMPT)
    r = requests.post(base_url + "/generate", json={"prompt": PROMPT, "max_tokens": 4,
                                                    "temperature": 0, "stream": True},
                      stream=True, timeout=60)
    lines = [json.loads(line)["text"][0] for line in r.iter_lines() if line]
    assert lines and lines[-1] == text[0]
    assert all(b.startswith(a) for a, b in zip(lines, lines[1:], strict=False))


def test_vllm_stop_reason_is_the_matched_string(base_url):
    resp = requests.post(base_url + "/v1/completions", timeout=60, json={
        "model": "smollm2:135m", "prompt": "1, 2, 3, 4,", "max_tokens": 20,
        "temperature": 0, "stop": [" 6"]}).json()
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " 6"
