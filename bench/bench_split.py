#!/usr/bin/env python3
"""The price of a split: a model served locally vs split over llama.cpp RPC workers, one run.

Starts two ``ggml-rpc-server`` workers on loopback (from the project's engine build) and two
llama-servers with the service's own flags on the same model: one local, one with every layer
on the workers (``--rpc a,b -ngl 99 --tensor-split 1,1``). Sends the same streamed chat
requests to both in interleaved rounds and prints time to first token and tokens/s, and their
ratios. On one machine the workers share its CPU cores with each other and the engine, so this
measures the protocol's cost (every token crosses the RPC link once per worker), not the gain
of adding hosts. Results also go to ``bench/results/split-<time>.json``.

    .venv/bin/python bench/bench_split.py --model-dir ./models [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from bench_overhead import (  # noqa: E402
    free_port,
    run_batch,
    save_report,
    service_engine,
    summarize,
    wait_http,
)

from ollama_server.core.engine import LLAMAExecutor  # noqa: E402
from ollama_server.provision.engine import rpc_worker_binary  # noqa: E402


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def wait_tcp(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"no RPC worker on port {port}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(BENCH.parent / "models"))
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()

    _, info, local_settings, _ = service_engine(args.model_dir, args.model)
    worker_bin = rpc_worker_binary(local_settings.binary)
    if worker_bin is None:
        raise SystemExit("no ggml-rpc-server beside the engine: make engine-rebuild")
    ctx = 4096
    worker_ports = [free_port(), free_port()]
    workers = [start([str(worker_bin), "-H", "127.0.0.1", "-p", str(p)]) for p in worker_ports]
    for p in worker_ports:
        wait_tcp(p)
    split_settings = dataclasses.replace(
        local_settings, rpc_servers=[f"127.0.0.1:{p}" for p in worker_ports], gpu_layers=99,
        tensor_split=[1.0, 1.0])
    ports = {"local": free_port(), "split": free_port()}
    engines = {
        "local": start(LLAMAExecutor(info.path, local_settings, ctx).command(ports["local"])),
        "split": start(LLAMAExecutor(info.path, split_settings, ctx).command(ports["split"]))}
    print("split:", " ".join(LLAMAExecutor(info.path, split_settings, ctx)
                             .command(ports["split"])), flush=True)
    report: dict = {"model": info.name, "tokens": args.tokens, "rounds": args.rounds,
                    "workers": split_settings.rpc_servers, "cpu_count": os.cpu_count(),
                    "results": {}}
    try:
        for port in ports.values():
            wait_http(port, "/health")
            run_batch(port, 2, 8, info.name)  # warm up
        for c in args.concurrency:
            batches: dict[str, list[dict]] = {"local": [], "split": []}
            for r in range(args.rounds):
                order = list(ports.items())
                for name, port in order if r % 2 == 0 else order[::-1]:
                    batches[name].append(run_batch(port, c, args.tokens, info.name))
            loc, spl = summarize(batches["local"]), summarize(batches["split"])
            pairs = list(zip(batches["local"], batches["split"], strict=True))
            report["results"][f"c{c}"] = {
                "local": loc, "split": spl,
                "aggregate_ratio": statistics.median(s["aggregate_tps"] / lv["aggregate_tps"]
                                                     for lv, s in pairs),
                "ttft_added_ms": statistics.median(
                    1000 * (statistics.median(s["ttft"]) - statistics.median(lv["ttft"]))
                    for lv, s in pairs)}
    finally:
        for proc in [*engines.values(), *workers]:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    print(f"\nmodel {info.name}, {args.tokens} tokens per request, {args.rounds} rounds, "
          f"2 loopback workers, {os.cpu_count()} CPUs")
    print(f"{'':4} {'':6} {'TTFT ms':>9} {'decode tok/s':>13} {'aggregate tok/s':>16}")
    for key, res in report["results"].items():
        for name in ("local", "split"):
            r = res[name]
            print(f"{key:4} {name:6} {r['ttft_ms_median']:9.1f} {r['decode_tps_median']:13.1f} "
                  f"{r['aggregate_tps_median']:16.1f}")
        print(f"{key:4} {'ratio':6} {'+' + format(res['ttft_added_ms'], '.1f'):>9} "
              f"{'':13} {res['aggregate_ratio']:16.3f}")
    save_report(report, "split")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
