#!/usr/bin/env python3
"""What the service's relay costs, with an engine that costs nothing (bench/fake_engine.py).

The service is started with the stand-in engine as its llama-server; the same streamed chat
requests go to the stand-in directly and through the service (OpenAI dialect), at several
concurrencies, with tokens paced like a batched GPU engine (one token per stream every 3 ms)
or in bulk. Reported: tokens/s direct and through the service and their ratio, the service's
CPU time per relayed token (master, workers and engine pool, from /proc), its memory (RSS),
and the CPU the stand-in engine and the load generator used meanwhile (they share the
machine's cores with the service), for the service with each number of worker processes
given (``--workers``, one relay thread each, core/relay.py) and, with ``--per-request``, with
``relay_thread: false`` (each stream relayed by its own request thread), in the same run.
The load generator is an asyncio client that only counts tokens, so it stays cheap.

    .venv/bin/python bench/bench_relay.py [--mode paced|bulk] [--concurrency 1 8 32 64]
                                          [--tokens 256] [--min-tokens 8192]
                                          [--workers 1 2] [--per-request]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import fake_engine  # noqa: E402
from bench_overhead import free_port, save_report, wait_http  # noqa: E402

TOKEN = b'"delta":{"content":'
CLK = os.sysconf("SC_CLK_TCK")


async def one_stream(port: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    tokens, tail = 0, b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        buf = tail + data
        tokens += buf.count(TOKEN) - tail.count(TOKEN)
        tail = buf[-64:]
        if b"data: [DONE]" in buf:
            break
    writer.close()
    return tokens


async def load(port: int, concurrency: int, n_tokens: int, rounds: int) -> tuple[int, float]:
    body = json.dumps({"model": "smollm2:135m", "max_tokens": n_tokens, "stream": True,
                       "messages": [{"role": "user", "content": "Tell a story."}]}).encode()
    t0 = time.perf_counter()
    total = 0
    for _ in range(rounds):
        counts = await asyncio.gather(*(one_stream(port, body) for _ in range(concurrency)))
        total += sum(counts)
    return total, time.perf_counter() - t0


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK


def rss_mb(pids: list[int]) -> float:
    kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                kb += int(line.split()[1])
    return kb / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["paced", "bulk"], default="paced")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--min-tokens", type=int, default=8192,
                    help="tokens relayed per level at least (rounds are repeated to reach it; "
                         "the CPU figure is counted in 10 ms ticks)")
    ap.add_argument("--model-dir", default=str(ROOT / "models"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="worker process counts to compare in the same run")
    ap.add_argument("--per-request", action="store_true",
                    help="also the service with relay_thread: false (one worker)")
    args = ap.parse_args()

    env = dict(os.environ, FAKE_ENGINE_MODE=args.mode, OLLAMA_SERVER_LOG_LEVEL="WARNING",
               OLLAMA_SERVER_KEEP_ALIVE="-1",
               OLLAMA_SERVER_PARALLEL=str(max(64, *args.concurrency)),
               OLLAMA_SERVER_THREADS_HTTP="128")
    shim_dir = fake_engine.install()
    shim = shim_dir / "llama-server"
    direct_port = free_port()
    direct = subprocess.Popen([str(shim), "--port", str(direct_port)], env=env,
                              start_new_session=True)
    # The service once per worker count (relay thread on, the default), and with relay_thread
    # off, where each stream's own request thread relays it (the design before core/relay.py).
    sides = {f"workers{n}": {"OLLAMA_SERVER_WORKERS": str(n)} for n in args.workers}
    if args.per_request:
        sides["per_request"] = {"OLLAMA_SERVER_WORKERS": "1", "OLLAMA_SERVER_RELAY_THREAD": "false"}
    services: dict[str, tuple[subprocess.Popen, int]] = {}
    for side, extra in sides.items():
        port = free_port()
        services[side] = (subprocess.Popen(
            [sys.executable, "-m", "ollama_server.main", "--model-dir", args.model_dir,
             "--port", str(port), "--llama-cpp-dir", str(shim_dir)], cwd=ROOT,
            env=dict(env, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)
    report: dict = {"mode": args.mode, "tokens": args.tokens, "min_tokens": args.min_tokens,
                    "cpu_count": os.cpu_count(), "results": {}}
    try:
        wait_http(direct_port, "/health")
        pids, engines = {}, {}
        for side, (proc, port) in services.items():
            wait_http(port, "/health")
            asyncio.run(load(port, 2, 8, 1))  # loads the (fake) model
            # The service's processes: the master, its workers and its engine pool; the
            # stand-in engine is a child of the worker (one worker) or of the pool.
            pids[side] = [proc.pid] + children(proc.pid)
            engines[side] = [e for p in pids[side] for e in children(p)
                             if b"fake_engine" in Path(f"/proc/{e}/cmdline").read_bytes()]
        for c in args.concurrency:
            rounds = max(1, -(-args.min_tokens // (c * args.tokens)))
            d_tokens, d_wall = asyncio.run(load(direct_port, c, args.tokens, rounds))
            res: dict = {"direct_tps": d_tokens / d_wall, "direct_tokens": d_tokens}
            line = f"c={c:3d} direct {res['direct_tps']:8.0f} tok/s"
            for side, (_, port) in services.items():
                before = cpu_s(pids[side])
                each_before = [cpu_s([p]) for p in pids[side]]
                engine_before = cpu_s(engines[side])
                gen_before = resource.getrusage(resource.RUSAGE_SELF)
                s_tokens, s_wall = asyncio.run(load(port, c, args.tokens, rounds))
                used = cpu_s(pids[side]) - before
                # Each process's share (master, workers, pool): how evenly the workers relay.
                each = [cpu_s([p]) - b for p, b in zip(pids[side], each_before, strict=True)]
                gen = resource.getrusage(resource.RUSAGE_SELF)
                tps = s_tokens / s_wall
                res[side] = {"service_tps": tps, "ratio": tps / res["direct_tps"],
                             "cpu_us_per_token": 1e6 * used / max(1, s_tokens),
                             "service_cores": used / s_wall,
                             "engine_cores": (cpu_s(engines[side]) - engine_before) / s_wall,
                             "loadgen_cores": (gen.ru_utime + gen.ru_stime - gen_before.ru_utime
                                               - gen_before.ru_stime) / s_wall,
                             "rss_mb": rss_mb(pids[side]), "tokens": s_tokens,
                             "process_cores": [round(e / s_wall, 2) for e in each]}
                r = res[side]
                line += (f" | {side}: ratio {r['ratio']:.3f} {r['cpu_us_per_token']:5.1f} us/token"
                         f" cores: service {r['service_cores']:.2f} engine "
                         f"{r['engine_cores']:.2f} client {r['loadgen_cores']:.2f}"
                         f" (each: {' '.join(f'{e:.2f}' for e in r['process_cores'])})")
            report["results"][f"c{c}"] = res
            print(line, flush=True)
    finally:
        for proc, _ in services.values():
            proc.send_signal(signal.SIGTERM)
        os.killpg(direct.pid, signal.SIGTERM)
        for proc, _ in services.values():
            proc.wait(timeout=30)
        direct.wait(timeout=30)
    save_report(report, f"relay-{args.mode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
