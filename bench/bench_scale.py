#!/usr/bin/env python3
"""Scale-out behind HAProxy (issue 21): one instance direct, and 1, 2 and 3 behind the balancer.

For each engine kind and each cluster size, the cluster is started the way an operator starts
it (``python -m ollama_server.cluster run --instances N``, with a configuration of its own in a
temporary folder: one worker per instance unless ``--workers``, the model preloaded, logs in
the temporary folder), and the same streamed OpenAI chat requests are sent, ``--requests`` of
them per concurrency level with that many in flight at once (closed loop):

- in the 1-instance cluster, to instance 1's own port (``direct``) and through HAProxy, in
  ``--rounds`` interleaved rounds (alternating which goes first, so drift hits both alike);
- in the larger clusters, through HAProxy.

Engine kinds: the stand-in engine (bench/fake_engine.py as every instance's llama-server),
``paced`` (one token per stream every 3 ms, like a batched GPU engine: the engine bounds the
rate, and the figures show what the balancer adds) and ``bulk`` (every token as fast as the
socket takes it: the relay and the cores bound the rate, and the figures show how far more
instances go); and the real engine (llama-server on ``--model``, ``--real-parallel`` slots per
instance and a small context, so that three engines fit in memory).

Reported per run: aggregate tokens/s (all tokens over the batch's wall time) and its ratio to
``direct`` at the same engine and concurrency; the median and p90 time to first token (from
opening the connection to the first content token) and the median's difference to
``direct``; how the requests spread over the instances (``X-Served-By``: one model name is
hashed to one instance until it runs ``cluster_hash_balance_factor`` percent above the
average, so the spread is measured, not assumed); and the cores each process group used
meanwhile (from /proc: HAProxy, the instances' service processes, their engines, the cluster
supervisor, this load generator, and the whole machine, whoever else runs on it). Then, per
engine kind and concurrency, how tokens/s grew with instances and how busy the machine was,
and the two goals of the issue: HAProxy adds at most 0.5 ms to the median time to first token
(1 instance vs direct), and with the stand-in engine tokens/s grow with instances until the
cores run out. A JSON report goes to ``bench/results/scale-<time>.json``.

Only the models in ``--model-dir`` can be named (the stand-in engine is started by the service
for a model it knows), so every request names the same model, as one model's traffic would.

Each round of a level sends at least as many requests as the level's concurrency.

    .venv/bin/python bench/bench_scale.py [--engine fake|real|both] [--mode paced bulk]
        [--instances 1 2 3] [--concurrency 8 32 64] [--requests N] [--tokens N]
        [--rounds 2] [--workers 1] [--real-parallel 8] [--context-size 4096]
        [--engine-threads 0] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import fake_engine  # noqa: E402
from bench_overhead import free_port, save_report  # noqa: E402

from ollama_server.cluster import AGENT_OFFSET, Cluster, Instance  # noqa: E402
from ollama_server.config import load_config  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
TOKEN = b'"delta":{"content":'  # one content chunk of the OpenAI stream: one token
USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')
PROMPT = "Write a long story about a lighthouse keeper and the sea."
TTFT_GOAL_MS = 0.5  # the balancer's most added median time to first token (issue 21)
GROWTH = 1.05  # tokens/s "grow" with one more instance when they rise by 5% or more
GROUPS = ("haproxy", "instances", "engines", "supervisor", "loadgen", "machine")

SATURATED = 0.9  # the machine is out of cores when this share of them is busy
# Per engine kind when --tokens / --requests are not given: the paced stand-in streams a token
# per 3 ms, the bulk one some 30,000 tokens/s in all (more requests, so its CPU figures are
# not a handful of 10 ms ticks), the real engine about 100 tokens/s in all on two cores.
DEFAULTS = {"fake-paced": {"tokens": 256, "requests": 128},
            "fake-bulk": {"tokens": 256, "requests": 512},
            "real": {"tokens": 32, "requests": 32}}
QUICK = {"engine": "fake", "mode": ["paced"], "instances": [1, 2], "concurrency": [8],
         "requests": 16, "tokens": 64}


# --- the load generator ----------------------------------------------------------------------

@dataclass
class Stream:
    """One streamed request as the client saw it."""

    ttft: float | None = None  # seconds from connecting to the first content token
    tokens: int = 0
    served_by: str = "?"
    error: str | None = None


def request_bytes(port: int, body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n"
            b"\r\n%s" % (port, len(body), body))


async def one_stream(port: int, request: bytes) -> Stream:
    """Send one streamed chat request; time its first content token, count its tokens (the
    usage chunk's count, else one per content chunk), read ``X-Served-By`` from its head."""
    out = Stream()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = b""
        while b"\r\n\r\n" not in head:
            data = await reader.read(65536)
            if not data:
                out.error = "connection closed before the response head"
                return out
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "x-served-by":
                out.served_by = value.strip()
        if status != 200:
            out.error = f"HTTP {status}: {(rest + await reader.read(2048))[:200]!r}"
            return out
        chunks, tail, buf = 0, b"", rest
        while True:
            if buf:
                window = tail + buf
                found = window.count(TOKEN) - tail.count(TOKEN)
                if found and out.ttft is None:
                    out.ttft = time.perf_counter() - t0
                chunks += found
                tail = window[-4096:]  # holds the usage chunk at the end
                if b"data: [DONE]" in window:
                    break
            buf = await reader.read(65536)
            if not buf:
                break
        usage = USAGE.findall(tail)
        out.tokens = int(usage[-1]) if usage else chunks
        if out.ttft is None:
            out.error = "no content token"
    finally:
        writer.close()
    return out


async def batch(port: int, body: bytes, concurrency: int, requests: int,
                timeout: float) -> tuple[list[Stream], float]:
    """``requests`` streams, ``concurrency`` of them in flight at once; their wall time."""
    request = request_bytes(port, body)
    left = requests
    streams: list[Stream] = []

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                streams.append(await asyncio.wait_for(one_stream(port, request), timeout))
            except (TimeoutError, OSError, ValueError, IndexError) as exc:
                streams.append(Stream(error=f"{type(exc).__name__}: {exc}"))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, requests))))
    return streams, time.perf_counter() - t0


