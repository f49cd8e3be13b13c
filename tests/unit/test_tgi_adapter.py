"""TGI's wire format: pure translation and validation (no Flask, no engine)."""

from __future__ import annotations

import pytest

from ollama_server.adapters.tgi import (
    TGIStream,
    TGIValidation,
    check_tgi_lengths,
    internal_to_tgi_generate,
    internal_to_tgi_tokenize,
    prefill_tokens,
    tgi_error,
    tgi_generate_to_internal,
    tgi_info,
)
from ollama_server.core.errors import (
    ContextLengthExceeded,
    EngineFailed,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
)
from ollama_server.core.schemas import Finish, TextDelta, TokenInfo, Usage
from ollama_server.service.generation import Result


def parse(params=None, stream=False, inputs="Hello"):
    body = {"inputs": inputs}
    if params is not None:
        body["parameters"] = params
    return tgi_generate_to_internal(body, "m", stream)


@pytest.mark.parametrize("params,message", [
    ({"temperature": 0}, "`temperature` must be strictly positive"),
    ({"temperature": -1.0}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not allowed for this endpoint"),
    ({"watermark": True}, "watermark"),
    ({"grammar": {"type": "xml", "value": "x"}}, "unknown variant `xml`"),
    ({"grammar": {"type": "regex", "value": "(?=a)"}}, "grammar is not valid"),
    ({"temperature": "hot"}, "parameters.temperature: invalid type"),
])
def test_validation_messages_are_tgis(params, message):
    with pytest.raises(TGIValidation) as info:
        parse(params)
    assert message in info.value.message
    body, status = tgi_error(info.value)
    assert status == 422 and body["error_type"] == "validation"
    assert body["error"].startswith("Input validation error: ")


def test_empty_or_missing_inputs():
    with pytest.raises(TGIValidation, match="`inputs` cannot be empty"):
        parse({}, inputs="")
    with pytest.raises(TGIValidation, match="missing field `inputs`"):
        tgi_generate_to_internal({"parameters": {}}, "m")


def test_streaming_only_errors():
    with pytest.raises(TGIValidation, match="not supported when streaming"):
        parse({"best_of": 2}, stream=True)
    with pytest.raises(TGIValidation, match="`decoder_input_details` == true is not supported"):
        parse({"decoder_input_details": True}, stream=True)
    assert parse({"decoder_input_details": True}).decoder_input_details


def test_missing_parameters_samples_but_empty_parameters_is_greedy():
    sampled = parse(None)
    assert sampled.sampling and sampled.req.temperature == 1.0 and sampled.seed is not None
    assert sampled.req.seed == sampled.seed
    greedy = parse({})
    assert not greedy.sampling and greedy.req.temperature == 0.0 and greedy.seed is None
    # a warper turns sampling on even without do_sample, as in TGI
    assert parse({"top_k": 5}).sampling and parse({"top_k": 5}).req.top_k == 5


def test_null_fields_are_absent():
    # text_generation.Client sends every field, None ones as null
    tgi = parse({"best_of": None, "temperature": None, "top_k": None, "seed": None,
                 "grammar": None, "stop": [], "truncate": None, "details": True,
                 "do_sample": False, "max_new_tokens": 20, "top_n_tokens": None})
    assert tgi.details and tgi.max_new_tokens == 20 and tgi.req.max_tokens == 20


def test_parameters_map_onto_the_request():
    tgi = parse({"do_sample": True, "seed": 42, "temperature": 0.7, "top_p": 0.9,
                 "repetition_penalty": 1.3, "frequency_penalty": 0.5, "stop": ["\n"],
                 "top_n_tokens": 3, "return_full_text": True, "truncate": 10})
    req = tgi.req
    assert (req.temperature, req.top_p, req.seed, req.repeat_penalty) == (0.7, 0.9, 42, 1.3)
    assert req.frequency_penalty == 0.5 and req.stop == ["\n"] and req.raw
    assert req.logprobs and req.top_logprobs == 3 and tgi.seed == 42
    assert tgi.return_full_text and tgi.truncate == 10 and tgi.top_n_tokens == 3
    assert parse({}).req.top_logprobs == 1  # per-token logprobs are always asked for


@pytest.mark.parametrize("grammar,field,value", [
    ({"type": "json", "value": {"properties": {}}}, "json_schema", {"properties": {}}),
    ({"type": "json", "value": '{"type": "object"}'}, "json_schema", {"type": "object"}),
    ({"type": "json_object", "value": {"type": "object"}}, "json_schema", {"type": "object"}),
    ({"type": "json_schema", "value": {"name": "x", "schema": {"type": "array"}}},
     "json_schema", {"type": "array"}),
    ({"type": "regex", "value": "[ab]+"}, "grammar", "root ::= [ab]+\n"),
])
def test_grammar_forms(grammar, field, value):
    assert getattr(parse({"grammar": grammar}).req, field) == value


def test_length_rules():
    tgi = parse({"max_new_tokens": 10})
    assert check_tgi_lengths(tgi, 5, 100) == 10 and tgi.req.max_tokens == 10
    with pytest.raises(TGIValidation) as info:
        check_tgi_lengths(parse({"max_new_tokens": 96}), 5, 100)
    assert info.value.message == ("`inputs` tokens + `max_new_tokens` must be <= 100. Given: 5 "
                                  "`inputs` tokens and 96 `max_new_tokens`")
    # no max_new_tokens: what is left of the context, at most 1024
    assert check_tgi_lengths(parse({}), 5, 100) == 95
    assert check_tgi_lengths(parse({}), 5, 8192) == 1024
    # truncation counts the kept tokens only
    assert check_tgi_lengths(parse({"truncate": 4, "max_new_tokens": 96}), 50, 100) == 96
    with pytest.raises(TGIValidation, match="`truncate` must be strictly positive and less "
                                            "than 99. Given: 200"):
        check_tgi_lengths(parse({"truncate": 200}), 5, 100)
    # the largest input that fits: max_input_tokens = max_total_tokens - 1
    assert check_tgi_lengths(parse({"max_new_tokens": 1}), 99, 100) == 1
    with pytest.raises(TGIValidation, match="Given: 100 `inputs` tokens and 1"):
        check_tgi_lengths(parse({"max_new_tokens": 1}), 100, 100)


def _result(finish="stop", completion=2):
    tokens = [TokenInfo(5, "Hel", -0.5, top=[("Hel", -0.5, 5), ("He", -1.5, 9)]),
              TokenInfo(6, "lo", -0.25, top=[("lo", -0.25, 6)])]
    return Result(text="Hello", tokens=tokens,
                  finish=Finish(finish, Usage(prompt_tokens=3, completion_tokens=completion)))


@pytest.mark.parametrize("reason,tgi_reason", [("stop", "eos_token"), ("length", "length"),
                                               ("stop_sequence", "stop_sequence")])
def test_generate_details(reason, tgi_reason):
    tgi = parse({"details": True, "top_n_tokens": 2, "decoder_input_details": True})
    prefill = prefill_tokens([{"id": 1, "piece": "Hi"}])
    out = internal_to_tgi_generate(_result(reason), tgi, prefill)
    assert out == {"generated_text": "Hello", "details": {
        "finish_reason": tgi_reason, "generated_tokens": 2, "seed": None,
        "prefill": [{"id": 1, "text": "Hi", "logprob": None}],
        "tokens": [{"id": 5, "text": "Hel", "logprob": -0.5, "special": False},
                   {"id": 6, "text": "lo", "logprob": -0.25, "special": False}],
        "top_tokens": [[{"id": 5, "text": "Hel", "logprob": -0.5, "special": False},
                        {"id": 9, "text": "He", "logprob": -1.5, "special": False}],
                       [{"id": 6, "text": "lo", "logprob": -0.25, "special": False}]]}}


def test_generate_without_details_and_full_text():
    assert internal_to_tgi_generate(_result(), parse({})) == {"generated_text": "Hello"}
    out = internal_to_tgi_generate(_result(), parse({"return_full_text": True,
                                                     "details": True}))
    assert out["generated_text"] == "HelloHello" and out["details"]["prefill"] == []
    assert "top_tokens" not in out["details"]


def test_stream_holds_the_last_token_for_the_final_event():
    tgi = parse({"details": True, "do_sample": True, "seed": 3})
    s = TGIStream(tgi, input_length=3)
    assert s.process(TextDelta("Hel", [TokenInfo(5, "Hel", -0.5)])) == []
    first = s.process(TextDelta("lo", [TokenInfo(6, "lo", -0.25)]))
    assert first == [{"index": 1, "token": {"id": 5, "text": "Hel", "logprob": -0.5,
                                            "special": False},
                      "generated_text": None, "details": None}]
    last = s.process(Finish("length", Usage(prompt_tokens=3, completion_tokens=2)))
    assert last == [{"index": 2, "token": {"id": 6, "text": "lo", "logprob": -0.25,
                                           "special": False},
                     "generated_text": "Hello",
                     "details": {"finish_reason": "length", "generated_tokens": 2, "seed": 3,
                                 "input_length": 3}}]


def test_stream_top_tokens_and_full_text():
    tgi = parse({"top_n_tokens": 1, "return_full_text": True})
    s = TGIStream(tgi)
    s.process(TextDelta("x", [TokenInfo(1, "x", -0.1, top=[("x", -0.1, 1), ("y", -2.0, 2)])]))
    (last,) = s.process(Finish("stop"))
    assert last["top_tokens"] == [{"id": 1, "text": "x", "logprob": -0.1, "special": False}]
    assert last["generated_text"] == "Hellox" and last["details"] is None


def test_stream_with_no_token_still_ends():
    (last,) = TGIStream(parse({})).process(Finish("stop"))
    assert last["generated_text"] == "" and last["token"]["id"] == 0


def test_tokenize_offsets():
    pieces = [{"id": 1, "piece": "<s>"}, {"id": 2, "piece": "Hello"}, {"id": 3, "piece": " wor"},
              {"id": 4, "piece": "ld"}]
    assert internal_to_tgi_tokenize("Hello world", pieces) == [
        {"id": 1, "text": "<s>", "start": 0, "stop": 0},
        {"id": 2, "text": "Hello", "start": 0, "stop": 5},
        {"id": 3, "text": " wor", "start": 5, "stop": 9},
        {"id": 4, "text": "ld", "start": 9, "stop": 11}]


def test_info():
    info = tgi_info("m", 8192, 128, "abc")
    assert info["max_input_tokens"] == 8191 and info["max_best_of"] == 1
    assert info["model_pipeline_tag"] == "text-generation" and info["sha"] == "abc"


@pytest.mark.parametrize("exc,status,kind", [
    (InvalidRequest("bad"), 422, "validation"),
    (ContextLengthExceeded(10, 5), 422, "validation"),
    (Overloaded("busy"), 429, "overloaded"),
    (EngineFailed("boom"), 424, "generation"),
    (ModelNotFound("x"), 404, "not_found"),
])
def test_error_types(exc, status, kind):
    body, code = tgi_error(exc)
    assert code == status and body["error_type"] == kind and isinstance(body["error"], str)
    if kind == "generation":
        assert body["error"] == "Request failed during generation: boom"
    if kind == "overloaded":
        assert body["error"] == "Model is overloaded"
