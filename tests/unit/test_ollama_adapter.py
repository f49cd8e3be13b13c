"""Pure tests of the Ollama translation (adapters/ollama.py) and model inspection."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ollama_server.adapters import ollama as ol
from ollama_server.core.errors import (
    ContextLengthExceeded,
    EngineFailed,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    Unsupported,
)
from ollama_server.core.schemas import (
    Finish,
    InternalRequest,
    ReasoningDelta,
    TextDelta,
    TokenInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ollama_server.models.modelfile import parse_modelfile, render_go_template
from ollama_server.models.schemas import ModelInfo


@pytest.mark.parametrize("value,seconds", [
    (None, None), (0, 0.0), (300, 300.0), (2.5, 2.5), ("10m", 600.0), ("1h30m", 5400.0),
    ("300", 300.0), ("45s", 45.0), ("500ms", 0.5), ("1.5h", 5400.0), ("0", 0.0),
    (-1, -1.0), ("-1", -1.0), ("-5m", -1.0), (-300, -1.0),
])
def test_keep_alive(value, seconds):
    assert ol.parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "10x", "m10", True, [], {}, "1h 30m", ""])
def test_keep_alive_rejects(value):
    with pytest.raises(InvalidRequest):
        ol.parse_keep_alive(value)


def test_options_mapping_and_unknown_keys():
    req = InternalRequest(model="m")
    ignored = ol.apply_options({"num_predict": 5, "num_ctx": 4096, "temperature": 0,
                                "top_k": 10, "top_p": 0.5, "min_p": 0.1, "typical_p": 0.9,
                                "repeat_penalty": 1.1, "repeat_last_n": 16, "seed": 3,
                                "presence_penalty": 0.2, "frequency_penalty": 0.4,
                                "stop": ["a", ""], "num_thread": 4, "num_gpu": 99,
                                "main_gpu": 0, "mirostat": 0, "whatever": 1,
                                "grammar": 'root ::= "x"'}, req)
    assert (req.max_tokens, req.num_ctx, req.temperature, req.top_k, req.top_p) == \
        (5, 4096, 0.0, 10, 0.5)
    assert (req.min_p, req.typical_p, req.repeat_penalty, req.repeat_last_n, req.seed) == \
        (0.1, 0.9, 1.1, 16, 3)
    assert (req.presence_penalty, req.frequency_penalty, req.stop) == (0.2, 0.4, ["a"])
    assert req.grammar == 'root ::= "x"'
    assert set(ignored) == {"num_thread", "num_gpu", "main_gpu", "mirostat", "whatever"}
    for unlimited in (-1, -2):
        req = InternalRequest(model="m", max_tokens=3)
        ol.apply_options({"num_predict": unlimited}, req)
        assert req.max_tokens is None


@pytest.mark.parametrize("options", [{"temperature": "x"}, {"num_predict": 1.5},
                                     {"stop": [1]}, {"seed": True}, "opts"])
def test_options_bad_types(options):
    with pytest.raises(InvalidRequest):
        ol.apply_options(options, InternalRequest(model="m"))


@pytest.mark.parametrize("value,expected", [
    (None, None), ("", None), ("json", {}), ({"type": "object"}, {"type": "object"}),
    ('{"type": "object"}', {"type": "object"}),
])
def test_format(value, expected):
    assert ol.parse_format(value) == expected


@pytest.mark.parametrize("value", ["xml", 3, ["json"]])
def test_format_rejects(value):
    with pytest.raises(InvalidRequest, match="invalid format"):
        ol.parse_format(value)


@pytest.mark.parametrize("value,expected", [(None, None), (True, True), (False, False),
                                            ("high", True), ("low", True)])
def test_think(value, expected):
    assert ol.parse_think(value) == expected


def test_think_rejects():
    with pytest.raises(InvalidRequest, match="invalid think value"):
        ol.parse_think("extreme")


def test_generate_chat_path_raw_path_and_template():
    req = ol.ollama_generate_to_internal({"model": "m", "prompt": "hi", "system": "s"}, True)
    assert req.is_chat and [(m.role, m.content) for m in req.messages] == [
        ("system", "s"), ("user", "hi")]
    assert req.stream is True and req.dialect == "ollama"
    base = ol.ollama_generate_to_internal({"model": "m", "prompt": "Once", "stream": False},
                                          False)
    assert not base.is_chat and base.prompt == "Once" and base.raw and not base.stream
    raw = ol.ollama_generate_to_internal({"model": "m", "prompt": "p", "raw": True}, True)
    assert raw.prompt == "p" and raw.raw
    fim = ol.ollama_generate_to_internal({"model": "m", "prompt": "def f(", "suffix": ")"},
                                         True)
    assert fim.prompt == "def f(" and fim.suffix == ")"
    tpl = ol.ollama_generate_to_internal({"model": "m", "prompt": "P", "template":
                                          "{{ if .System }}S{{ else }}N{{ end }}:{{ .Prompt }}"},
                                         True)
    assert tpl.prompt == "N:P"
    with pytest.raises(InvalidRequest, match="raw mode"):
        ol.ollama_generate_to_internal({"model": "m", "prompt": "p", "raw": True,
                                        "context": [1]}, True)
    with pytest.raises(InvalidRequest, match="model is required"):
        ol.ollama_generate_to_internal({"prompt": "p"}, True)
    think = ol.ollama_generate_to_internal({"model": "m", "prompt": "p", "think": True}, True)
    assert think.reasoning is True and think.chat_template_kwargs == {"enable_thinking": True}


@pytest.mark.parametrize("template,values,expected", [
    ("{{ .Prompt }}", {"Prompt": "p"}, "p"),
    ("{{ if .System }}<s>{{ .System }}</s>\n{{ end }}{{ .Prompt }}", {"System": "", "Prompt": "p"},
     "p"),
    ("A {{- .Prompt -}} B", {"Prompt": "p"}, "ApB"),
    ("{{ .Prompt }}{{ .Response }}tail", {"Prompt": "p"}, "p"),
    ("{{ if .System }}{{ if .Prompt }}both{{ end }}{{ end }}", {"System": "s", "Prompt": "p"},
     "both"),
])
def test_render_go_template(template, values, expected):
    assert render_go_template(template, values) == expected


def test_render_go_template_rejects_what_it_cannot_run():
    with pytest.raises(InvalidRequest):
        render_go_template("{{ range .Messages }}x{{ end }}", {})


def test_chat_messages_tools_images_and_load():
    req = ol.ollama_chat_to_internal({"model": "m", "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u", "images": ["aGk="]},
        {"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
            {"function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "42", "tool_name": "f"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}}}}]})
    msgs = req.messages
    assert msgs[1].images == ["aGk="] and msgs[2].reasoning == "hmm"
    assert json.loads(msgs[2].tool_calls[0].arguments) == {"x": 1}
    assert msgs[3].name == "f" and msgs[3].tool_call_id == msgs[2].tool_calls[0].id
    assert req.tools[0].name == "f"
    assert ol.is_load_request({"model": "m"}, chat=True)
    assert ol.is_load_request({"model": "m", "messages": []}, chat=True)
    assert not ol.is_load_request({"model": "m", "messages": [{}]}, chat=True)
    assert ol.is_load_request({"model": "m", "prompt": ""}, chat=False)
    for bad in ([{"role": "robot"}], [{"role": "user", "content": 3}], "hi",
                [{"role": "user", "images": "x"}]):
        with pytest.raises(InvalidRequest):
            ol.ollama_chat_to_internal({"model": "m", "messages": bad})


def clock_at(*values):
    it = iter(values)
    return lambda: next(it)


def test_generate_stream_objects_and_final_metrics():
    conv = ol.OllamaGenerateStream("m", started=10.0, clock=clock_at(12.5))
    out = conv.process(ReasoningDelta("r")) + conv.process(TextDelta("He")) + \
        conv.process(ToolCallDelta(0, "id", "f", "{}")) + conv.process(TextDelta("llo"))
    assert [o.get("thinking") for o in out] == ["r", None, None]
    assert [o["response"] for o in out] == ["", "He", "llo"]
    assert all(o["done"] is False and "total_duration" not in o for o in out)
    usage = Usage(prompt_tokens=7, completion_tokens=3, prompt_ms=12.5, predicted_ms=40.0,
                  load_ms=1000.0)
    final = conv.finish(Finish("length", usage), context=[1, 2])
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["total_duration"] == 2_500_000_000 and final["load_duration"] == 1_000_000_000
    assert final["prompt_eval_duration"] == 12_500_000 and final["eval_duration"] == 40_000_000
    assert (final["prompt_eval_count"], final["eval_count"]) == (7, 3)
    assert final["context"] == [1, 2] and final["response"] == ""
    whole = conv.whole(final)
    assert whole["response"] == "Hello" and whole["thinking"] == "r"
    assert list(whole)[:4] == ["model", "created_at", "response", "thinking"]
    assert conv.response_text == "<think>r</think>Hello"


@pytest.mark.parametrize("reason,done_reason", [("stop", "stop"), ("stop_sequence", "stop"),
                                                ("length", "length"), ("tool_calls", "stop")])
def test_done_reasons(reason, done_reason):
    conv = ol.OllamaChatStream("m", started=0.0, clock=lambda: 1.0)
    assert conv.process(Finish(reason))[-1]["done_reason"] == done_reason


def test_chat_stream_tool_calls_and_logprobs():
    conv = ol.OllamaChatStream("m", started=0.0, logprobs=True, clock=lambda: 1.0)
    tok = TokenInfo(id=1, text="a", logprob=-0.5, top=[("a", -0.5, 1), ("b", -1.0, 2)])
    first = conv.process(TextDelta("a", tokens=[tok]))[0]
    assert first["message"] == {"role": "assistant", "content": "a"}
    assert first["logprobs"][0]["token"] == "a" and len(first["logprobs"][0]["top_logprobs"]) == 2
    out = conv.process(Finish("tool_calls", tool_calls=[ToolCall("c1", "f", '{"q": "x"}'),
                                                         ToolCall("c2", "g", "not json")]))
    calls = out[0]["message"]["tool_calls"]
    assert calls[0] == {"id": "c1", "function": {"index": 0, "name": "f",
                                                 "arguments": {"q": "x"}}}
    assert calls[1]["function"]["arguments"] == {"arguments": "not json"}
    assert out[1]["done"] and out[1]["message"] == {"role": "assistant", "content": ""}
    whole = conv.whole(out[1])
    assert whole["message"]["content"] == "a" and len(whole["message"]["tool_calls"]) == 2
    assert whole["logprobs"][0]["logprob"] == -0.5


def test_load_response():
    assert ol.load_response("m", chat=False, unloaded=False)["done_reason"] == "load"
    body = ol.load_response("m", chat=True, unloaded=True)
    assert body["done_reason"] == "unload" and body["message"]["content"] == ""


def info(**kw) -> ModelInfo:
    base = dict(name="smollm2:135m", path=Path("/b/sha256-x"), source="ollama", digest="d" * 64,
                size=10, modified_at=1_700_000_000.0, architecture="llama",
                context_length=8192, parameter_count=134_515_008, quantization_level="Q4_1",
                metadata={"general.architecture": "llama", "llama.context_length": 8192},
                params={"stop": ["<|im_end|>", "<|endoftext|>"], "temperature": 0.2})
    base.update(kw)
    return ModelInfo(**base)


def test_show_body():
    body = ol.show_body(info(system="Be kind."))
    assert body["model_info"]["llama.context_length"] == 8192
    assert body["model_info"]["general.parameter_count"] == 134_515_008
    assert body["parameters"].splitlines() == [
        'stop                           "<|im_end|>"',
        'stop                           "<|endoftext|>"',
        "temperature                    0.2"]
    assert body["modelfile"].splitlines()[:5] == [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        "# FROM smollm2:135m", "", "FROM /b/sha256-x"]
    assert 'PARAMETER stop "<|im_end|>"' in body["modelfile"]
    assert body["system"] == "Be kind." and body["template"] == "{{ .Prompt }}"
    assert body["details"]["quantization_level"] == "Q4_1"
    # inspection fills only what the store lacks; never the header's numbers
    enriched = ol.show_body(info(params={}), {"template": "{{ .Prompt }}!", "system": "x",
                                              "parameters": {"num_ctx": 2}})
    assert enriched["template"] == "{{ .Prompt }}!" and enriched["system"] == "x"
    assert enriched["model_info"]["llama.context_length"] == 8192


def test_tags_ps_and_models_bodies():
    tags = ol.tags_body([info()])["models"][0]
    assert set(tags) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert ol.models_body([info()])["models"][0]["context_size"] == 8192

    class Entry:
        def __init__(self, expires_at, keep_alive):
            self.info, self.expires_at, self.keep_alive, self.ctx_size = \
                info(), expires_at, keep_alive, 4096

    body = ol.ps_body([Entry(110.0, 300), Entry(None, -1)], now_wall=1_700_000_000.0,
                      now_mono=100.0)
    first, forever = body["models"]
    assert first["context_length"] == 4096 and first["size_vram"] == 0
    assert first["expires_at"].startswith(ol.rfc3339_local(1_700_000_010.0)[:19])
    assert forever["expires_at"] > first["expires_at"]


def test_parse_modelfile():
    parsed = parse_modelfile('# c\nFROM @sha256:abc\nPARAMETER temperature 0.3\n'
                                'PARAMETER stop "<|im_end|>"\nPARAMETER stop </s>\n'
                                'SYSTEM """two\nlines"""\nTEMPLATE "{{ .Prompt }}"\n'
                                'LICENSE MIT\nMESSAGE user hello there\n')
    assert parsed["from"] == "@sha256:abc"
    assert parsed["parameters"] == {"temperature": 0.3, "stop": ["<|im_end|>", "</s>"]}
    assert parsed["system"] == "two\nlines" and parsed["template"] == "{{ .Prompt }}"
    assert parsed["license"] == ["MIT"]
    assert parsed["messages"] == [{"role": "user", "content": "hello there"}]
    for bad in ("PARAMETER nope 1", "PARAMETER num_ctx big", "ADAPTER x", "WHAT x",
                'SYSTEM """open'):
        with pytest.raises(InvalidRequest):
            parse_modelfile(bad)


