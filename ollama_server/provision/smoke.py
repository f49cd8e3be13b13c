"""Prove an engine build on this machine before anyone uses it.

``smoke_test`` runs the new ``llama-server`` on a small model: load, generate a few tokens,
embed a sentence; then, when the RPC worker was built too, serves the same model with every
layer on a ``ggml-rpc-server`` on loopback. A crash at any step is a SmokeFailed whose message
names the step and the signal (core.exits) and says what to do.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.engine.exits import describe_exit
from ..core.engine.spawn import popen_tied


class SmokeFailed(RuntimeError):
    """The engine did not survive the smoke test; ``output`` holds its last output."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Child:
    """A child process with its output in a temporary file, stopped as a group."""

    def __init__(self, cmd: list[str], what: str) -> None:
        self.what = what
        self.out = tempfile.TemporaryFile()
        self.proc = popen_tied(cmd, stdin=subprocess.DEVNULL, stdout=self.out,
                               stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, limit: int = 6000) -> str:
        self.out.seek(0)
        return self.out.read().decode(errors="replace")[-limit:]

    def check(self, step: str) -> None:
        """SmokeFailed when the process has died (during ``step``)."""
        code = self.proc.poll()
        if code is not None:
            raise SmokeFailed(f"the new {self.what} {describe_exit(code)} (while {step})",
                              self.output())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()


def local_request(port: int, method: str, path: str, body: Any = None,
                  timeout: float = 60) -> tuple[int, Any]:
    """(status, JSON or text) of one request to a server on 127.0.0.1:``port``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else {}
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def _wait_ready(child: _Child, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        child.check("loading the model")
        try:
            status, _ = local_request(port, "GET", "/health", timeout=2)
            if status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise SmokeFailed(f"the new llama-server did not become ready in {timeout:.0f}s",
                              child.output())
        time.sleep(0.1)


def _call(child: _Child, port: int, step: str, path: str, body: Any) -> Any:
    try:
        status, out = local_request(port, "POST", path, body)
    except (OSError, http.client.HTTPException) as exc:
        time.sleep(0.2)
        child.check(step)
        raise SmokeFailed(f"llama-server failed while {step}: {exc}", child.output()) from exc
    child.check(step)
    if status != 200:
        raise SmokeFailed(f"llama-server answered {status} while {step}: {out}", child.output())
    return out


def _generate(child: _Child, port: int, tokens: int) -> float:
    began = time.monotonic()
    out = _call(child, port, "generating", "/completion",
                {"prompt": "The capital of France is", "n_predict": tokens, "temperature": 0,
                 "ignore_eos": True})
    got = int(out.get("tokens_predicted", 0)) if isinstance(out, dict) else 0
    if got <= 0:
        raise SmokeFailed(f"llama-server generated no tokens: {out}", child.output())
    timings = out.get("timings") or {}
    return round(float(timings.get("predicted_per_second")
                       or got / max(1e-6, time.monotonic() - began)), 1)


def smoke_test(binary: Path, model: Path, *, rpc_binary: Path | None = None,
               log: Callable[[str], None] = print, timeout: float = 180,
               tokens: int = 16) -> dict[str, Any]:
    """Run ``binary`` on ``model`` and return what was measured; SmokeFailed on any failure."""
    base = [str(binary), "-m", str(model), "--host", "127.0.0.1", "-c", "512", "-np", "1",
            "--no-webui"]
    result: dict[str, Any] = {"ok": False, "model": str(model)}
    port = _free_port()
    child = _Child([*base, "--port", str(port), "--embeddings", "--pooling", "mean"],
                   "llama-server")
    try:
        _wait_ready(child, port, timeout)
        result["tokens_per_s"] = _generate(child, port, tokens)
        out = _call(child, port, "embedding", "/v1/embeddings",
                    {"input": "a sentence to embed", "encoding_format": "float"})
        try:
            dim = len(out["data"][0]["embedding"])
        except (KeyError, IndexError, TypeError):
            dim = 0
        if dim <= 0:
            raise SmokeFailed(f"llama-server returned no embedding: {out}", child.output())
        result["embedding_dim"] = dim
        log(f"smoke test: loaded, generated at {result['tokens_per_s']} tokens/s, "
            f"embedded ({dim} dimensions)")
    finally:
        child.stop()
    if rpc_binary is not None:
        result["rpc"] = _smoke_rpc(base, rpc_binary, timeout, tokens)
        log(f"smoke test: served through the RPC worker "
            f"({result['rpc']['tokens_per_s']} tokens/s, layers on the worker)")
    result["ok"] = True
    return result


def _smoke_rpc(base: list[str], rpc_binary: Path, timeout: float, tokens: int) -> dict:
    rpc_port = _free_port()
    worker = _Child([str(rpc_binary), "-H", "127.0.0.1", "-p", str(rpc_port)],
                    "ggml-rpc-server")
    server: _Child | None = None
    try:
        deadline = time.monotonic() + 30
        while True:
            worker.check("starting")
            try:
                socket.create_connection(("127.0.0.1", rpc_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SmokeFailed("the new ggml-rpc-server did not listen in 30s",
                                      worker.output()) from None
                time.sleep(0.1)
        port = _free_port()
        # -lv 4: the engine then reports where each buffer went (load_tensors lines).
        server = _Child([*base, "--port", str(port), "--rpc", f"127.0.0.1:{rpc_port}",
                         "-ngl", "99", "-lv", "4"], "llama-server (with an RPC worker)")
        _wait_ready(server, port, timeout)
        speed = _generate(server, port, tokens)
        worker.check("serving layers to llama-server")
        if f"[127.0.0.1:{rpc_port}] model buffer size" not in server.output(500_000):
            raise SmokeFailed("llama-server ran, but put no layers on the RPC worker",
                              server.output())
        return {"ok": True, "tokens_per_s": speed}
    finally:
        if server is not None:
            server.stop()
        worker.stop()
