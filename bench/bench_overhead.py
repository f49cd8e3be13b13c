#!/usr/bin/env python3
"""Overhead of the service over llama-server itself, measured in one run.

Starts a llama-server directly with the flags the service gives its own engine, and the service
(``python -m ollama_server.main``) on the same model; sends the same streamed chat requests to
both, in interleaved rounds, at concurrency 1, 8 and 32; prints time to first token, per-stream
decode tokens/s and aggregate tokens/s for both, and their ratios. Results also go to
``bench/results/<time>.json``.

    .venv/bin/python bench/bench_overhead.py --model-dir ./models [--rounds 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ollama_server.config import Config, load_config  # noqa: E402
from ollama_server.core.engine import EngineSettings, LLAMAExecutor  # noqa: E402
from ollama_server.models.manager import ModelManager  # noqa: E402
from ollama_server.models.schemas import ModelInfo  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"nothing healthy on port {port}{path}")


def one_stream(port: int, body: bytes, errors_ok: bool = False) -> dict:
    """Send one streamed chat request; time the first content token and the last.

    Also returns the answer's ``text``, ``prompt_tokens`` and ``cached_tokens`` (from the
    usage, when sent). An HTTP error or an error frame ends the run, or with ``errors_ok``
    comes back as ``error`` (and ``ttft`` None)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        message = f"HTTP {resp.status} from port {port}: {resp.read()[:300]!r}"
        conn.close()
        if errors_ok:
            return {"ttft": None, "error": message}
        raise SystemExit(message)
    first = last = None
    tokens = chunks = prompt = cached = 0
    text: list[str] = []
    error = None
    while True:
        line = resp.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("error"):
            error = str(chunk["error"])[:300]
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
            prompt = chunk["usage"].get("prompt_tokens") or 0
            cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
                text.append(choice["delta"]["content"])
    conn.close()
    if error is not None:
        if errors_ok:
            return {"ttft": None, "error": error}
        raise SystemExit(f"error from port {port}: {error}")
    tokens = tokens or chunks  # a server that sends no usage: one token per content chunk
    if first is None:  # no content at all (an empty answer): timed to the end of the stream
        first = last = time.perf_counter()
    return {"ttft": first - t0, "total": last - t0, "tokens": tokens,
            "decode_tps": (tokens - 1) / (last - first) if last > first else 0.0,
            "text": "".join(text), "prompt_tokens": prompt, "cached_tokens": cached}


def service_engine(model_dir: str, model: str,
                   **overrides: Any) -> tuple[Config, ModelInfo, EngineSettings, int]:
    """How the service would run ``model``: its configuration (the defaults, the models
    folder and ``overrides``), the model, its engine settings and its context size."""
    config = load_config(overrides={"models_dir": model_dir, **overrides}, environ={})
    manager = ModelManager(config)
    try:
        info = manager.resolve(model)
        return config, info, manager.engine_settings(info.name), manager.context_for(info)
    finally:
        manager.shutdown()


def save_report(report: dict, kind: str = "") -> Path:
    """Write a benchmark's report to ``bench/results/[<kind>-]<time>.json`` and say where."""
    out = ROOT / "bench" / "results" / time.strftime(f"{kind}{'-' if kind else ''}"
                                                      "%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")
    return out


def run_batch(port: int, concurrency: int, n_tokens: int, model: str) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    results: list[dict] = []
    lock = threading.Lock()

    def worker() -> None:
        r = one_stream(port, body)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"ttft": [r["ttft"] for r in results], "decode_tps": [r["decode_tps"] for r in results],
            "aggregate_tps": sum(r["tokens"] for r in results) / wall,
            "tokens": [r["tokens"] for r in results]}


