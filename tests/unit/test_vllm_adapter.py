"""vLLM's extra fields and routes: pure translation (no Flask, no engine)."""

from __future__ import annotations

import pytest

from ollama_server.adapters.openai import openai_chat_to_internal, openai_completion_to_internal
from ollama_server.adapters.vllm import (
    VLLMGenerateStream,
    internal_to_vllm_tokenize,
    vllm_detokenize_tokens,
    vllm_generate_to_internal,
    vllm_tokenize_request,
)
from ollama_server.core.errors import InvalidRequest, Unsupported
from ollama_server.core.grammar import choice_to_gbnf, regex_to_gbnf
from ollama_server.core.schemas import Finish, ReasoningDelta, TextDelta

MSGS = [{"role": "user", "content": "hi"}]


def chat(**extra):
    return openai_chat_to_internal({"model": "m", "messages": MSGS, **extra})


@pytest.mark.parametrize("pattern,gbnf", [
    (r"\d{3}-\d{4}", '[0-9]{3} "-" [0-9]{4}'),
    (r"^(yes|no)$", '(("y" "e" "s" | "n" "o"))'),
    (r"colou?r", '"c" "o" "l" "o" "u"? "r"'),
    (r"(?:ab)+?", '("a" "b")+'),
    (r"(?P<x>a)*", '("a")*'),
    (r"x{2,}", '"x"{2,}'),
    (r"x{2,5}", '"x"{2,5}'),
    (r"a.b\.c", '"a" [^\\n] "b" "." "c"'),
    (r"[a-z_]+", "[a-z_]+"),
    (r"[^\]\\-]", "[^\\]\\\\\\x2D]"),  # ] \ - escaped the way llama.cpp's GBNF reads them
    (r"[\d\s]", "[0-9 \\t\\n\\r\\x0C\\x0B]"),
    (r"\W", "[^a-zA-Z0-9_]"),
    (r'say "hi"', '"s" "a" "y" " " "\\"" "h" "i" "\\""'),
    (r"\x41\u00e9", '"A" "é"'),
    (r"a|", '("a" | "")'),
])
def test_regex_to_gbnf(pattern, gbnf):
    assert regex_to_gbnf(pattern) == f"root ::= {gbnf}\n"


@pytest.mark.parametrize("pattern", [r"(?=a)b", r"(?!a)b", r"(?<=a)b", r"(a)\1", r"\bword",
                                     r"a++", r"[[:alpha:]]", r"a^b", r"a$b", r"(ab", r"[ab",
                                     r"*a", r"(?i)abc", "a\\"])
def test_regex_to_gbnf_rejects_what_it_cannot_translate(pattern):
    with pytest.raises(Unsupported, match="guided"):
        regex_to_gbnf(pattern)


def test_choice_to_gbnf_escapes_literals():
    assert choice_to_gbnf(['a"b', "c\\d", "e\nf"]) == 'root ::= "a\\"b" | "c\\\\d" | "e\\nf"\n'
    with pytest.raises(InvalidRequest):
        choice_to_gbnf([])
    with pytest.raises(InvalidRequest):
        choice_to_gbnf(["a", 1])


@pytest.mark.parametrize("extra,field,value", [
    ({"guided_json": {"type": "object"}}, "json_schema", {"type": "object"}),
    ({"guided_json": '{"type": "array"}'}, "json_schema", {"type": "array"}),
    ({"structured_outputs": {"json": {"type": "object"}}}, "json_schema", {"type": "object"}),
    ({"structured_outputs": {"json_object": True}}, "json_schema", {}),
    ({"guided_choice": ["a", "b"]}, "grammar", 'root ::= "a" | "b"\n'),
    ({"structured_outputs": {"choice": ["x"]}}, "grammar", 'root ::= "x"\n'),
    ({"guided_regex": "[0-9]+"}, "grammar", "root ::= [0-9]+\n"),
    ({"structured_outputs": {"regex": "a"}}, "grammar", 'root ::= "a"\n'),
    ({"guided_grammar": 'root ::= "z"'}, "grammar", 'root ::= "z"'),
    ({"structured_outputs": {"grammar": 'root ::= "z"'}}, "grammar", 'root ::= "z"'),
])
def test_guided_decoding_forms(extra, field, value):
    assert getattr(chat(**extra), field) == value


def test_guided_decoding_overrides_response_format_and_rejects_two_kinds():
    req = chat(response_format={"type": "json_object"}, guided_choice=["a"])
    assert req.grammar == 'root ::= "a"\n'
    with pytest.raises(InvalidRequest, match="one kind"):
        chat(guided_choice=["a"], guided_regex="a")
    with pytest.raises(InvalidRequest, match="one kind"):
        chat(guided_json={}, structured_outputs={"regex": "a"})
    with pytest.raises(InvalidRequest, match="guided_json"):
        chat(guided_json="{not json")
    with pytest.raises(Unsupported, match="structural"):
        chat(structured_outputs={"structural_tag": "{}"})
    with pytest.raises(Unsupported) as info:
        chat(guided_regex=r"(?=x)")
    assert info.value.param == "guided_regex" and info.value.status == 400


def test_sampling_extras():
    req = chat(top_k=-1, min_p=0.1, repetition_penalty=1.2, ignore_eos=True,
               stop_token_ids=[7, 9], include_stop_str_in_output=True,
               skip_special_tokens=True)
    assert (req.top_k, req.min_p, req.repeat_penalty, req.ignore_eos) == (0, 0.1, 1.2, True)
    assert req.stop_token_ids == [7, 9] and req.include_stop_str_in_output
    with pytest.raises(InvalidRequest, match="stop_token_ids"):
        chat(stop_token_ids=["x"])