def chat_body(model: str, tokens: int) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()


# --- CPU accounting from /proc ---------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                kids.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name))
            except (OSError, IndexError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def group_of(pid: int, supervisor: int) -> str:
    """Which part of the cluster a process is: haproxy, engines (llama-server or the
    stand-in), the supervisor (``ollama_server.cluster``), else the instances' own."""
    if pid == supervisor:
        return "supervisor"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    names = [os.path.basename(a) for a in argv[:2]]
    if b"haproxy" in names:
        return "haproxy"
    if b"llama-server" in names or b"fake_engine.py" in names:
        return "engines"
    return "instances"


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK


def loadgen_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def cpu_snapshot(supervisor: int) -> dict[str, Any]:
    """Each process's group and CPU seconds, this process's, and the machine's."""
    procs: dict[int, tuple[str, float]] = {}
    for pid in descendants(supervisor):
        try:
            fields = _stat_fields(pid)
            procs[pid] = (group_of(pid, supervisor), (int(fields[11]) + int(fields[12])) / CLK)
        except (OSError, IndexError):
            continue  # it exited meanwhile
    return {"procs": procs, "loadgen": loadgen_s(), "machine": machine_busy_s()}


def cpu_used(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU seconds per group between two snapshots (a process started meanwhile counts whole;
    one that exited meanwhile is lost)."""
    used = dict.fromkeys(GROUPS, 0.0)
    for pid, (group, cpu) in after["procs"].items():
        used[group] += cpu - before["procs"].get(pid, (group, 0.0))[1]
    used["loadgen"] = after["loadgen"] - before["loadgen"]
    used["machine"] = after["machine"] - before["machine"]
    return used


# --- one cluster -----------------------------------------------------------------------------

def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(count: int) -> int:
    """A balancer port whose instance and agent ports (port+1.., port+101..) are free too."""
    for _ in range(200):
        port = free_port()
        if port + AGENT_OFFSET + count > 65535:
            continue
        wanted = [port + i for i in range(1, count + 1)]
        wanted += [port + AGENT_OFFSET + i for i in range(1, count + 1)]
        if all(_port_free(p) for p in wanted):
            return port
    raise SystemExit("no free run of ports found for the cluster")


def http_get(port: int, path: str) -> tuple[int | None, dict[str, Any]]:
    """A GET's status and JSON body ({} when not JSON); (None, {}) when nothing answers."""
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        resp = conn.getresponse()
        status, data = resp.status, resp.read()
        conn.close()
    except OSError:
        return None, {}
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    return status, body if isinstance(body, dict) else {}


def haproxy_servers(sock_path: Path) -> dict[str, str]:
    """by_load's servers and their status on HAProxy's stats socket (``show stat``)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        sock.connect(str(sock_path))
        sock.sendall(b"show stat\n")
        text = sock.makefile().read()
    lines = text.splitlines()
    header = lines[0].lstrip("# ").split(",") if lines else []
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {r["svname"]: r.get("status", "") for r in rows
            if r.get("pxname") == "by_load" and r.get("svname") not in ("FRONTEND", "BACKEND")}


@dataclass
class Setup:
    """What one cluster is started with."""

    kind: str  # fake-paced, fake-bulk, real
    count: int
    model: str
    model_dir: str
    workers: int
    parallel: int
    threads_http: int
    context_size: int | None
    engine_threads: int
    llama_cpp_dir: str | None
    ready_timeout: float
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)


class RunningCluster:
    """``python -m ollama_server.cluster run`` for one Setup: started and ready on enter
    (every instance's /health/ready, HAProxy's port, every server UP on HAProxy's socket),
    stopped with SIGTERM on exit (then the whole process group killed if it lingers)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.port = cluster_port(setup.count)
        self.dir = setup.workdir / f"{setup.kind}-n{setup.count}"
        self.dir.mkdir(parents=True)
        settings: dict[str, Any] = {
            "models_dir": setup.model_dir, "default_model": setup.model,
            "preload": [setup.model], "keep_alive": -1, "workers": str(setup.workers),
            "parallel": setup.parallel, "threads_http": setup.threads_http,
            "log_dir": str(self.dir / "logs"), "log_level": "WARNING",
            "shutdown_timeout": 10, "port": self.port}
        if setup.context_size:
            settings["default_context_size"] = setup.context_size
        if setup.engine_threads:
            settings["threads"] = setup.engine_threads
        if setup.llama_cpp_dir:
            settings["llama_cpp_path"] = setup.llama_cpp_dir
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(json.dumps(settings, indent=2))  # JSON is YAML
        # The cluster's own view of the layout: instance ports and names, HAProxy's socket.
        layout = Cluster(load_config(self.config_path, environ=setup.env), setup.count, [],
                         say=lambda _line: None)
        self.instances: list[Instance] = layout.instances
        self.socket = layout.socket
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RunningCluster:
        cmd = [sys.executable, "-m", "ollama_server.cluster", "run", "--config",
               str(self.config_path), "--instances", str(self.setup.count), "--port",
               str(self.port), "--ready-timeout", str(self.setup.ready_timeout)]
        log = open(self.dir / "cluster.log", "ab")  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.setup.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.setup.ready_timeout
        checks = [(inst.name, inst.port, "/health/ready") for inst in self.instances]
        checks.append(("haproxy", self.port, "/health/ready"))
        for name, port, path in checks:
            while True:
                status, body = http_get(port, path)
                if status == 200:
                    break
                if body.get("status") == "unhealthy":  # its model failed: no use waiting
                    raise SystemExit(f"{name} on port {port} is unhealthy: {body.get('error')}; "
                                     f"see {self.dir / 'logs'}")
                self._check_alive(deadline, f"{name} on port {port}")
                time.sleep(0.2)
        # HAProxy's own health checks and agents: every server UP before any load.
        while True:
            try:
                states = haproxy_servers(self.socket)
            except OSError:
                states = {}
            if len(states) == self.setup.count and all(s.startswith("UP")
                                                       for s in states.values()):
                return
            self._check_alive(deadline, f"haproxy's servers ({states or 'no socket yet'})")
            time.sleep(0.2)

    def _check_alive(self, deadline: float, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise SystemExit(f"the cluster exited ({self.proc.returncode}) before {what} was "
                             f"ready; see {self.dir / 'cluster.log'} and {self.dir / 'logs'}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not ready within {self.setup.ready_timeout:.0f}s; see "
                             f"{self.dir / 'cluster.log'} and {self.dir / 'logs'}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print("  the cluster did not stop within 60s; killing its process group",
                  file=sys.stderr)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


# --- measuring -------------------------------------------------------------------------------

@dataclass
class Tally:
    """One target at one concurrency, over its rounds."""

    streams: list[Stream] = field(default_factory=list)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0.0))
    round_ttft_ms: list[float] = field(default_factory=list)  # each round's median

    def add(self, streams: list[Stream], wall: float, cpu: dict[str, float]) -> None:
        self.streams += streams
        self.wall += wall
        for group, seconds in cpu.items():
            self.cpu[group] += seconds
        ttft = [s.ttft for s in streams if s.error is None and s.ttft is not None]
        if ttft:
            self.round_ttft_ms.append(1000 * statistics.median(ttft))

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.streams if s.error is None]
        ttft = sorted(1000 * s.ttft for s in ok if s.ttft is not None)
        tokens = sum(s.tokens for s in ok)
        errors = Counter(s.error for s in self.streams if s.error is not None)
        return {
            "requests": len(self.streams), "errors": sum(errors.values()),
            "error_kinds": dict(errors.most_common(3)), "tokens": tokens,
            "wall_s": self.wall, "tokens_per_s": tokens / self.wall if self.wall else 0.0,
            "ttft_ms_median": statistics.median(ttft) if ttft else None,
            "ttft_ms_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] if ttft else None,
            "ttft_ms_round_medians": self.round_ttft_ms,
            "spread": dict(sorted(Counter(s.served_by for s in self.streams).items())),
            "cores": {g: s / self.wall if self.wall else 0.0 for g, s in self.cpu.items()}}


def measure_cluster(cluster: RunningCluster, kind: str, body: bytes, args: argparse.Namespace,
                    requests: int, rows: list[dict[str, Any]]) -> None:
    """Every concurrency level on one running cluster, appended to ``rows`` (the report's)
    and printed as they come."""
    assert cluster.proc is not None
    supervisor = cluster.proc.pid
    targets = [("haproxy", cluster.port)]
    if cluster.setup.count == 1:
        targets.insert(0, ("direct", cluster.instances[0].port))
    warm = chat_body(cluster.setup.model, 8)
    for name, port in targets:  # first connections, first requests of each worker and engine
        streams, _ = asyncio.run(batch(port, warm, 2 * cluster.setup.count,
                                       4 * cluster.setup.count, 120))
        failed = [s.error for s in streams if s.error is not None]
        if failed:
            raise SystemExit(f"{kind}, {cluster.setup.count} instance(s), {name}: the warm-up "
                             f"failed ({len(failed)} of {len(streams)}): {failed[0]}")
    for c in args.concurrency:
        # At least c per round, else fewer than c would ever be in flight at once.
        per_round = max(c, -(-requests // args.rounds))
        tallies = {name: Tally() for name, _ in targets}
        for r in range(args.rounds):
            for name, port in targets if r % 2 == 0 else targets[::-1]:
                before = cpu_snapshot(supervisor)
                streams, wall = asyncio.run(batch(port, body, c, per_round,
                                                  args.request_timeout))
                tallies[name].add(streams, wall, cpu_used(before, cpu_snapshot(supervisor)))
        for name, _ in targets:
            row = {"engine": kind, "instances": cluster.setup.count, "target": name,
                   "concurrency": c, **tallies[name].summary()}
            rows.append(row)
            compare_to_direct(rows)
            print(format_row(row), flush=True)
            if row["errors"]:
                print(f"    errors: {row['error_kinds']}", flush=True)


def compare_to_direct(rows: list[dict[str, Any]]) -> None:
    """Each balanced row's tokens/s ratio and median TTFT difference to ``direct`` (same
    engine kind and concurrency), and the per-round paired TTFT differences at 1 instance."""
    direct = {(r["engine"], r["concurrency"]): r for r in rows if r["target"] == "direct"}
    for row in rows:
        d = direct.get((row["engine"], row["concurrency"]))
        if d is None:
            continue
        row["ratio"] = row["tokens_per_s"] / d["tokens_per_s"] if d["tokens_per_s"] else None
        if row["ttft_ms_median"] is not None and d["ttft_ms_median"] is not None:
            row["ttft_added_ms"] = row["ttft_ms_median"] - d["ttft_ms_median"]
        if row["target"] == "haproxy" and row["instances"] == 1:
            row["ttft_added_ms_rounds"] = [
                h - x for h, x in zip(row["ttft_ms_round_medians"],
                                      d["ttft_ms_round_medians"], strict=False)]


# --- reporting -------------------------------------------------------------------------------

HEADER = (f"{'engine':10} {'inst':>4} {'c':>3} {'target':7} {'tok/s':>8} {'ratio':>6} "
          f"{'TTFT p50':>8} {'p90':>7} {'+ms':>6}  {'cores: hapx inst  eng  sup  gen  all':36} "
          f"spread")


def _num(value: float | None, fmt: str, width: int) -> str:
    return format(value, fmt).rjust(width) if value is not None else "-".rjust(width)


def format_row(row: dict[str, Any]) -> str:
    cores = row["cores"]
    spread = " ".join(f"{k}:{v}" for k, v in row["spread"].items())
    err = f" ERRORS {row['errors']}" if row["errors"] else ""
    return (f"{row['engine']:10} {row['instances']:4d} {row['concurrency']:3d} "
            f"{row['target']:7} {row['tokens_per_s']:8.0f} {_num(row.get('ratio'), '.3f', 6)} "
            f"{_num(row['ttft_ms_median'], '.2f', 8)} {_num(row['ttft_ms_p90'], '.2f', 7)} "
            f"{_num(row.get('ttft_added_ms'), '+.2f', 6)}        "
            f"{cores['haproxy']:4.2f} {cores['instances']:4.2f} {cores['engines']:4.2f} "
            f"{cores['supervisor']:4.2f} {cores['loadgen']:4.2f} {cores['machine']:4.2f}  "
            f"{spread}{err}")


def scaling(rows: list[dict[str, Any]], cpu_count: int) -> list[dict[str, Any]]:
    """Per engine kind and concurrency: tokens/s through HAProxy by instance count, how many
    instances took requests, how busy the machine was (and our processes' share of it), up to
    which count tokens/s grew (by GROWTH each step), and from which count the machine was out
    of cores (SATURATED of them busy). ``grows_until_out_of_cores``: every step from a count
    whose machine still had cores to spare raised tokens/s by GROWTH."""
    out = []
    for kind in dict.fromkeys(r["engine"] for r in rows):
        for c in dict.fromkeys(r["concurrency"] for r in rows):
            balanced = sorted((r for r in rows if r["engine"] == kind and r["concurrency"] == c
                               and r["target"] == "haproxy"), key=lambda r: r["instances"])
            if len(balanced) < 2:
                continue
            best = balanced[0]
            for row in balanced[1:]:
                if row["tokens_per_s"] < best["tokens_per_s"] * GROWTH:
                    break
                best = row
            full = [r["instances"] for r in balanced
                    if r["cores"]["machine"] >= SATURATED * cpu_count]
            grows = all(b["tokens_per_s"] >= a["tokens_per_s"] * GROWTH
                        for a, b in pairwise(balanced)
                        if a["cores"]["machine"] < SATURATED * cpu_count)
            out.append({
                "engine": kind, "concurrency": c,
                "tokens_per_s": {r["instances"]: round(r["tokens_per_s"]) for r in balanced},
                "instances_used": {r["instances"]: sum(1 for n in r["spread"].values() if n)
                                   for r in balanced},
                "machine_cores": {r["instances"]: round(r["cores"]["machine"], 2)
                                  for r in balanced},
                "our_cores": {r["instances"]: round(sum(v for g, v in r["cores"].items()
                                                        if g != "machine"), 2)
                              for r in balanced},
                "grows_up_to_instances": best["instances"],
                "out_of_cores_from_instances": full[0] if full else None,
                "grows_until_out_of_cores": grows, "cpu_count": cpu_count})
            if kind == "fake-paced":  # the stand-in's own bound: one token per stream per step
                out[-1]["engine_bound_tokens_per_s"] = round(c / fake_engine.STEP_S)
    return out


def goals(rows: list[dict[str, Any]], scale: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two goals, each per engine kind and concurrency."""
    ttft = [{"engine": r["engine"], "concurrency": r["concurrency"],
             "added_ms": r.get("ttft_added_ms"),
             "met": r.get("ttft_added_ms") is not None and r["ttft_added_ms"] <= TTFT_GOAL_MS}
            for r in rows if r["target"] == "haproxy" and r["instances"] == 1]
    return {"ttft_added_ms_at_most": TTFT_GOAL_MS, "ttft": ttft,
            "stand_in_scaling": [{"engine": s["engine"], "concurrency": s["concurrency"],
                                  "met": s["grows_until_out_of_cores"]}
                                 for s in scale if s["engine"].startswith("fake")]}


def print_summary(report: dict[str, Any]) -> None:
    rows = report["rows"]
    print(f"\n{report['model']}, {report['cpu_count']} CPUs, workers {report['workers']} per "
          f"instance, {report['rounds']} rounds; tokens per stream and requests per level: "
          + ", ".join(f"{k} {v['tokens']}/{v['requests']}" for k, v in report["sizes"].items()))
    print("ratio and +ms: against `direct` (instance 1's own port, 1-instance cluster) at the "
          "same engine and c;\ncores: CPU used over the batch's wall time by HAProxy, the "
          "instances' service processes, their engines, the cluster supervisor, this load "
          "generator, and the whole machine (others' work included)\n")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    if report["scaling"]:
        print(f"\ntokens/s through HAProxy by instances (instances that took requests; cores "
              f"busy of {report['cpu_count']}: whole machine / ours):")
    for s in report["scaling"]:
        steps = ", ".join(f"{n}: {tps} ({s['instances_used'][n]} used; "
                          f"{s['machine_cores'][n]:.2f}/{s['our_cores'][n]:.2f})"
                          for n, tps in s["tokens_per_s"].items())
        out = s["out_of_cores_from_instances"]
        bound = s.get("engine_bound_tokens_per_s")
        print(f"  {s['engine']:10} c={s['concurrency']:<3} {steps}; grow up to "
              f"{s['grows_up_to_instances']}; out of cores "
              + (f"from {out}" if out else "at none")
              + (f"; the paced engine's bound {bound}" if bound else ""))
    print(f"\ngoal: HAProxy adds at most {TTFT_GOAL_MS} ms to the median TTFT (1 instance vs "
          "direct):")
    for g in report["goals"]["ttft"]:
        added = "-" if g["added_ms"] is None else f"{g['added_ms']:+.2f} ms"
        print(f"  {g['engine']:10} c={g['concurrency']:<3} {added:>10}  "
              f"{'met' if g['met'] else 'NOT met'}")
    if report["goals"]["stand_in_scaling"]:
        print("goal: with the stand-in engine, tokens/s grow with instances until the machine "
              "is out of cores:")
    for g in report["goals"]["stand_in_scaling"]:
        print(f"  {g['engine']:10} c={g['concurrency']:<3} {'met' if g['met'] else 'NOT met'}")


# --- main ------------------------------------------------------------------------------------

def clean_env(kind: str) -> dict[str, str]:
    """This environment without the service's variables (they would override the cluster's
    configuration file), plus the stand-in engine's mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    if kind.startswith("fake-"):
        env["FAKE_ENGINE_MODE"] = kind.split("-", 1)[1]
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["fake", "real", "both"], default=None,
                    help="the stand-in engine, the real one, or both (default both)")
    ap.add_argument("--mode", nargs="+", choices=["paced", "bulk"], default=None,
                    help="the stand-in engine's pacing, each its own run (default both)")
    ap.add_argument("--instances", type=int, nargs="+", default=None,
                    help="cluster sizes (default 1 2 3); 1 also measures `direct`")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="streams in flight at once (default 8 32 64)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per concurrency level and target, over all rounds, at "
                         "least the concurrency per round "
                         "(default: " + ", ".join(f"{k} {v['requests']}"
                                                  for k, v in DEFAULTS.items()) + ")")
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens per stream (default: " + ", ".join(
                        f"{k} {v['tokens']}" for k, v in DEFAULTS.items()) + ")")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved rounds per level (direct and HAProxy alternate first)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes per instance")
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--model-dir", default=str(ROOT / "models"))
    ap.add_argument("--llama-cpp-dir", default=None,
                    help="the real engine's llama.cpp build (default: the service's own search)")
    ap.add_argument("--real-parallel", type=int, default=8,
                    help="the real engine's slots per instance (more streams queue)")
    ap.add_argument("--context-size", type=int, default=4096,
                    help="the real engine's context, shared by its slots")
    ap.add_argument("--engine-threads", type=int, default=0,
                    help="the real engine's CPU threads per instance (default 0: llama-server's "
                         "choice, every physical core, so instances share the cores)")
    ap.add_argument("--ready-timeout", type=float, default=300.0,
                    help="seconds a cluster may take to be ready")
    ap.add_argument("--request-timeout", type=float, default=300.0,
                    help="seconds one stream may take")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: stand-in paced only, instances 1 2, c=8, 16 requests of "
                         "64 tokens (flags given still win)")
    args = ap.parse_args(argv)
    base = {"engine": "both", "mode": ["paced", "bulk"], "instances": [1, 2, 3],
            "concurrency": [8, 32, 64]}
    for key, value in (QUICK if args.quick else base).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1 or min(args.instances) < 1 or min(args.concurrency) < 1:
        ap.error("--rounds, --instances and --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = ([f"fake-{m}" for m in args.mode] if args.engine in ("fake", "both") else [])
    kinds += ["real"] if args.engine in ("real", "both") else []
    sizes = {k: {key: getattr(args, key) or DEFAULTS[k][key]
                 for key in ("tokens", "requests")} for k in kinds}
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    shim_dir = fake_engine.install() if any(k.startswith("fake") for k in kinds) else None
    max_c = max(args.concurrency)
    report: dict[str, Any] = {
        "model": args.model, "cpu_count": os.cpu_count(), "workers": args.workers,
        "rounds": args.rounds, "instances": args.instances, "concurrency": args.concurrency,
        "sizes": sizes, "real_parallel": args.real_parallel,
        "real_context_size": args.context_size, "real_engine_threads": args.engine_threads,
        "quick": args.quick, "rows": []}
    print(f"logs under {workdir} (removed after a run without errors)\n{HEADER}", flush=True)
    failed = True
    try:
        for kind in kinds:
            fake = kind.startswith("fake")
            body = chat_body(args.model, sizes[kind]["tokens"])
            for count in args.instances:
                setup = Setup(
                    kind=kind, count=count, model=args.model, model_dir=args.model_dir,
                    workers=args.workers,
                    parallel=max(64, max_c) if fake else args.real_parallel,
                    threads_http=max(128, 2 * max_c), context_size=None if fake
                    else args.context_size, engine_threads=0 if fake else args.engine_threads,
                    llama_cpp_dir=str(shim_dir) if fake else args.llama_cpp_dir,
                    ready_timeout=args.ready_timeout, workdir=workdir, env=clean_env(kind))
                t0 = time.monotonic()
                with RunningCluster(setup) as cluster:
                    print(f"# {kind}, {count} instance(s): ready in "
                          f"{time.monotonic() - t0:.1f}s", flush=True)
                    measure_cluster(cluster, kind, body, args, sizes[kind]["requests"],
                                    report["rows"])
        failed = any(r["errors"] for r in report["rows"])
    finally:
        if shim_dir is not None:
            shutil.rmtree(shim_dir, ignore_errors=True)
        if failed:
            print(f"logs kept under {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["scaling"] = scaling(report["rows"], os.cpu_count() or 1)
    report["goals"] = goals(report["rows"], report["scaling"])
    print_summary(report)
    save_report(report, "scale")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
