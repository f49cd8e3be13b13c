#!/usr/bin/env python3
"""What the service's relay costs, with an engine that costs nothing (bench/fake_engine.py).

The service is started with the stand-in engine as its llama-server; the same streamed chat
requests go to the stand-in directly and through the service (OpenAI dialect), at several
concurrencies, with tokens paced like a batched GPU engine (one token per stream every 3 ms)
or in bulk. Reported: tokens/s direct and through the service and their ratio, the service's
CPU time per relayed token (arbiter and worker processes, from /proc), and its memory (RSS),
for the service as configured by default (one relay thread, core/relay.py) and with
``relay_thread: false`` (each stream relayed by its own request thread), in the same run.
The load generator is an asyncio client that only counts tokens, so it stays cheap.

    .venv/bin/python bench/bench_relay.py [--mode paced|bulk] [--concurrency 1 8 32 64]
                                          [--tokens 256] [--min-tokens 8192]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    args = ap.parse_args()

    env = dict(os.environ, FAKE_ENGINE_MODE=args.mode, OLLAMA_SERVER_LOG_LEVEL="WARNING",
               OLLAMA_SERVER_KEEP_ALIVE="-1", OLLAMA_SERVER_PARALLEL="64",
               OLLAMA_SERVER_THREADS_HTTP="128")
    shim_dir = fake_engine.install()
    shim = shim_dir / "llama-server"
    direct_port = free_port()
    direct = subprocess.Popen([str(shim), "--port", str(direct_port)], env=env,
                              start_new_session=True)
    # The service twice: with its relay thread (the default) and with relay_thread off, where
    # each stream's own request thread relays it (the design before core/relay.py).
    sides = {"relay": "true", "per_request": "false"}
    services: dict[str, tuple[subprocess.Popen, int]] = {}
    for side, flag in sides.items():
        port = free_port()
        services[side] = (subprocess.Popen(
            [sys.executable, "-m", "ollama_server.main", "--model-dir", args.model_dir,
             "--port", str(port), "--llama-cpp-dir", str(shim_dir)], cwd=ROOT,
            env=dict(env, OLLAMA_SERVER_RELAY_THREAD=flag),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)
    report: dict = {"mode": args.mode, "tokens": args.tokens, "min_tokens": args.min_tokens,
                    "cpu_count": os.cpu_count(), "results": {}}
    try:
        wait_http(direct_port, "/health")
        pids = {}
        for side, (proc, port) in services.items():
            wait_http(port, "/health")
            asyncio.run(load(port, 2, 8, 1))  # loads the (fake) model
            pids[side] = [proc.pid] + [p for p in children(proc.pid)
                                       if b"fake_engine" not in Path(f"/proc/{p}/cmdline")
                                       .read_bytes()]
        for c in args.concurrency:
            rounds = max(1, -(-args.min_tokens // (c * args.tokens)))
            d_tokens, d_wall = asyncio.run(load(direct_port, c, args.tokens, rounds))
            res: dict = {"direct_tps": d_tokens / d_wall, "direct_tokens": d_tokens}
            line = f"c={c:3d} direct {res['direct_tps']:8.0f} tok/s"
            for side, (_, port) in services.items():
                before = cpu_s(pids[side])
                s_tokens, s_wall = asyncio.run(load(port, c, args.tokens, rounds))
                used = cpu_s(pids[side]) - before
                tps = s_tokens / s_wall
                res[side] = {"service_tps": tps, "ratio": tps / res["direct_tps"],
                             "cpu_us_per_token": 1e6 * used / max(1, s_tokens),
                             "rss_mb": rss_mb(pids[side]), "tokens": s_tokens}
                r = res[side]
                line += (f" | {side}: ratio {r['ratio']:.3f} {r['cpu_us_per_token']:5.1f} us/token"
                         f" RSS {r['rss_mb']:.0f} MB")
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
