#!/usr/bin/env python3
"""A stand-in llama-server that costs (almost) nothing, so a benchmark measures the relay only.

It takes llama-server's command line (``-m``, ``--port``, anything else is ignored), answers
``/health``, ``/slots``, ``/apply-template``, ``/tokenize``, ``/detokenize``, and streams
``/v1/chat/completions`` and ``/completion`` in llama-server's exact chunk shapes (the id,
``timings`` when ``timings_per_token`` is asked for, ``prompt_progress`` when
``return_progress`` is, the closing ``__verbose`` and usage chunks).

Two ways to emit tokens, from the environment (``FAKE_ENGINE_MODE``):

- ``bulk``: every token of a stream as fast as the socket takes them;
- ``paced`` (default): like a batched GPU engine, one token per running stream per step of
  ``FAKE_ENGINE_STEP_MS`` (3 ms), all streams on one clock.

    bench/fake_engine.py --port 8080 -m model.gguf      # or started by the service as its engine
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

WORDS = [" the", " sea", " light", " keeper", " night", " storm", " ship", " rock", " wave",
         " lamp", " tower", " coast", " wind", " salt", " door", " stair", "."]

STEP_S = float(os.environ.get("FAKE_ENGINE_STEP_MS", "3")) / 1000.0
MODE = os.environ.get("FAKE_ENGINE_MODE", "paced")


class Clock:
    """One step for every running stream: all of them get a token, then the next step."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.event = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.step_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self.event.set()
            self.event = asyncio.Event()

    async def tick(self) -> None:
        await self.event.wait()


CLOCK: Clock | None = None
ACTIVE = 0


def n_tokens(body: dict) -> int:
    """Tokens to generate: ``n_predict`` (ours), else ``max_tokens`` (OpenAI's), else 16."""
    for key in ("n_predict", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value >= 0:
            return value
    return 16


def chat_chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None,
               timings: dict | None = None) -> dict:
    out = {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
           "created": created, "id": cid, "model": model,
           "system_fingerprint": "b1-0c1e570", "object": "chat.completion.chunk"}
    if timings is not None:
        out["timings"] = timings
    return out


def timings_of(prompt_n: int, n: int, t0: float) -> dict:
    ms = (time.perf_counter() - t0) * 1000
    return {"cache_n": 0, "prompt_n": prompt_n, "prompt_ms": 1.0,
            "prompt_per_token_ms": 1.0 / max(1, prompt_n), "prompt_per_second": 1000.0,
            "predicted_n": n, "predicted_ms": ms,
            "predicted_per_token_ms": ms / max(1, n),
            "predicted_per_second": n / max(1e-9, ms / 1000)}


async def send_chunked(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def stream(writer: asyncio.StreamWriter, frames) -> None:
    global ACTIVE
    writer.write(b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n")
    ACTIVE += 1
    try:
        for i, frame in enumerate(frames):
            if MODE == "paced" and i and CLOCK is not None:
                await CLOCK.tick()
            await send_chunked(writer, b"data: " + json.dumps(
                frame, separators=(",", ":")).encode() + b"\n\n")
        await send_chunked(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    finally:
        ACTIVE -= 1


def chat_frames(body: dict, model: str):
    n = n_tokens(body)
    per_token = bool(body.get("timings_per_token"))
    progress = bool(body.get("return_progress"))
    cid = "chatcmpl-" + os.urandom(16).hex()
    created = int(time.time())
    prompt_n = 31
    t0 = time.perf_counter()
    if progress:
        first = chat_chunk(cid, created, model, {"role": "assistant", "content": None})
        first["prompt_progress"] = {"total": prompt_n, "cache": 0, "processed": prompt_n,
                                    "time_ms": 1.0}
        yield first
    else:
        yield chat_chunk(cid, created, model, {"role": "assistant", "content": None})
    for i in range(n):
        yield chat_chunk(cid, created, model, {"content": WORDS[i % len(WORDS)]},
                         timings=timings_of(prompt_n, i + 1, t0) if per_token else None)
    last = chat_chunk(cid, created, model, {}, finish="length")
    if body.get("verbose"):
        last["__verbose"] = {"index": 0, "content": "", "stop": True, "stop_type": "limit",
                             "stopping_word": "", "tokens_predicted": n,
                             "tokens_evaluated": prompt_n}
    last["timings"] = timings_of(prompt_n, n, t0)
    yield last
    usage = {"choices": [], "created": created, "id": cid, "model": model,
             "system_fingerprint": "b1-0c1e570", "object": "chat.completion.chunk",
             "usage": {"completion_tokens": n, "prompt_tokens": prompt_n,
                       "total_tokens": n + prompt_n,
                       "prompt_tokens_details": {"cached_tokens": 0}},
             "timings": timings_of(prompt_n, n, t0)}
    yield usage


def completion_frames(body: dict, model: str):
    n = n_tokens(body)
    t0 = time.perf_counter()
    for i in range(n):
        yield {"index": 0, "content": WORDS[i % len(WORDS)], "tokens": [100 + i % 50],
               "stop": False, "id_slot": -1, "tokens_predicted": i + 1, "tokens_evaluated": 8}
    yield {"index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": True, "model": model,
           "tokens_predicted": n, "tokens_evaluated": 8, "stop_type": "limit",
           "stopping_word": "", "timings": timings_of(8, n, t0)}


async def reply_json(writer: asyncio.StreamWriter, obj, status: int = 200) -> None:
    data = json.dumps(obj).encode()
    writer.write(b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"\r\n%s" % (status, len(data), data))
    await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 model: str) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = json.loads(await reader.readexactly(length)) if length else {}
            if path == "/health":
                await reply_json(writer, {"status": "ok"})
            elif path == "/slots":
                await reply_json(writer, [{"id": 0, "is_processing": ACTIVE > 0}])
            elif path == "/apply-template":
                await reply_json(writer, {"prompt": "<|im_start|>user\nx<|im_end|>\n"})
            elif path == "/tokenize":
                await reply_json(writer, {"tokens": list(range(len(body.get("content", ""))))})
            elif path == "/detokenize":
                await reply_json(writer, {"content": "x" * len(body.get("tokens", []))})
            elif path == "/v1/chat/completions" and method == "POST":
                await stream(writer, chat_frames(body, model))
            elif path in ("/completion", "/completions") and method == "POST":
                await stream(writer, completion_frames(body, model))
            else:
                await reply_json(writer, {"error": {"code": 404, "message": "not found",
                                                    "type": "not_found_error"}}, 404)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main_async(port: int, model: str) -> None:
    global CLOCK
    CLOCK = Clock(STEP_S)
    ticker = asyncio.create_task(CLOCK.run())
    server = await asyncio.start_server(lambda r, w: handle(r, w, model), "127.0.0.1", port,
                                        backlog=1024)
    # llama-server's own last line of loading, which the service waits for before it takes
    # the engine for ready (its load report is then whole).
    print("srv  llama_server: model loaded", file=sys.stderr, flush=True)
    async with server:
        try:
            await server.serve_forever()
        finally:
            ticker.cancel()


def install() -> Path:
    """A fresh directory holding a ``llama-server`` that runs this stand-in: give it to the
    service as ``--llama-cpp-dir``, or run it directly."""
    shim_dir = Path(tempfile.mkdtemp(prefix="fake-engine-"))
    shim = shim_dir / "llama-server"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("-m", "--model", default="fake.gguf")
    args, _unknown = ap.parse_known_args()
    try:
        asyncio.run(main_async(args.port, args.model))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
