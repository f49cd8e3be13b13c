"""Hypothesis strategies for request bodies of every dialect (issue 12's fuzzer).

Each endpoint's generator follows that API's request schema: every field of the schema may be
present or absent, and each value is usually of the right kind (small, so that generations stay
short) but sometimes anything at all: wrong types, lone surrogates, NaN and infinities, numbers
far outside every range, deep nesting, path-like model names. A few bodies are broken as text
(cut short, not UTF-8, nested a hundred thousand deep, not an object).

``Case`` is what the fuzz test sends: a method, a path, the raw body bytes, and the dialect
whose error shape the answer must have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import strategies as st

# The bigger model now and then only: generations on it are slower.
MODELS = ["smollm2:135m", "smollm2", "SmolLM2:135M", "registry.ollama.ai/library/smollm2:135m",
          "smollm2:135m", "smollm2", "smollm2:135m", "smollm2", "gemma3:270m"]
BIG_LITERAL = "__1e999__"  # replaced by the JSON number 1e999 (a double overflows to inf)
LONG_TEXT = "word " * 1500  # past the engines' 512-token embedding batch


@dataclass
class Case:
    """One request of the fuzzer."""

    method: str
    path: str
    body: bytes
    dialect: str  # openai | anthropic | ollama | tgi
    label: str  # the endpoint, for the report

    def __repr__(self) -> str:
        return f"Case({self.method} {self.path} {self.body[:600]!r})"


# --- values ------------------------------------------------------------------------------------

nasty_text = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800", "😀", "\x00\x01", "{{ raise }}",
                     "<|im_start|>system\n", "</s>", "\\u0000", "%s%n", "../../etc/passwd",
                     "sha256:" + "0" * 64, LONG_TEXT]),
)
nasty_number = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, -2, 1, 2**31 - 1, 2**31, 2**32, 2**63, -(2**63) - 1, 1e-45,
                     3.5e38, 1e308, -0.0, BIG_LITERAL]),
)
scalar = st.one_of(st.none(), st.booleans(), nasty_number, nasty_text)
anything = st.recursive(
    scalar, lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)


def v(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``valid``, sometimes anything at all."""
    return st.one_of(valid, valid, valid, anything)


def body(required: dict[str, st.SearchStrategy] | None = None,
         **fields: st.SearchStrategy) -> st.SearchStrategy:
    """A JSON object of the schema: half the time well-formed (``required`` keys present, each
    optional key present or not), half the time any key may be missing or hold anything."""
    required = required or {}
    valid = st.fixed_dictionaries(required, optional=fields)
    mixed = st.fixed_dictionaries(
        {}, optional={k: v(s) for k, s in {**required, **fields}.items()})
    return st.one_of(valid, mixed)


def small_int(lo: int = 0, hi: int = 8) -> st.SearchStrategy:
    return st.integers(min_value=lo, max_value=hi)


def unit_float(hi: float = 1.0) -> st.SearchStrategy:
    return st.floats(min_value=0, max_value=hi, allow_nan=False)


text = st.text(max_size=30)
model = st.sampled_from(MODELS)
stop = st.one_of(text, st.lists(text, max_size=3))
tokens = st.lists(st.integers(min_value=-5, max_value=60_000), max_size=6)
schema = st.one_of(st.just({"type": "object"}),
                   st.just({"type": "object", "properties": {"a": {"type": "string"}},
                            "required": ["a"]}),
                   st.dictionaries(st.sampled_from(["type", "properties", "items", "enum",
                                                    "required", "$ref", "pattern"]),
                                   anything, max_size=3))
tool = st.fixed_dictionaries({"type": st.just("function"), "function": body(
    {"name": st.sampled_from(["get_weather", "x"])}, description=text, parameters=schema)})
image_url = st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,!!",
                             "http://127.0.0.1:1/x.png", "file:///etc/passwd"])

# --- OpenAI --------------------------------------------------------------------------------------

oa_part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                    st.fixed_dictionaries({"type": st.just("image_url"),
                                           "image_url": st.fixed_dictionaries({"url": image_url})}))
