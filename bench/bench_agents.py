#!/usr/bin/env python3
"""Coding-agent conversations: time to first token per turn, service against llama-server.

Agents such as Claude Code send the whole conversation again on every turn. Here N
conversations (``--conversations``, default 8) run at once; on each turn every conversation
appends the previous assistant answer and a user message of new text, so that its history
grows from ``--start`` to ``--end`` tokens over ``--turns`` turns; each turn generates
``--max-tokens`` tokens (streamed OpenAI chat, temperature 0). In one run, on the same model:

- ``service``: the service (``python -m ollama_server.main``), configured for agents: its
  context the model's own (``OLLAMA_SERVER_DEFAULT_CONTEXT_SIZE``) and a KV cache shared by the
  slots that holds every conversation at once (``OLLAMA_SERVER_KV_POOL_SIZE`` = conversations
  x context); the rest its defaults (``--service-env KEY=VALUE`` adds or changes settings);
- ``plain``: ``llama-server -m <model> --port <p>``, its own defaults.

A turn runs on one side, then on the other (the order alternating per turn), all of that
side's conversations at once. Reported per turn: the median time to first token of each side,
their ratio, the median prompt and cached tokens, and requests that failed. Results also go to
``bench/results/agents-<time>.json``.

    .venv/bin/python bench/bench_agents.py [--conversations 8] [--start 4000] [--end 20000]
        [--turns 5] [--model gemma3:270m]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from bench_defaults import start  # noqa: E402
from bench_overhead import (  # noqa: E402
    free_port,
    one_stream,
    save_report,
    service_engine,
    wait_http,
)

SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "pi", "nex", "qua", "bri", "zo",
             "fen", "hal", "gru", "wen", "tor", "lys", "mar", "cor", "dex", "ul", "an")


def words(rng: random.Random, n: int) -> str:
    """``n`` made-up words: text no other conversation shares, tokenized like prose."""
    out = []
    for i in range(n):
        out.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


def tokens_per_word(port: int) -> float:
    """How many tokens the model's tokenizer makes of one made-up word (llama-server's
    /tokenize on a sample)."""
    sample = words(random.Random(0), 2000)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/tokenize",
                                 data=json.dumps({"content": sample}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return len(json.loads(resp.read())["tokens"]) / 2000


class Conversation:
    """One conversation's history on one side, and the new text of each of its turns (the
    same on both sides: made from the conversation's number)."""

    def __init__(self, number: int, new_words: list[int]) -> None:
        rng = random.Random(1000 + number)
        self.user_texts = [f"Conversation {number}, part {t + 1}. " + words(rng, n)
                           for t, n in enumerate(new_words)]
        self.messages: list[dict] = []

    def turn(self, port: int, model: str, t: int, max_tokens: int) -> dict:
        self.messages.append({"role": "user", "content": self.user_texts[t]})
        body = json.dumps({"model": model, "messages": self.messages, "max_tokens": max_tokens,
                           "temperature": 0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        result = one_stream(port, body, errors_ok=True)
        # A failed turn leaves the user message unanswered: the next turn adds its own text to
        # the same history, as an agent retrying would.
        if result.get("error") is None:
            self.messages.append({"role": "assistant", "content": result["text"]})
        return result


def run_turn(port: int, model: str, conversations: list[Conversation], t: int,
             max_tokens: int) -> list[dict]:
    """Turn ``t`` of every conversation at once; their results in conversation order."""
    results: list[dict] = [{} for _ in conversations]

    def worker(i: int) -> None:
        results[i] = conversations[i].turn(port, model, t, max_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def ms(x: float | None) -> str:
    return f"{x:.0f}" if x is not None else "-"


def summary(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("error") is None]
    return {"ttft_ms": 1000 * statistics.median(r["ttft"] for r in ok) if ok else None,
            "ttft_ms_all": [round(1000 * r["ttft"], 1) for r in ok],
            "prompt_tokens": statistics.median(r["prompt_tokens"] for r in ok) if ok else None,
            "cached_tokens": statistics.median(r["cached_tokens"] for r in ok) if ok else None,
            "errors": [r["error"] for r in results if r.get("error") is not None]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / "models"))
    ap.add_argument("--model", default="gemma3:270m")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--start", type=int, default=4000, help="tokens of history on turn 1")
    ap.add_argument("--end", type=int, default=20000, help="tokens of history on the last turn")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn")
    ap.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                    help="another setting for the service (OLLAMA_SERVER_...)")
    ap.add_argument("--logs", help="a folder for the engines' logs: the service's at DEBUG "
                    "(its engine's lines included), llama-server's stderr")
    args = ap.parse_args()
    if args.turns < 2 or args.end < args.start:
        ap.error("needs --turns 2 or more and --end at least --start")

    _, info, settings, _ = service_engine(args.model_dir, args.model)
    context = info.context_length or 8192
    service_env = {"OLLAMA_SERVER_LOG_LEVEL": "WARNING", "OLLAMA_SERVER_KEEP_ALIVE": "-1",
                   "OLLAMA_SERVER_DEFAULT_CONTEXT_SIZE": str(context),
                   "OLLAMA_SERVER_KV_POOL_SIZE": str(args.conversations * context)}
    for item in args.service_env:
        key, _, value = item.partition("=")
        service_env[key if key.startswith("OLLAMA_") else "OLLAMA_SERVER_" + key.upper()] = value
    plain_cmd = [str(settings.binary), "-m", str(info.path), "--port", str(free_port())]
    service_port = free_port()
    service_cmd = [sys.executable, "-m", "ollama_server.main", "--model-dir", args.model_dir,
                   "--port", str(service_port)]
    logs = []
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
        service_env.update(OLLAMA_SERVER_LOG_LEVEL="DEBUG", OLLAMA_SERVER_LOG_DIR=args.logs)
        logs.append(open(Path(args.logs) / "llama-server.log", "wb"))
        plain = subprocess.Popen(plain_cmd + ["-lv", "4"], stdout=subprocess.DEVNULL,
                                 stderr=logs[0], start_new_session=True, cwd=ROOT)
    else:
        plain = start(plain_cmd)
    sides = {"service": (start(service_cmd, env=dict(os.environ, **service_env)), service_port),
             "plain": (plain, int(plain_cmd[-1]))}
    print("service:", " ".join(f"{k}={v}" for k, v in service_env.items()
                               if k.startswith("OLLAMA_SERVER_")), flush=True)
    print("plain  :", " ".join(plain_cmd), flush=True)
    report: dict = {"model": info.name, "conversations": args.conversations,
                    "start": args.start, "end": args.end, "turns": args.turns,
                    "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(),
                    "service_env": {k: v for k, v in service_env.items()
                                    if k.startswith("OLLAMA_SERVER_")},
                    "plain_cmd": plain_cmd[:1] + ["-m", info.name] + plain_cmd[3:],
                    "date": time.strftime("%Y-%m-%d %H:%M"), "results": []}
    try:
        for _, port in sides.values():
            wait_http(port, "/health", timeout=300)
        per_word = tokens_per_word(sides["plain"][1])
        # Each turn adds the same number of tokens, the previous answer's included.
        targets = [args.start + (args.end - args.start) * t // (args.turns - 1)
                   for t in range(args.turns)]
        new_tokens = [targets[0]] + [max(16, b - a - args.max_tokens - 8)
                                     for a, b in zip(targets, targets[1:], strict=False)]
        new_words = [max(1, round(n / per_word)) for n in new_tokens]
        conversations = {name: [Conversation(i, new_words) for i in range(args.conversations)]
                         for name in sides}
        for _, port in sides.values():  # warm up (the service loads its model here)
            one_stream(port, json.dumps({"model": info.name, "max_tokens": 2, "stream": True,
                                         "messages": [{"role": "user", "content": "Hi"}]
                                         }).encode())
        print(f"\n{args.conversations} conversations, {args.start} -> {args.end} tokens in "
              f"{args.turns} turns, {args.max_tokens} tokens per answer, {info.name}, "
              f"{os.cpu_count()} CPUs")
        print(f"{'turn':>4} {'history':>8} {'service ms':>11} {'plain ms':>10} {'ratio':>6} "
              f"{'cached svc/plain':>17} {'errors svc/plain':>17}", flush=True)
        for t in range(args.turns):
            order = list(sides.items())
            row: dict = {"turn": t + 1, "target_tokens": targets[t]}
            for name, (_, port) in order if t % 2 == 0 else order[::-1]:
                began = time.perf_counter()
                row[name] = summary(run_turn(port, info.name, conversations[name], t,
                                             args.max_tokens))
                row[name]["wall_s"] = round(time.perf_counter() - began, 1)
            svc, plain_row = row["service"], row["plain"]
            row["ratio"] = (svc["ttft_ms"] / plain_row["ttft_ms"]
                            if svc["ttft_ms"] and plain_row["ttft_ms"] else None)
            report["results"].append(row)
            history = svc["prompt_tokens"] or plain_row["prompt_tokens"] or 0
            ratio = f"{row['ratio']:.2f}" if row["ratio"] else "-"
            print(f"{t + 1:4d} {history:8.0f} {ms(svc['ttft_ms']):>11} "
                  f"{ms(plain_row['ttft_ms']):>10} {ratio:>6} "
                  f"{ms(svc['cached_tokens']):>8}/{ms(plain_row['cached_tokens']):<8} "
                  f"{len(svc['errors']):>8}/{len(plain_row['errors']):<8}", flush=True)
    finally:
        for proc, _ in sides.values():
            try:
                os.killpg(proc.pid, 15)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        for fh in logs:
            fh.close()
    later = [r["ratio"] for r in report["results"][1:] if r["ratio"] is not None]
    if later:
        report["later_turns_ratio_max"] = max(later)
        print(f"\nturns after the first: ratio {min(later):.2f}-{max(later):.2f} "
              f"(goal: at most 0.3)")
    for row in report["results"]:
        for name in sides:
            for error in dict.fromkeys(row[name]["errors"]):
                print(f"turn {row['turn']} {name}: {error}")
    save_report(report, "agents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
