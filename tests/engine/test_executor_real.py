"""LLAMAExecutor against the real llama-server binary and the real smollm2 model."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ollama_server.core.engine import EngineSettings, EngineState, LLAMAExecutor
from ollama_server.core.errors import ContextLengthExceeded, EngineFailed, InvalidRequest
from ollama_server.core.schemas import Finish, InternalRequest, Message, TextDelta
from ollama_server.models.store import ModelName, OllamaStore

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def smollm_path(real_models):
    store = OllamaStore(real_models)
    manifest = store.read_manifest(ModelName.parse("smollm2:135m").manifest_path(
        store.manifests_dir))
    return store.blob_path(store.layer(manifest, "model")["digest"])


@pytest.fixture
def engine(engine_binary, smollm_path):
    ex = LLAMAExecutor(smollm_path, EngineSettings(binary=engine_binary, parallel=2), 2048,
                       name="smollm2:135m")
    yield ex
    ex.stop()


def chat(text: str, **kw) -> InternalRequest:
    return InternalRequest(model="m", messages=[Message("user", text)], **kw)


def slots_busy(engine: LLAMAExecutor) -> bool:
    return any(s.get("is_processing") for s in engine.call_json("GET", "/slots"))


def test_start_stream_stop(engine):
    assert engine.state == EngineState.STOPPED
    load_s = engine.ensure_ready()
    assert load_s > 0 and engine.state == EngineState.READY and engine.pid
    assert engine.ensure_ready() == 0.0  # idempotent
    events = list(engine.open_stream(chat("Say hi", max_tokens=5, temperature=0)))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    finish = events[-1]
    assert text and isinstance(finish, Finish) and finish.reason == "length"
    assert finish.usage.completion_tokens == 5 and finish.usage.prompt_tokens > 5
    pid = engine.pid
    engine.stop()
    assert engine.state == EngineState.STOPPED and engine.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_raw_prompt_gives_engine_token_ids_and_logprobs(engine):
    engine.ensure_ready()
    req = InternalRequest(model="m", prompt="The capital of France is", max_tokens=4,
                          temperature=0, logprobs=True, top_logprobs=2)
    deltas = [e for e in engine.open_stream(req) if isinstance(e, TextDelta)]
    tokens = [t for d in deltas for t in d.tokens]
    assert len(tokens) == 4
    assert all(isinstance(t.id, int) and t.logprob <= 0 and len(t.top) == 2 for t in tokens)
    assert engine.detokenize([t.id for t in tokens]) == "".join(d.text for d in deltas)


def test_stop_word_is_reported(engine):
    engine.ensure_ready()
    events = list(engine.open_stream(InternalRequest(
        model="m", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 6"])))
    assert events[-1].reason == "stop_sequence" and events[-1].stop_sequence == " 6"


def test_prompt_over_context_raises_before_streaming(engine):
    engine.ensure_ready()
    with pytest.raises(ContextLengthExceeded) as err:
        engine.open_stream(chat("hello " * 3000, max_tokens=4))
    assert err.value.context_length == 2048 and err.value.prompt_tokens > 2048


def test_bad_grammar_is_invalid_request(engine):
    engine.ensure_ready()
    with pytest.raises(InvalidRequest):
        engine.open_stream(chat("x", max_tokens=2, grammar="root ::= ("))


def test_crash_is_detected_and_next_call_restarts(engine):
    engine.ensure_ready()
    stream = engine.open_stream(chat("Write a long story.", max_tokens=400))
    it = iter(stream)
    next(it)
    os.kill(engine.pid, signal.SIGKILL)
    with pytest.raises(EngineFailed, match="exited|lost|closed"):
        for _ in it:
            pass
    assert engine.state == EngineState.FAILED
    assert engine.ensure_ready() > 0 and engine.restarts == 1
    assert list(engine.open_stream(chat("hi", max_tokens=2)))[-1].usage.completion_tokens == 2


def test_closing_the_stream_stops_generation_in_the_engine(engine):
    engine.ensure_ready()
    stream = engine.open_stream(chat("Write a very long story.", max_tokens=3000,
                                     ignore_eos=True))
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert slots_busy(engine)
    stream.close()
    deadline = time.monotonic() + 5
    while slots_busy(engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not slots_busy(engine)


def test_startup_failure_reports_stderr(engine_binary, tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"\x00" * 64)
    ex = LLAMAExecutor(bogus, EngineSettings(binary=engine_binary, startup_timeout=60), 512)
    with pytest.raises(EngineFailed) as err:
        ex.ensure_ready()
    assert "exited with code" in err.value.message and "llama" in err.value.message.lower()
    assert ex.state == EngineState.FAILED
    ex.stop()


def test_tokenize_template_and_embeddings(engine):
    engine.ensure_ready()
    ids = engine.tokenize("Hello world")
    assert ids and all(isinstance(i, int) for i in ids)
    assert engine.detokenize(ids).strip() == "Hello world"
    pieces = engine.tokenize("Hello world", with_pieces=True)
    assert "".join(p["piece"] for p in pieces).strip() == "Hello world"
    prompt = engine.apply_template(chat("Hi there"))
    assert "<|im_start|>user\nHi there<|im_end|>" in prompt
    vectors, n = engine.embed(["one", "two"])
    assert len(vectors) == 2 and len(vectors[0]) == 576 and n > 0
    json.dumps(vectors)
