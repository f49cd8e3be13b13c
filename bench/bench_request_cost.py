#!/usr/bin/env python3
"""What one request costs the service before its first token, with an engine that costs nothing.

The real-engine benchmark (bench_ttft.py) measures the same thing, but next to a model that
shares the machine's cores its figure moves by milliseconds between runs. Here the engine is the
stand-in (bench/fake_engine.py, ``bulk``), so what remains is the service's own work. Sides,
called in turn (the order alternating each round) with the same streamed OpenAI chat, a new
connection each time as curl makes it:

- ``engine``: the stand-in engine called directly;
- ``floor``: gunicorn with the service's settings (gthread, one worker, the same thread count
  and keep-alive) serving a Flask app that reads the JSON body and streams three canned
  frames: what any Flask-on-gunicorn service costs before it does anything;
- ``service``: the service, with the stand-in as its llama-server.

Prints the time to the first content chunk (median, p10, p90 in ms) for each side, then what
the service adds to the engine's time (``service - engine``) and how much of that is the
stack itself (``floor``): a proxy on this stack adds at least about the floor. Also the CPU
time each gunicorn side (arbiter and worker, from /proc) spent per request: at high
concurrency that, not the latency, is what a request costs the others.

    .venv/bin/python bench/bench_request_cost.py [--samples 300] [--max-tokens 4]
                                                 [--history-kb 0] [--baseline OTHER_CHECKOUT]

``--history-kb`` puts that much earlier conversation in front of the question, as coding agents
send it (the stand-in engine ignores it, so only the service's handling of it is measured).

``--baseline`` adds a side: the service of another checkout of this project (e.g. a
``git worktree`` of an older commit), run by this venv's Python, for an A/B in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import fake_engine  # noqa: E402
from bench_overhead import free_port, save_report, wait_http  # noqa: E402
from bench_relay import children, cpu_s  # noqa: E402

from ollama_server.config import Config  # noqa: E402

FIRST = b'"delta":{"content":'


def floor_app():  # noqa: ANN201 - the WSGI app gunicorn loads as bench_request_cost:floor_app()
    """The floor: a Flask app that reads the body and streams canned OpenAI chunks."""
    from flask import Flask, Response, request

    app = Flask("floor")
    frames = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
              b'data: {"choices":[{"index":0,"delta":{"content":" the"}}]}\n\n',
              b"data: [DONE]\n\n")

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.post("/v1/chat/completions")
    def chat() -> Response:
        request.get_json()
        return Response(iter(frames), mimetype="text/event-stream")

    return app


def first_chunk_ms(port: int, request: bytes) -> float:
    """Milliseconds from sending ``request`` on a new connection to the first content chunk."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        sock.sendall(request)
        seen = b""
        first = None
        while True:
            data = sock.recv(65536)
            if not data:
                break
            seen += data
            if first is None and FIRST in seen:
                first = time.perf_counter() - t0
            if b"data: [DONE]" in seen:
                break
    if first is None:
        raise SystemExit(f"port {port} answered without a content chunk: {seen[:300]!r}")
    return 1000 * first


def summary(xs: list[float]) -> dict:
    qs = statistics.quantiles(xs, n=10)
    return {"median": statistics.median(xs), "p10": qs[0], "p90": qs[-1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--model-dir", default=str(ROOT / "models"))
    ap.add_argument("--history-kb", type=int, default=0,
                    help="KB of earlier conversation sent with each request")
    ap.add_argument("--baseline", help="another checkout of the project: its service is a side")
    args = ap.parse_args()

    env = dict(os.environ, FAKE_ENGINE_MODE="bulk", OLLAMA_SERVER_LOG_LEVEL="WARNING",
               OLLAMA_SERVER_KEEP_ALIVE="-1")
    shim_dir = fake_engine.install()
    ports = {"engine": free_port(), "floor": free_port()}
    procs = {
        "engine": subprocess.Popen([str(shim_dir / "llama-server"), "--port",
                                    str(ports["engine"])], env=env, start_new_session=True),
        "floor": subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--chdir", str(BENCH), "-k", "gthread",
             "-w", "1", "--threads", str(Config().threads_http), "--keep-alive", "5",
             "--log-level", "warning", "-b", f"127.0.0.1:{ports['floor']}",
             "bench_request_cost:floor_app()"], env=env, start_new_session=True),
    }
    checkouts = {"service": ROOT}
    if args.baseline:
        checkouts["baseline"] = Path(args.baseline).resolve()
    for side, checkout in checkouts.items():
        ports[side] = free_port()
        procs[side] = subprocess.Popen(
            [sys.executable, "-m", "ollama_server.main", "--model-dir",
             str(Path(args.model_dir).resolve()), "--port", str(ports[side]),
             "--llama-cpp-dir", str(shim_dir)], cwd=checkout, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
    turn = "def area(r):\n    return 3.14159 * r * r  # the circle's area, \"quoted\" é 中文\n" * 16
    history = [{"role": ("user", "assistant")[i % 2], "content": turn}
               for i in range(round(args.history_kb * 1024 / len(turn.encode())))]
    body = json.dumps({"model": "smollm2:135m", "max_tokens": args.max_tokens, "stream": True,
                       "messages": [*history, {"role": "user", "content": "Say hello."}]}
                      ).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
               b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    samples: dict[str, list[float]] = {side: [] for side in ports}
    try:
        for port in ports.values():
            wait_http(port, "/health")
        for _ in range(20):  # loads the (fake) model, warms every side
            for port in ports.values():
                first_chunk_ms(port, request)
        pids = {side: [proc.pid] + [p for p in children(proc.pid)
                                    if b"fake_engine" not in Path(f"/proc/{p}/cmdline")
                                    .read_bytes()]
                for side, proc in procs.items() if side != "engine"}
        before = {side: cpu_s(p) for side, p in pids.items()}
        order = list(ports)
        for i in range(args.samples):
            for side in (order if i % 2 else order[::-1]):
                samples[side].append(first_chunk_ms(ports[side], request))
        cpu_ms = {side: 1000 * (cpu_s(p) - before[side]) / args.samples
                  for side, p in pids.items()}
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=30)
    report: dict = {"samples": args.samples, "cpu_count": os.cpu_count(),
                    "body_bytes": len(body),
                    "sides": {side: summary(xs) for side, xs in samples.items()}}
    for side, s in report["sides"].items():
        s["cpu_ms_per_request"] = cpu_ms.get(side)
        print(f"{side:8s} first chunk median {s['median']:6.3f} ms  "
              f"(p10 {s['p10']:6.3f}, p90 {s['p90']:6.3f})"
              + (f"  CPU {cpu_ms[side]:.2f} ms per request" if side in cpu_ms else ""))
    med = {side: s["median"] for side, s in report["sides"].items()}
    report["added_ms"] = med["service"] - med["engine"]
    report["beyond_floor_ms"] = report["added_ms"] - med["floor"]
    if "baseline" in med:
        report["baseline_added_ms"] = med["baseline"] - med["engine"]
        print(f"\nadded by the baseline: {report['baseline_added_ms']:+.3f} ms (medians)", end="")
    print(f"\nadded by the service: {report['added_ms']:+.3f} ms (medians); the stack's floor "
          f"alone: {med['floor']:.3f} ms; the service's own work beyond it: "
          f"{report['beyond_floor_ms']:+.3f} ms")
    save_report(report, "request-cost")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