oa_message = body({"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
                   "content": st.one_of(text, st.lists(oa_part, max_size=2))},
                  name=text, tool_call_id=text,
                  tool_calls=st.lists(st.fixed_dictionaries({
                      "id": text, "type": st.just("function"),
                      "function": body(name=text, arguments=st.just('{"a": 1}') | text)}),
                      max_size=1))
oa_common = dict(
    max_tokens=small_int(1), temperature=unit_float(2), top_p=unit_float(),
    n=st.just(1), stop=stop, seed=st.integers(-(2**63), 2**63), stream=st.booleans(),
    stream_options=body(include_usage=st.booleans()), presence_penalty=unit_float(2),
    frequency_penalty=unit_float(2), logit_bias=st.dictionaries(
        st.integers(-1, 60_000).map(str), st.floats(-100, 100), max_size=2),
    user=text, top_k=st.integers(-1, 100), min_p=unit_float(), repetition_penalty=unit_float(2),
    min_tokens=small_int(0, 4), stop_token_ids=tokens, ignore_eos=st.booleans(),
    include_stop_str_in_output=st.booleans())
openai_chat = body(
    {"model": model, "messages": st.lists(oa_message, min_size=1, max_size=3)},
    max_completion_tokens=small_int(1),
    logprobs=st.booleans(), top_logprobs=small_int(0, 20), tools=st.lists(tool, max_size=2),
    tool_choice=st.sampled_from(["auto", "none", "required"]), parallel_tool_calls=st.booleans(),
    response_format=st.one_of(st.just({"type": "json_object"}), st.fixed_dictionaries(
        {"type": st.just("json_schema"), "json_schema": body(name=text, schema=schema)})),
    reasoning_effort=st.sampled_from(["low", "high"]), chat_template_kwargs=anything,
    continue_final_message=st.booleans(), add_generation_prompt=st.booleans(), **oa_common)
openai_completion = body(
    {"model": model, "prompt": st.one_of(text, st.lists(text, max_size=2), tokens,
                                         st.lists(tokens, max_size=2))},
    suffix=text, echo=st.booleans(), logprobs=small_int(0, 5), best_of=st.just(1),
    **oa_common)
openai_embeddings = body({"model": model, "input": st.one_of(
    nasty_text, st.lists(nasty_text, max_size=3), tokens, st.lists(tokens, max_size=2))},
    encoding_format=st.sampled_from(["float", "base64"]), dimensions=small_int(1, 600))
responses = body(
    {"model": model, "input": st.one_of(text, st.lists(body({
        "role": st.sampled_from(["user", "assistant", "system", "developer"]),
        "content": st.one_of(text, st.lists(st.fixed_dictionaries(
            {"type": st.just("input_text"), "text": text}), max_size=2))}), max_size=2))},
    instructions=text, max_output_tokens=small_int(1), temperature=unit_float(2),
    top_p=unit_float(), stream=st.booleans(), tools=st.lists(st.fixed_dictionaries(
        {"type": st.just("function"), "name": text, "parameters": schema}), max_size=1),
    text=st.fixed_dictionaries({"format": st.one_of(st.just({"type": "text"}),
                                                    st.just({"type": "json_object"}))}),
    reasoning=body(effort=st.sampled_from(["low", "high"])), store=st.booleans(),
    top_logprobs=small_int(0, 20), seed=st.integers())

# --- Anthropic ------------------------------------------------------------------------------------

claude_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("image"), "source": body(
        type=st.just("base64"), media_type=st.just("image/png"), data=st.just("iVBORw0KGgo="))}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": text, "name": text,
                           "input": anything}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": text,
                           "content": text}),
    st.fixed_dictionaries({"type": st.just("thinking"), "thinking": text,
                           "signature": text}))
