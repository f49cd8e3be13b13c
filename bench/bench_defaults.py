#!/usr/bin/env python3
"""Are the service's defaults better than llama-server's own? And than the peer?

In one run, on the same model and the same requests (streamed chat, interleaved rounds):

- ``service``: the service with its default settings (``python -m ollama_server.main``);
- ``plain``: llama-server started with only ``-m`` and ``--port`` (its own defaults);
- ``peer``: llama-cpp-python's OpenAI server (``python -m llama_cpp.server``), built from the
  same llama.cpp with the same AMX-safe flags (bench/peer.py builds it once);
- with ``--try``, llama-server with other flags, to choose the defaults by measurement
  (``--try "-np 8" --try "-np 32 --kv-unified"``).

Reported per concurrency: median time to first token, aggregate tokens/s, and the service's
ratios to the others. Results also go to ``bench/results/defaults-<time>.json``.

    .venv/bin/python bench/bench_defaults.py [--concurrency 1 8 32] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from bench_overhead import (  # noqa: E402
    free_port,
    run_batch,
    save_report,
    service_engine,
    wait_http,
)


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models"))
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="leave llama-cpp-python out")
    ap.add_argument("--peer-concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--try", dest="tries", action="append", default=[],
                    help="extra llama-server flags to measure as another contender")
    args = ap.parse_args()

    _, info, settings, _ = service_engine(args.model_dir, args.model)
    binary = settings.binary
    sides: dict[str, tuple[subprocess.Popen, int]] = {}
    port = free_port()
    sides["service"] = (start([sys.executable, "-m", "ollama_server.main", "--model-dir",
                               args.model_dir, "--port", str(port)],
                              env=dict(os.environ, OLLAMA_SERVER_LOG_LEVEL="WARNING",
                                       OLLAMA_SERVER_KEEP_ALIVE="-1")), port)
    port = free_port()
    sides["plain"] = (start([str(binary), "-m", str(info.path), "--port", str(port)]), port)
    for i, extra in enumerate(args.tries):
        port = free_port()
        sides[f"try{i}"] = (start([str(binary), "-m", str(info.path), "--port", str(port),
                                   *shlex.split(extra)]), port)
    if not args.no_peer:
        from peer import peer_python

        port = free_port()
        sides["peer"] = (start([str(peer_python()), "-m", "llama_cpp.server", "--model",
                                str(info.path), "--port", str(port), "--n_ctx", "8192"]), port)
    report: dict = {"model": info.name, "tokens": args.tokens, "rounds": args.rounds,
                    "cpu_count": os.cpu_count(), "tries": args.tries, "results": {}}
    try:
        for name, (_, port) in sides.items():
            wait_http(port, "/health" if name != "peer" else "/v1/models", timeout=300)
            run_batch(port, 1, 8, info.name)  # warm up (the service loads its model here)
        for c in args.concurrency:
            batches: dict[str, list[dict]] = {name: [] for name in sides}
            for r in range(args.rounds):
                order = list(sides.items())
                for name, (_, port) in order if r % 2 == 0 else order[::-1]:
                    if name == "peer" and c not in args.peer_concurrency:
                        continue
                    batches[name].append(run_batch(port, c, args.tokens, info.name))
                    time.sleep(0.5)
            level = {}
            for name, runs in batches.items():
                if runs:
                    level[name] = {
                        "ttft_ms": 1000 * statistics.median(x for b in runs for x in b["ttft"]),
                        "aggregate_tps": statistics.median(b["aggregate_tps"] for b in runs),
                        "spread_tps": [round(b["aggregate_tps"], 1) for b in runs]}
            report["results"][f"c{c}"] = level
            line = "  ".join(f"{name} {v['ttft_ms']:7.0f} ms {v['aggregate_tps']:6.1f} tok/s"
                             for name, v in level.items())
            print(f"c={c:3d}  {line}", flush=True)
    finally:
        for proc, _ in sides.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    print("\nratios of the service to:")
    for key, level in report["results"].items():
        svc = level["service"]
        parts = [f"{name}: TTFT x{svc['ttft_ms'] / v['ttft_ms']:.2f}, throughput "
                 f"x{svc['aggregate_tps'] / v['aggregate_tps']:.2f}"
                 for name, v in level.items() if name != "service"]
        print(f"{key:4} " + "; ".join(parts))
    save_report(report, "defaults")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
