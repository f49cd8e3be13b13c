#!/usr/bin/env python3
"""Time to first token added by the service, measured three ways in one run.

Sides, called in turn (the order alternating each round) with the same short streamed chat:

- ``direct``: a separate llama-server started with exactly the service's flags;
- ``own-engine``: the service's own llama-server, called on its port directly;
- ``service``: the service (OpenAI dialect).

``own-engine`` against ``direct`` shows what the way the service runs its engine costs (the log
pipe, the process setup); ``service`` against either shows what the service adds per request.
Prints the medians in ms.

    .venv/bin/python bench/bench_ttft.py [--samples 60] [--model smollm2:135m] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from bench_overhead import PROMPT, free_port, one_stream, service_engine, wait_http  # noqa: E402

from ollama_server.core.engine import LLAMAExecutor  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models"))
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0,
                    help="engine threads on every side (0: llama-server's choice); fewer than "
                         "the machine's cores leaves the service a core of its own")
    args = ap.parse_args()
    _, info, settings, ctx = service_engine(args.model_dir, args.model, threads=args.threads)
    direct_port, port = free_port(), free_port()
    cmd = LLAMAExecutor(info.path, settings, ctx).command(direct_port)
    direct = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    env = dict(os.environ, OLLAMA_SERVER_LOG_LEVEL="WARNING", OLLAMA_SERVER_KEEP_ALIVE="-1",
               OLLAMA_SERVER_THREADS=str(args.threads))
    service = subprocess.Popen([sys.executable, "-m", "ollama_server.main", "--model-dir",
                                args.model_dir, "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(port, "/health")
        wait_http(direct_port, "/health")
        body = json.dumps({"model": info.name, "messages": [{"role": "user", "content": PROMPT}],
                           "max_tokens": 2, "temperature": 0, "ignore_eos": True,
                           "stream": True, "stream_options": {"include_usage": True}}).encode()
        one_stream(port, body)  # loads the model
        one_stream(direct_port, body)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as resp:
            own = next(m["port"] for m in json.load(resp)["models_loaded"]
                       if m["name"] == info.name)
        sides = [("direct", direct_port), ("own-engine", own), ("service", port)]
        ttft: dict[str, list[float]] = {name: [] for name, _ in sides}
        for i in range(args.samples):
            for name, p in sides if i % 2 else sides[::-1]:
                ttft[name].append(1000 * one_stream(p, body)["ttft"])
        med = {name: statistics.median(v) for name, v in ttft.items()}
        print(f"{info.name}, {args.samples} requests per side, medians: "
              + ", ".join(f"{name} {v:.2f} ms" for name, v in med.items())
              + f"; the service adds {med['service'] - med['direct']:+.2f} ms")
    finally:
        service.send_signal(signal.SIGTERM)
        os.killpg(direct.pid, signal.SIGTERM)
        service.wait(timeout=30)
        direct.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