anthropic_messages = body(
    {"model": model, "max_tokens": small_int(1),
     "messages": st.lists(body({"role": st.sampled_from(["user", "assistant"]),
                                "content": st.one_of(text, st.lists(claude_block, max_size=2))}),
                          min_size=1, max_size=3)},
    system=st.one_of(text, st.lists(claude_block, max_size=1)), temperature=unit_float(),
    top_p=unit_float(), top_k=small_int(0, 50), stop_sequences=st.lists(text, max_size=2),
    stream=st.booleans(), tools=st.lists(body(name=text, description=text,
                                              input_schema=schema), max_size=2),
    tool_choice=body(type=st.sampled_from(["auto", "any", "tool", "none"]), name=text),
    thinking=body(type=st.sampled_from(["enabled", "disabled"]),
                  budget_tokens=st.integers(0, 2048)),
    metadata=body(user_id=text), service_tier=st.sampled_from(["auto", "standard_only"]))

# --- Ollama ------------------------------------------------------------------------------------

options = body(num_predict=st.integers(-2, 8), temperature=unit_float(2), top_k=small_int(0, 50),
               top_p=unit_float(), min_p=unit_float(), typical_p=unit_float(),
               seed=st.integers(-(2**40), 2**40), num_ctx=st.integers(0, 4096),
               repeat_last_n=st.integers(-2, 128), repeat_penalty=unit_float(2),
               presence_penalty=unit_float(2), frequency_penalty=unit_float(2), stop=stop,
               num_keep=small_int(), num_batch=small_int(1, 512), num_gpu=small_int(),
               num_thread=small_int(), use_mmap=st.booleans())
keep_alive = st.sampled_from(["5m", "1h", "-1", -1, 600, "forever", "1e9h", "-5m"])
fmt = st.one_of(st.just("json"), schema, st.just(""))
ollama_chat = body(
    {"model": model}, stream=st.booleans(), format=fmt, options=options, keep_alive=keep_alive,
    think=st.one_of(st.booleans(), st.sampled_from(["low", "high"])),
    tools=st.lists(tool, max_size=2), logprobs=st.booleans(), top_logprobs=small_int(0, 20),
    messages=st.lists(body({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                            "content": text}, images=st.lists(st.just("iVBORw0KGgo="), max_size=1),
                           thinking=text, tool_name=text,
                           tool_calls=st.lists(st.fixed_dictionaries({"function": body(
                               name=text, arguments=anything)}), max_size=1)),
                      min_size=1, max_size=3))
ollama_generate = body(
    {"model": model, "prompt": text}, suffix=text, system=text, template=text, context=tokens,
    raw=st.booleans(), images=st.lists(st.just("iVBORw0KGgo="), max_size=1), format=fmt,
    options=options, stream=st.booleans(), keep_alive=keep_alive, think=st.booleans())
ollama_embed = body({"model": model}, input=st.one_of(nasty_text, st.lists(nasty_text, max_size=3)),
                    truncate=st.booleans(), dimensions=small_int(1, 600), options=options,
                    keep_alive=keep_alive)
ollama_embeddings = body({"model": model}, prompt=nasty_text, options=options)
ollama_show = body({"model": model}, name=model, verbose=st.booleans())
ollama_copy = body(source=model, destination=st.one_of(
    st.sampled_from(["fuzz-copy", "ns/fuzz:tag", "../escape", "a/b/c/d", "x:" + "y" * 300]),
    text))
ollama_create = body(
    model=st.sampled_from(["fuzz-made", "ns/fuzz-made:v1", "../../etc", "CON"]),
    stream=st.booleans(), system=text, template=text, license=st.one_of(text, st.lists(text)),
    parameters=body(temperature=unit_float(), num_ctx=st.integers(1, 9000), stop=stop,
                    seed=st.integers()),
    messages=st.lists(body(role=st.sampled_from(["user", "assistant"]), content=text),
                      max_size=2),
    quantize=st.sampled_from(["q4_K_M", "q8_0"]),
    **{"from": model},
    files=st.dictionaries(text, st.sampled_from(["sha256:" + "0" * 64, "sha256:../x"]),
                          max_size=1))

# --- TGI and vLLM ------------------------------------------------------------------------------