def summarize(batches: list[dict]) -> dict:
    ttft = [x for b in batches for x in b["ttft"]]
    tps = [x for b in batches for x in b["decode_tps"]]
    return {"ttft_ms_median": 1000 * statistics.median(ttft),
            "decode_tps_median": statistics.median(tps),
            "aggregate_tps_median": statistics.median(b["aggregate_tps"] for b in batches),
            "requests": len(ttft)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models"))
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--parallel", type=int, default=None,
                    help="slots per engine, both sides (default: the service's default)")
    ap.add_argument("--ttft-samples", type=int, default=60,
                    help="short single requests per side for the time-to-first-token figure")
    args = ap.parse_args()

    config, info, settings, ctx = service_engine(
        args.model_dir, args.model,
        **({"parallel": args.parallel} if args.parallel is not None else {}))
    args.parallel = config.parallel
    direct_port, service_port = free_port(), free_port()
    direct_cmd = LLAMAExecutor(info.path, settings, ctx).command(direct_port)
    print("direct :", " ".join(direct_cmd), flush=True)
    direct = subprocess.Popen(direct_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    env = dict(os.environ, OLLAMA_SERVER_LOG_LEVEL="WARNING",
               OLLAMA_SERVER_PARALLEL=str(args.parallel), OLLAMA_SERVER_KEEP_ALIVE="-1")
    service = subprocess.Popen([sys.executable, "-m", "ollama_server.main", "--model-dir",
                                args.model_dir, "--port", str(service_port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report: dict = {"model": info.name, "tokens": args.tokens, "rounds": args.rounds,
                    "parallel": args.parallel, "cpu_count": os.cpu_count(), "results": {}}
    try:
        wait_http(direct_port, "/health")
        wait_http(service_port, "/health")
        for port in (direct_port, service_port):  # warm up: load, caches, first JIT paths
            run_batch(port, 2, 16, info.name)
        # Time to first token: many short interleaved requests (one sample per request is
        # noisy; its spread is far larger than the overhead being measured).
        ttft: dict[str, list[float]] = {"direct": [], "service": []}
        for i in range(args.ttft_samples):
            order = [("direct", direct_port), ("service", service_port)]
            for name, port in order if i % 2 == 0 else order[::-1]:
                ttft[name].append(run_batch(port, 1, 2, info.name)["ttft"][0])
        if args.ttft_samples:
            d_ms = 1000 * statistics.median(ttft["direct"])
            s_ms = 1000 * statistics.median(ttft["service"])
            report["ttft"] = {"samples": args.ttft_samples, "direct_ms_median": d_ms,
                              "service_ms_median": s_ms, "added_ms": s_ms - d_ms}
        for c in args.concurrency:
            batches: dict[str, list[dict]] = {"direct": [], "service": []}
            for r in range(args.rounds):
                # Interleave, alternating which goes first, so drift hits both alike.
                order = [("direct", direct_port), ("service", service_port)]
                for name, port in order if r % 2 == 0 else order[::-1]:
                    batches[name].append(run_batch(port, c, args.tokens, info.name))
            d, s = summarize(batches["direct"]), summarize(batches["service"])
            # Throughput on a shared machine drifts by several percent within a minute, so
            # each round is compared with its neighbour in time and the median ratio kept.
            pairs = list(zip(batches["direct"], batches["service"], strict=True))
            report["results"][f"c{c}"] = {
                "direct": d, "service": s,
                "ttft_added_ms": statistics.median(
                    1000 * (statistics.median(sv["ttft"]) - statistics.median(dv["ttft"]))
                    for dv, sv in pairs),
                "decode_ratio": statistics.median(
                    statistics.median(sv["decode_tps"]) / statistics.median(dv["decode_tps"])
                    for dv, sv in pairs),
                "aggregate_ratio": statistics.median(
                    sv["aggregate_tps"] / dv["aggregate_tps"] for dv, sv in pairs),
                "rounds": [{"direct": dv, "service": sv} for dv, sv in pairs]}
    finally:
        service.send_signal(signal.SIGTERM)
        os.killpg(direct.pid, signal.SIGTERM)
        service.wait(timeout=30)
        direct.wait(timeout=30)

    print(f"\nmodel {info.name}, {args.tokens} tokens per request, {args.rounds} rounds, "
          f"{args.parallel} slots, {os.cpu_count()} CPUs")
    print("medians over all requests; ratio row: median of per-round paired ratios")
    print(f"{'':5} {'':8} {'TTFT ms':>9} {'decode tok/s':>13} {'aggregate tok/s':>16}")
    for key, res in report["results"].items():
        for side in ("direct", "service"):
            x = res[side]
            print(f"{key:5} {side:8} {x['ttft_ms_median']:9.2f} {x['decode_tps_median']:13.1f} "
                  f"{x['aggregate_tps_median']:16.1f}")
        print(f"{key:5} {'ratio':8} {res['ttft_added_ms']:+8.2f}ms {res['decode_ratio']:13.3f} "
              f"{res['aggregate_ratio']:16.3f}")
    if "ttft" in report:
        t = report["ttft"]
        print(f"\ntime to first token, {t['samples']} short requests per side, c=1: direct "
              f"{t['direct_ms_median']:.2f} ms, service {t['service_ms_median']:.2f} ms, "
              f"added {t['added_ms']:+.2f} ms")
    save_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