@pytest.mark.parametrize("exc,status,message", [
    (ModelNotFound("x"), 404, "model 'x' not found"),
    (InvalidRequest("bad"), 400, "bad"),
    (Unsupported("no images"), 400, "no images"),
    (ContextLengthExceeded(10, 5), 400, None),
    (NotFound("gone"), 404, "gone"),
    (Overloaded("busy"), 503, "busy"),
    (EngineFailed("boom"), 500, "boom"),
])
def test_errors(exc, status, message):
    body, got = ol.ollama_error(exc)
    assert got == status and set(body) == {"error"} and isinstance(body["error"], str)
    if message:
        assert body["error"] == message


def test_embed_helpers():
    assert ol.ollama_embed_inputs({"input": "a"}) == ["a"]
    assert ol.ollama_embed_inputs({"input": ["a", "b"]}) == ["a", "b"]
    with pytest.raises(InvalidRequest):
        ol.ollama_embed_inputs({"input": [1]})
    assert ol.normalize([3.0, 4.0]) == [0.6, 0.8]
    assert ol.normalize([3.0, 4.0, 12.0], dims=2) == [0.6, 0.8]


def test_model_inspection_with_a_real_cli(tmp_path, monkeypatch):
    """A stand-in ``ollama`` executable (a real subprocess) answers ``show --modelfile``."""
    from ollama_server.models import inspection as mi

    exe = tmp_path / "ollama"
    exe.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show --modelfile' ] || exit 1\n"
                   "printf 'FROM /x\\nTEMPLATE \"\"\"{{ .Prompt }}\"\"\"\\n"
                   "PARAMETER num_ctx 999\\nSYSTEM hi\\n'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    mi.clear_cache()
    got = mi.inspect_model("m:1", "d", enabled=True, own_port=11435)
    assert got == {"template": "{{ .Prompt }}", "system": "hi", "parameters": {"num_ctx": 999}}
    mi.clear_cache()
    assert mi.inspect_model("m:1", "d", enabled=False) == {}
    # Asking the CLI would ask this very service: skipped.
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:11435")
    assert mi.inspect_model("m:1", "d", enabled=True, own_port=11435) == {}
    mi.clear_cache()