@pytest.mark.parametrize("extra,match", [
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"min_tokens": 3, "guided_choice": ["a", "b"]}, "min_tokens"),
    ({"min_tokens": 3, "response_format": {"type": "json_object"}}, "min_tokens"),
    ({"min_tokens": 3, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "min_tokens"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"echo": True}, "echo"),
    ({"allowed_token_ids": [28, 30]}, "allowed_token_ids"),  # refused, never ignored
    ({"bad_words": ["x"]}, "bad_words"),
    ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
])
def test_what_the_engine_cannot_do_is_a_400(extra, match):
    with pytest.raises(InvalidRequest, match=match) as info:
        chat(**extra)
    assert info.value.status == 400


def test_min_tokens_is_read():
    assert chat(min_tokens=3, max_tokens=5).min_tokens == 3
    assert chat(min_tokens=3).min_tokens == 3
    assert chat().min_tokens is None
    with pytest.raises(InvalidRequest, match="cannot be combined with a grammar"):
        chat(min_tokens=3, guided_json={"type": "object"})


def test_min_tokens_over_max_tokens_is_vllms_message():
    with pytest.raises(InvalidRequest, match="min_tokens must be less than or equal"):
        chat(min_tokens=10, max_tokens=5)


def test_zero_values_are_accepted():
    req = chat(min_tokens=0, prompt_logprobs=0, priority=3, guided_decoding_backend="xgrammar")
    assert req.grammar is None and req.json_schema is None


def test_reasoning_switches():
    assert chat(chat_template_kwargs={"enable_thinking": False}).reasoning is False
    assert chat(chat_template_kwargs={"enable_thinking": True}).reasoning is True
    assert chat(include_reasoning=False).reasoning is False
    assert chat(include_reasoning=True).reasoning is None
    req = openai_chat_to_internal({"model": "m", "messages": [
        {"role": "assistant", "content": "x", "reasoning_content": "thought"},
        {"role": "user", "content": "y"}]})
    assert req.messages[0].reasoning == "thought"


def test_completions_get_the_extras_too():
    req = openai_completion_to_internal({"model": "m", "prompt": "p", "guided_regex": "a+",
                                         "stop_token_ids": [1]})
    assert req.grammar == 'root ::= "a"+\n' and req.stop_token_ids == [1]


def test_tokenize_request_forms():
    tok = vllm_tokenize_request({"prompt": "hi"}, "default")
    assert (tok.model, tok.prompt, tok.chat, tok.add_special_tokens) == ("default", "hi", None,
                                                                         True)
    tok = vllm_tokenize_request({"model": "m", "messages": MSGS, "return_token_strs": True},
                                "default")
    assert tok.chat.messages[0].content == "hi" and tok.add_special_tokens is False
    assert tok.chat.add_generation_prompt and tok.return_token_strs
    with pytest.raises(InvalidRequest, match="continue_final_message"):
        vllm_tokenize_request({"messages": MSGS, "continue_final_message": True}, "d")
    with pytest.raises(InvalidRequest, match="prompt"):
        vllm_tokenize_request({"prompt": 5}, "d")


def test_tokenize_response():
    pieces = [{"id": 1, "piece": "He"}, {"id": 2, "piece": [0xC3, 0xA9]}]
    assert internal_to_vllm_tokenize(pieces, 8192, True) == {
        "count": 2, "max_model_len": 8192, "tokens": [1, 2], "token_strs": ["He", "é"]}
    assert internal_to_vllm_tokenize(pieces, 8192, False)["token_strs"] is None


def test_detokenize_tokens():
    assert vllm_detokenize_tokens({"tokens": [1, 2]}) == [1, 2]
    for bad in ({}, {"tokens": "x"}, {"tokens": [1, True]}):
        with pytest.raises(InvalidRequest):
            vllm_detokenize_tokens(bad)


def test_legacy_generate():
    req = vllm_generate_to_internal({"prompt": "p", "temperature": 0, "top_k": 3}, "m")
    assert (req.prompt, req.raw, req.max_tokens, req.top_k, req.model) == ("p", True, 16, 3,
                                                                          "m")
    with pytest.raises(InvalidRequest, match="prompt"):
        vllm_generate_to_internal({"prompt": ["a"]}, "m")
    stream = VLLMGenerateStream("p")
    assert stream.process(TextDelta("a")) == [{"text": ["pa"]}]
    assert stream.process(ReasoningDelta("b")) == [{"text": ["pab"]}]
    assert stream.process(TextDelta("")) == []
    assert stream.process(Finish("stop")) == []


def test_echo_with_logprobs_is_refused_not_answered_without_the_prompts():
    """Evaluation harnesses sum the prompt's log probabilities from echo + logprobs; the
    engine gives none for prompt tokens, so the request is a 400, never a partial answer."""
    body = {"model": "m", "prompt": "The sky is", "max_tokens": 1}
    with pytest.raises(Unsupported, match="echo") as info:
        openai_completion_to_internal({**body, "echo": True, "logprobs": 1})
    assert info.value.param == "echo"
    openai_completion_to_internal({**body, "echo": True})
    openai_completion_to_internal({**body, "logprobs": 1})


def test_stop_reason_names_the_stop_token_id():
    from ollama_server.adapters.openai import stop_reason

    assert stop_reason(Finish(reason="stop_sequence", stop_sequence=",", stop_token=28)) == 28
    assert stop_reason(Finish(reason="stop_sequence", stop_sequence=",")) == ","
    assert stop_reason(Finish(reason="stop")) is None