tgi_parameters = body(
    max_new_tokens=small_int(1), temperature=st.floats(0.01, 2), top_k=small_int(1, 50),
    top_p=st.floats(0.01, 0.99), typical_p=st.floats(0.01, 0.99),
    repetition_penalty=st.floats(0.01, 2), frequency_penalty=unit_float(2),
    do_sample=st.booleans(), seed=st.integers(0, 2**64), stop=st.lists(text, max_size=2),
    details=st.booleans(), decoder_input_details=st.booleans(), return_full_text=st.booleans(),
    truncate=small_int(1, 64), top_n_tokens=small_int(0, 5), best_of=st.just(1),
    watermark=st.booleans(), grammar=st.one_of(
        st.fixed_dictionaries({"type": st.just("json"), "value": schema}),
        st.fixed_dictionaries({"type": st.just("regex"), "value": st.sampled_from(
            ["[a-z]+", "(", "a{1,3}b", "\\d{3}"])})))
tgi_generate = body({"inputs": st.one_of(text, text, text, nasty_text)},
                    parameters=tgi_parameters, stream=st.booleans())
vllm_tokenize = body(model=model, prompt=nasty_text, messages=st.lists(oa_message, max_size=2),
                     add_special_tokens=st.booleans(), add_generation_prompt=st.booleans(),
                     return_token_strs=st.booleans())
vllm_detokenize = body({"tokens": tokens}, model=model)
vllm_generate = body({"prompt": text}, max_tokens=small_int(1), stream=st.booleans(),
                     temperature=unit_float(), model=model)

# --- endpoints ----------------------------------------------------------------------------------

ENDPOINTS: list[tuple[str, str, str, st.SearchStrategy]] = [
    ("POST", "/v1/chat/completions", "openai", openai_chat),
    ("POST", "/chat/completions", "openai", openai_chat),
    ("POST", "/v1/completions", "openai", openai_completion),
    ("POST", "/v1/embeddings", "openai", openai_embeddings),
    ("POST", "/v1/responses", "openai", responses),
    ("POST", "/v1/messages", "anthropic", anthropic_messages),
    ("POST", "/v1/messages/count_tokens", "anthropic", anthropic_messages),
    ("POST", "/api/chat", "ollama", ollama_chat),
    ("POST", "/api/generate", "ollama", ollama_generate),
    ("POST", "/api/embed", "ollama", ollama_embed),
    ("POST", "/api/embeddings", "ollama", ollama_embeddings),
    ("POST", "/api/show", "ollama", ollama_show),
    ("POST", "/api/copy", "ollama", ollama_copy),
    ("POST", "/api/create", "ollama", ollama_create),
    ("POST", "/generate", "tgi", tgi_generate),
    ("POST", "/generate_stream", "tgi", tgi_generate),
    ("POST", "/", "tgi", tgi_generate),
    ("POST", "/tokenize", "tgi", st.one_of(tgi_generate, vllm_tokenize)),
    ("POST", "/detokenize", "openai", vllm_detokenize),
    ("POST", "/generate", "openai", vllm_generate),
]

# Bodies broken as text, whatever the endpoint.
BROKEN = st.sampled_from([
    b"", b"   ", b"{", b'{"model": "smollm2:135m", "messages": [', b"[]", b'"text"', b"null",
    b"\xff\xfe\x00{", b'{"model": "\xc3\x28"}', b"{" * 100_000, b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}", b'{"model": NaN}', b'{"model": 1e999}',
    b'{"model": "smollm2:135m", "prompt": "x", "stream": false, "options": {"seed": '
    + b"9" * 5000 + b"}}",
])


def encode(obj: object, ascii_only: bool) -> bytes:
    """JSON bytes as a careless client writes them: NaN/Infinity allowed, 1e999 spelled out,
    lone surrogates escaped (ASCII) or raw (then the bytes are not valid UTF-8)."""
    text = json.dumps(obj, allow_nan=True, ensure_ascii=ascii_only)
    text = text.replace(json.dumps(BIG_LITERAL), "1e999")
    return text.encode("utf-8", "surrogatepass")


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """One request: an endpoint, and a body from its schema (or a broken one)."""
    method, path, dialect, strategy = draw(st.sampled_from(ENDPOINTS))
    if draw(st.integers(0, 19)) == 0:
        raw = draw(BROKEN)
    else:
        raw = encode(draw(strategy), ascii_only=draw(st.integers(0, 9)) > 0)
    return Case(method, path, raw, dialect, f"{method} {path}")
