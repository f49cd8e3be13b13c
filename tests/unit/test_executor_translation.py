"""Pure tests of the executor's translation to and from llama-server's JSON."""

from __future__ import annotations

import json
import time

import pytest

from ollama_server.core.engine import EngineSettings, LLAMAExecutor
from ollama_server.core.engine.parse import ChatChunkParser, CompletionChunkParser, engine_error
from ollama_server.core.engine.payload import build_chat_payload, build_completion_payload
from ollama_server.core.errors import (
    ContextLengthExceeded,
    EngineFailed,
    InvalidRequest,
    Overloaded,
    Unsupported,
)
from ollama_server.core.schemas import (
    Finish,
    InternalRequest,
    Message,
    PromptInfo,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
)


def test_chat_payload_maps_every_field():
    req = InternalRequest(model="m", messages=[
        Message("system", "s"), Message("user", "hi", images=["AAAA"]),
        Message("assistant", "", tool_calls=[ToolCall("call_1", "f", '{"a":1}')]),
        Message("tool", "42", tool_call_id="call_1", name="f")],
        max_tokens=7, temperature=0.1, top_k=5, seed=3, stop=["x"], json_schema={},
        tools=[Tool("f", "d", {"type": "object"})], tool_choice={"name": "f"},
        logprobs=True, top_logprobs=2)
    p = build_chat_payload(req)
    assert p["stream"] is True and p["stream_options"] == {"include_usage": True}
    assert p["n_predict"] == 7 and p["temperature"] == 0.1 and p["top_k"] == 5
    assert p["seed"] == 3 and p["stop"] == ["x"]
    assert p["json_schema"] == {"type": "object"}
    assert p["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png")
    assert p["messages"][2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a":1}'}
    assert p["messages"][3]["tool_call_id"] == "call_1"
    assert p["tool_choice"] == "required"  # a named tool: only it is offered, and required
    assert [t["function"]["name"] for t in p["tools"]] == ["f"]
    assert p["logprobs"] is True and p["top_logprobs"] == 2
    assert p["reasoning_format"] == "none"
    assert "top_p" not in p  # unset fields are left to the model


def test_completion_payload_and_infill():
    path, p = build_completion_payload(InternalRequest(model="m", prompt=[1, 2, 3]))
    assert path == "/completion" and p["prompt"] == [1, 2, 3] and p["n_predict"] == -1
    path, p = build_completion_payload(InternalRequest(model="m", prompt="def f(", suffix=")"))
    assert path == "/infill" and p["input_prefix"] == "def f(" and p["input_suffix"] == ")"


def test_chat_parser_text_tools_usage_and_stop_word():
    parser = ChatChunkParser()
    events = []
    for chunk in [
        {"choices": [{"delta": {"role": "assistant", "content": None}}]},
        {"choices": [{"delta": {"content": "Hi"}}]},
        {"choices": [{"delta": {"tool_calls": [{
            "index": 0, "id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{\"a\""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}],
         "__verbose": {"stop_type": "word", "stopping_word": "END"}},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3,
                                  "prompt_tokens_details": {"cached_tokens": 4}},
         "timings": {"prompt_ms": 1.5, "predicted_ms": 9.0}},
    ]:
        events += parser.process(chunk)
    assert events[0] == TextDelta("Hi")
    assert events[1] == ToolCallDelta(0, "c1", "f", '{"a"')
    assert events[2] == ToolCallDelta(0, None, None, ":1}")
    finish = events[3]
    assert isinstance(finish, Finish) and finish.reason == "stop_sequence"
    assert finish.stop_sequence == "END"
    assert finish.tool_calls == [ToolCall("c1", "f", '{"a":1}')]
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens,
            finish.usage.cached_tokens, finish.usage.prompt_ms) == (9, 3, 4, 1.5)


@pytest.mark.parametrize("reason,stop_type,word,expected", [
    ("stop", "eos", "", "stop"), ("length", "limit", "", "length"),
    ("tool_calls", "eos", "", "tool_calls"), ("stop", "word", "###", "stop_sequence")])
def test_chat_finish_reasons(reason, stop_type, word, expected):
    parser = ChatChunkParser()
    parser.process({"choices": [{"delta": {}, "finish_reason": reason}],
                    "__verbose": {"stop_type": stop_type, "stopping_word": word}})
    (finish,) = parser.process({"choices": [], "usage": {"prompt_tokens": 1,
                                                         "completion_tokens": 1}})
    assert finish.reason == expected


def test_completion_parser_tokens_and_logprobs():
    parser = CompletionChunkParser()
    prompt, delta = parser.process({"content": " a", "tokens": [253], "stop": False,
                                    "tokens_evaluated": 3,
                               "completion_probabilities": [
                                   {"id": 253, "token": " a", "logprob": -1.0, "bytes": [32, 97],
                                    "top_logprobs": [{"id": 253, "token": " a", "logprob": -1.0},
                                                     {"id": 9, "token": " b",
                                                      "logprob": -2.0}]}]})
    assert prompt == PromptInfo(3)  # once, before the first text
    assert delta.tokens[0].id == 253 and delta.tokens[0].logprob == -1.0
    assert delta.tokens[0].top == [(" a", -1.0, 253), (" b", -2.0, 9)]
    (plain,) = parser.process({"content": "xy", "tokens": [1, 2], "stop": False})
    assert [t.id for t in plain.tokens] == [1, 2] and plain.tokens[-1].text == "xy"
    (finish,) = parser.process({"content": "", "stop": True, "stop_type": "limit",
                                "tokens_predicted": 2, "tokens_evaluated": 3,
                                "timings": {"cache_n": 1}})
    assert finish.reason == "length" and finish.usage.prompt_tokens == 3


def test_engine_errors_map_by_type():
    ctx = engine_error(400, json.dumps({"error": {"type": "exceed_context_size_error",
                                                  "message": "x", "n_prompt_tokens": 9000,
                                                  "n_ctx": 8192}}))
    assert isinstance(ctx, ContextLengthExceeded)
    assert "9000" in ctx.message and "8192" in ctx.message
    assert isinstance(engine_error(400, '{"error":{"type":"invalid_request_error",'
                                        '"message":"bad grammar"}}'), InvalidRequest)
    assert isinstance(engine_error(501, '{"error":{"type":"not_supported_error"}}'), Unsupported)
    assert isinstance(engine_error(503, "loading"), Overloaded)
    failed = engine_error(500, "boom", tail="ggml: out of memory")
    assert isinstance(failed, EngineFailed) and "out of memory" in failed.message
    # The shared KV cache full with the requests in progress: busy (503, retry), not broken.
    full = engine_error(500, '{"error":{"code":500,"message":"Context size has been exceeded.",'
                             '"type":"server_error"}}')
    assert isinstance(full, Overloaded) and full.status == 503 and full.retry_after == 2
    assert "kv_pool_size" in full.message


def test_command_line_carries_model_flags(tmp_path):
    settings = EngineSettings(binary=tmp_path / "llama-server", threads=3, batch_size=256,
                              gpu_layers=99, tensor_split=[3, 1], parallel=8)
    cmd = LLAMAExecutor(tmp_path / "m.gguf", settings, 4096).command(1234)
    joined = " ".join(cmd)
    for flag in ("-c 4096", "--parallel 8", "--threads 3", "-b 256", "-ngl 99",
                 "--tensor-split 3,1", "--jinja", "--port 1234", "--host 127.0.0.1"):
        assert flag in joined


def test_chat_parser_strips_an_echoed_assistant_prefill():
    parser = ChatChunkParser(prefill='{"name":')
    out = []
    for piece in ['{"na', 'me": "', "Mike", '"}']:
        out += parser.process({"choices": [{"delta": {"content": piece}}]})
    assert "".join(e.text for e in out) == ' "Mike"}'
    other = ChatChunkParser(prefill="Sure")
    (delta,) = other.process({"choices": [{"delta": {"content": "No echo here"}}]})
    assert delta.text == "No echo here"


def test_chat_parser_reports_the_prompt_size_once_from_the_first_timings():
    parser = ChatChunkParser()
    first = parser.process({"choices": [{"delta": {"content": "Hi"}}],
                            "timings": {"prompt_n": 5, "cache_n": 20, "predicted_n": 1}})
    assert first == [PromptInfo(25, 20), TextDelta("Hi")]
    again = parser.process({"choices": [{"delta": {"content": "!"}}],
                            "timings": {"prompt_n": 5, "cache_n": 20, "predicted_n": 2}})
    assert again == [TextDelta("!")]


def test_engine_log_is_kept_in_blocks_with_its_error_lines(tmp_path):
    """The stderr reader keeps the last lines and every error line, whether a block is read
    line by line (while starting) or at once (when ready), and a last line with no newline."""
    import os
    import subprocess
    import sys
    import threading

    from ollama_server.core.engine import EngineState, LLAMAExecutor

    ex = LLAMAExecutor(tmp_path / "m.gguf", EngineSettings(binary=tmp_path / "llama-server"), 512)
    info = "".join(f"0.01.869.{i:03d} I slot process_sing: id {i} | saving idle slot\n"
                   for i in range(300))
    script = ("import sys, time; w = sys.stderr.write; f = sys.stderr.flush\n"
              f"w({info!r}); f(); time.sleep(0.3)\n"
              "w('0.02.000.000 E failed to allocate buffer of 9 MiB\\n'); f(); time.sleep(0.3)\n"
              "w('last words without a newline')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ex._state = EngineState.READY  # the fast path: blocks with no error word are not split
    reader = threading.Thread(target=ex._read_stderr, args=(proc,))
    reader.start()
    reader.join(timeout=30)
    proc.wait(timeout=30)
    assert not reader.is_alive()
    assert list(ex._errors) == ["0.02.000.000 E failed to allocate buffer of 9 MiB"]
    assert ex._stderr[-1] == "last words without a newline"
    assert ex._stderr[-3].endswith("id 299 | saving idle slot")
    assert ex.stderr_tail() == "failed to allocate buffer of 9 MiB"


def test_logprobs_without_alternatives_still_ask_the_engine_for_probabilities():
    """llama-server computes no probabilities with top_logprobs 0: the payload asks for one
    alternative and the parser drops it, so each token has its logprob and no alternatives."""
    req = InternalRequest(model="m", messages=[Message("user", "hi")], logprobs=True)
    p = build_chat_payload(req)
    assert p["logprobs"] is True and p["top_logprobs"] == 1
    chunk = {"choices": [{"delta": {"content": "Hi"}, "logprobs": {"content": [
        {"id": 5, "token": "Hi", "logprob": -0.5, "bytes": [72, 105],
         "top_logprobs": [{"id": 5, "token": "Hi", "logprob": -0.5}]}]}}]}
    (event,) = ChatChunkParser(top_n=0).process(chunk)
    assert event.tokens[0].logprob == -0.5 and event.tokens[0].top == []
    (event,) = ChatChunkParser(top_n=3).process(chunk)
    assert event.tokens[0].top == [("Hi", -0.5, 5)]
    assert build_chat_payload(InternalRequest(model="m", messages=[Message("user", "hi")],
                                              logprobs=True, top_logprobs=4))["top_logprobs"] == 4


def test_a_context_that_filled_up_is_a_length_stop_marked_context_full():
    def finish(verbose):
        parser = ChatChunkParser()
        parser.process({"choices": [{"delta": {}, "finish_reason": "length"}],
                        "__verbose": verbose})
        (event,) = parser.process({"choices": [], "usage": {"prompt_tokens": 501,
                                                            "completion_tokens": 11}})
        return event
    full = finish({"stop_type": "limit", "truncated": True})
    assert full.reason == "length" and full.context_full
    limit = finish({"stop_type": "limit", "truncated": False})
    assert limit.reason == "length" and not limit.context_full


def test_an_engine_out_of_memory_is_named_so_even_when_its_log_is_read_late(tmp_path,
                                                                           monkeypatch):
    """A loading engine that runs out of memory prints hundreds of lines and then the
    allocation that failed, and exits at once. On a loaded machine its log reader runs
    behind the exit: the exit must still be judged on every line it wrote (Ollama's "model
    requires more system memory"), not reported as a plain crash."""
    import stat

    from ollama_server.core.engine import EngineState, LLAMAExecutor
    from ollama_server.core.errors import InsufficientMemory

    binary = tmp_path / "llama-server"
    binary.write_text(
        "#!/bin/sh\n"
        "i=0; while [ $i -lt 400 ]; do echo \"load_tensors: layer $i assigned to CPU\" >&2; "
        "i=$((i+1)); done\n"
        "echo 'ggml_aligned_malloc: insufficient memory (attempted to allocate 358400.00 MB)'"
        " >&2\n"
        "echo 'llama_init_from_model: failed to initialize the context: failed to allocate "
        "buffer for kv cache' >&2\n"
        "exit 1\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    take = LLAMAExecutor._take_lines

    def starved(self, block, each):  # a reader the scheduler gets to late, block by block
        time.sleep(1.0)
        take(self, block, each)

    monkeypatch.setattr(LLAMAExecutor, "_take_lines", starved)
    engine = LLAMAExecutor(tmp_path / "m.gguf", EngineSettings(binary=binary, parallel=1),
                           16_000_000, name="big")
    with pytest.raises(InsufficientMemory) as err:
        engine.ensure_ready()
    assert engine.state == EngineState.FAILED
    assert err.value.message.startswith("model requires more system memory (350.0 GiB more "
                                        "for big with a context of 16000000)")


def test_the_engine_is_asked_for_its_verbose_end_only_when_a_caller_needs_it():
    """The verbose last chunk repeats the whole answer; it is asked for only to tell which stop
    string matched or whether the context filled up (Anthropic's stop reasons)."""
    plain = InternalRequest(model="m", messages=[Message("user", "hi")])
    assert "verbose" not in build_chat_payload(plain)
    stops = InternalRequest(model="m", messages=[Message("user", "hi")], stop=["END"])
    assert build_chat_payload(stops)["verbose"] is True
    anthropic = InternalRequest(model="m", messages=[Message("user", "hi")],
                                wants_context_full=True)
    assert build_chat_payload(anthropic)["verbose"] is True


_TICKING_ENGINE = '''\
import http.server, sys, threading, time
port = int(sys.argv[sys.argv.index("--port") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'{"status":"ok"}')
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
print("srv  llama_server: model loaded", file=sys.stderr, flush=True)
tick = 0
while True:
    tick += 1
    print(f"tick {tick}", file=sys.stderr, flush=True)
    time.sleep(0.02)
'''


def test_a_stopped_engines_log_reader_never_reads_the_next_engines_log(tmp_path):
    """A stopped engine's log reader may still be between two reads. Its pipe, closed under it,
    freed the descriptor number for the next engine's pipe, and the old reader went on reading
    there: the new engine's lines went to the wrong engine or were lost (on CI: a restarted
    engine without its KV cache and 'model loaded' lines). The reader closes its own pipe."""
    import stat
    import sys
    import threading

    script = tmp_path / "ticking.py"
    script.write_text(_TICKING_ENGINE)
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    settings = EngineSettings(binary=binary, parallel=1)
    first = LLAMAExecutor(tmp_path / "a.gguf", settings, 512, name="first")
    second = LLAMAExecutor(tmp_path / "b.gguf", settings, 512, name="second")
    held, release = threading.Event(), threading.Event()
    take = LLAMAExecutor._take_lines
    try:
        first.ensure_ready()

        def hold_once(block, each):  # the first reader, caught between two reads
            take(first, block, each)
            if not held.is_set():
                held.set()
                release.wait(10)

        first._take_lines = hold_once
        assert held.wait(10)
        first.stop()
        second.ensure_ready()
        release.set()
        time.sleep(1.0)  # the first reader's next read, then a few dozen of the second's ticks
        ticks = [int(line.split()[1]) for line in second._stderr if line.startswith("tick ")]
        assert len(ticks) > 10
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), "lines lost"
        # The first reader ended at its own pipe's end.
        assert first._reader is not None
        first._reader.join(5)
        assert not first._reader.is_alive()
    finally:
        release.set()
        first.stop()
        second.stop()
