#!/usr/bin/env python3
"""One bounded check of a CUDA engine build and of the service on it, on a GPU machine.

What it checks, each step on its own (a step that fails or runs out of time is recorded and the
next one runs), in this order:

1. ``info``: ``nvidia-smi -L``, the GPU's memory, and the engine build's ``build-info.json``
   (flags, compiler, build time, and the smoke test the build passed before it was cached).
2. ``throughput``: llama-server started directly with the service's own flags and
   ``gpu_layers`` (all layers on the GPU), and the service (``python -m ollama_server.main``,
   gunicorn as ``make run`` starts it) on the same build and model, in one run: streamed chat
   requests with ``ignore_eos`` at 1, 8 and 32 concurrent streams in interleaved rounds (the
   helpers of bench/bench_overhead.py): time to first token, per-stream decode tokens/s,
   aggregate tokens/s, and the ratios service/direct; then /api/ps (where the weights went).
3. ``split``: a ``ggml-rpc-server`` worker from the same build on 127.0.0.1 serving its CPU
   (``-d CPU``), and the service with ``model_settings`` giving the model
   ``rpc_servers: [that worker]``, ``tensor_split: 1,1`` and ``gpu_layers: 99``: one
   generation, and /api/ps must show weights on the GPU (CUDA0) and on the worker.
4. ``fit``: the service with ``gpu_layers`` unset, so llama-server's ``--fit`` decides: one
   generation and what /api/ps's ``offload`` says ``--fit`` chose.

Results go to ``<out>/gpu-check.json`` (rewritten after every step) and ``<out>/gpu-check.log``
(what was run, the figures, the tails of failed processes' output). ``--budget`` bounds the whole
run: a step is skipped when too little time is left, and one that overruns is stopped.

bench/gpu_check.sh drives this on the GPU machine (build first) and in a CPU dry run
(``GPU_CHECK_DRY=1``: the cached CPU build, small token counts, no GPU expected)::

    python bench/gpu_check.py --engine-dir BIN --model-dir ./models --out DIR [--budget 180]
                              [--tokens 256] [--concurrency 1 8 32] [--rounds 2] [--dry]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from bench_overhead import (  # noqa: E402
    free_port,
    run_batch,
    service_engine,
    summarize,
    wait_http,
)

from ollama_server.core.engine import LLAMAExecutor  # noqa: E402
from ollama_server.core.engine.report import LoadReport  # noqa: E402
from ollama_server.provision.smoke import local_request  # noqa: E402


class StepFailed(RuntimeError):
    """A step's check did not hold; the message says what was seen."""


@dataclass
class Proc:
    """A process a step started, and the file its output goes to."""

    name: str
    popen: subprocess.Popen
    out: Path


class Checker:
    """Runs the steps under one deadline and records them as they finish."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget
        self.report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "dry_run": args.dry, "model": args.model,
                                       "engine_dir": str(args.engine_dir), "steps": {}}
        self.logfile = open(self.out / "gpu-check.log", "a", buffering=1)  # noqa: SIM115
        self.procs: list[Proc] = []  # the current step's processes
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def log(self, msg: str) -> None:
        """A line to stdout and to gpu-check.log."""
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.logfile.write(line + "\n")

    def save(self) -> None:
        """Rewrite gpu-check.json (a run cut short still leaves every finished step)."""
        tmp = self.out / "gpu-check.json.tmp"
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "gpu-check.json")

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.monotonic()

    # --- processes -------------------------------------------------------------------------

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Path:
        """Start ``cmd`` in its own process group, output to a file; return that file."""
        out = self.tmp / f"{name}.out"
        self.log(f"start {name}: {' '.join(cmd)}")
        with open(out, "ab") as fh:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh,
                                     stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                     start_new_session=True)
        self.procs.append(Proc(name, popen, out))
        return out

    def stop_all(self) -> None:
        """SIGTERM every process of the step (the service stops its engines), then SIGKILL."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)  # the group: a service's engines
            except ProcessLookupError:
                pass
            proc.popen.wait()
        self.procs = []

    def tail(self, path: Path, lines: int = 25) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        """StepFailed naming the first process of the step that has died."""
        for proc in self.procs:
            code = proc.popen.poll()
            if code is not None:
                raise StepFailed(f"{proc.name} exited with code {code}: "
                                 f"{self.tail(proc.out, 1)}")

    # --- steps -----------------------------------------------------------------------------

    def step(self, name: str, fn: Callable[[dict], None], needs: float, limit: float) -> None:
        """Run one step in a thread, bounded by ``limit`` seconds and by the budget."""
        result: dict[str, Any] = {"ok": False}
        self.report["steps"][name] = result
        if self.left() < needs:
            result["skipped"] = f"{self.left():.0f}s of the budget left, the step needs {needs}s"
            self.log(f"== {name}: skipped ({result['skipped']})")
            self.save()
            return
        limit = min(limit * (3 if self.args.dry else 1), self.left() - 5)  # CPU: slower
        self.log(f"== {name} (at most {limit:.0f}s)")
        began = time.monotonic()
        error: list[BaseException] = []

        def body() -> None:
            try:
                fn(result)
            except BaseException as exc:  # noqa: BLE001 - SystemExit from the bench helpers too
                error.append(exc)

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            error.append(TimeoutError(f"still running after {limit:.0f}s: stopped"))
        tails = {p.name: self.tail(p.out) for p in self.procs}
        self.stop_all()  # also unblocks a step stuck on a stream
        thread.join(20)
        result["seconds"] = round(time.monotonic() - began, 1)
        if error:
            result["ok"] = False
            result["error"] = f"{type(error[0]).__name__}: {error[0]}"
            self.log(f"   FAILED: {result['error']}")
            for proc_name, text in tails.items():
                if text:
                    self.log(f"   --- last output of {proc_name}:\n{text}")
        else:
            result["ok"] = True
        self.log(f"== {name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']}s")
        self.save()

    def info(self, result: dict) -> None:
        for key, cmd in (("gpus", ["nvidia-smi", "-L"]),
                         ("gpu_memory", ["nvidia-smi", "--query-gpu=name,memory.total,"
                                         "memory.used,driver_version", "--format=csv"])):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
                result[key] = (out.stdout or out.stderr).strip()
            except (OSError, subprocess.SubprocessError) as exc:
                result[key] = f"not available: {exc}"
            self.log(f"{key}: {result[key]}")
        info_file = Path(self.args.engine_dir).parent / "build-info.json"
        try:
            result["build_info"] = json.loads(info_file.read_text())
        except (OSError, ValueError) as exc:
            raise StepFailed(f"no build-info.json beside the engine ({info_file}): {exc}") \
                from None
        info = result["build_info"]
        self.log(f"build: {info.get('key')} in {info.get('build_seconds')}s; smoke: "
                 f"{json.dumps(info.get('smoke'))}")
        if shutil.which("ldd"):
            out = subprocess.run(["ldd", str(Path(self.args.engine_dir) / "llama-server")],
                                 capture_output=True, text=True, timeout=20)
            result["cuda_libraries"] = [line.strip() for line in out.stdout.splitlines()
                                        if "cuda" in line or "cublas" in line]
            self.log(f"CUDA libraries linked: {result['cuda_libraries'] or 'none'}")
        if not (info.get("smoke") or {}).get("ok"):
            raise StepFailed("the build's smoke test did not pass")
        if not self.args.dry and info.get("backend") != "cuda":
            raise StepFailed(f"the engine is a {info.get('backend')} build, not a CUDA one")

    def service_env(self, **settings: str) -> dict[str, str]:
        """The environment of a service run: this build, the store, quiet logs, and
        ``settings`` as OLLAMA_SERVER_<KEY> variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_SERVER_")}
        if os.environ.get("OLLAMA_SERVER_CACHE"):
            env["OLLAMA_SERVER_CACHE"] = os.environ["OLLAMA_SERVER_CACHE"]
        env.update({"OLLAMA_SERVER_LLAMA_CPP_PATH": str(self.args.engine_dir),
                    "OLLAMA_SERVER_LOG_LEVEL": "WARNING", "OLLAMA_SERVER_KEEP_ALIVE": "-1",
                    "OLLAMA_SERVER_LOG_DIR": str(self.tmp / "logs"), "PYTHONUNBUFFERED": "1"})
        env.update({f"OLLAMA_SERVER_{k.upper()}": v for k, v in settings.items()})
        return env

    def start_service(self, name: str, env: dict[str, str]) -> int:
        port = free_port()
        self.start(name, [sys.executable, "-m", "ollama_server.main", "--model-dir",
                          self.args.model_dir, "--port", str(port)], env=env)
        self.wait_up(port, "/health", 90)
        return port

    def wait_up(self, port: int, path: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                wait_http(port, path, timeout=1)
                return
            except SystemExit:
                if time.monotonic() > end:
                    raise StepFailed(f"nothing answered on port {port}{path} in "
                                     f"{timeout:.0f}s") from None

    def ps(self, port: int) -> dict:
        status, body = request(port, "GET", "/api/ps")
        if status != 200 or not body.get("models"):
            raise StepFailed(f"/api/ps answered {status}: {body}")
        entry = body["models"][0]
        return {"devices": entry.get("devices"), "offload": entry.get("offload"),
                "size_vram": entry.get("size_vram"), "context_length":
                entry.get("context_length")}

    def generate(self, port: int, tokens: int) -> dict:
        status, body = request(port, "POST", "/api/generate", {
            "model": self.args.model, "prompt": "Write a short story about the sea.",
            "stream": False, "options": {"num_predict": tokens, "temperature": 0}},
            timeout=120)
        if status != 200 or not body.get("response"):
            raise StepFailed(f"/api/generate answered {status}: {str(body)[:300]}")
        count, ns = body.get("eval_count") or 0, body.get("eval_duration") or 0
        return {"eval_count": count,
                "decode_tps": round(count / (ns / 1e9), 1) if count and ns else None,
                "text": body["response"][:80]}

    def throughput(self, result: dict) -> None:
        a = self.args
        if self.left() < 120:  # a late build: fewer rounds rather than no figures at all
            a.rounds, a.ttft_samples = 1, min(a.ttft_samples, 5)
            result["reduced"] = f"{self.left():.0f}s left: 1 round, {a.ttft_samples} TTFT samples"
            self.log(f"throughput reduced: {result['reduced']}")
        _, info, settings, ctx = service_engine(
            a.model_dir, a.model, llama_cpp_path=str(a.engine_dir), gpu_layers=a.gpu_layers)
        direct_port = free_port()
        cmd = LLAMAExecutor(info.path, settings, ctx).command(direct_port)
        result["direct_command"] = " ".join(cmd)
        direct_out = self.start("direct-llama-server", cmd)
        service_port = self.start_service("service", self.service_env(
            gpu_layers=str(a.gpu_layers)))
        self.wait_up(direct_port, "/health", 90)
        for port in (direct_port, service_port):  # warm up: load, caches, first kernels
            run_batch(port, 2, 16, info.name)
        ttft: dict[str, list[float]] = {"direct": [], "service": []}
        sides = [("direct", direct_port), ("service", service_port)]
        for i in range(a.ttft_samples):
            for name, port in sides if i % 2 == 0 else sides[::-1]:
                ttft[name].append(run_batch(port, 1, 2, info.name)["ttft"][0])
        if a.ttft_samples:
            d, s = (1000 * statistics.median(ttft[k]) for k in ("direct", "service"))
            result["ttft_short_ms"] = {"direct": round(d, 2), "service": round(s, 2),
                                       "added": round(s - d, 2), "samples": a.ttft_samples}
            self.log(f"TTFT (2-token requests, median of {a.ttft_samples}): direct {d:.1f} ms, "
                     f"service {s:.1f} ms")
        result["levels"] = {}
        warnings = result["warnings"] = []
        for c in a.concurrency:
            batches: dict[str, list[dict]] = {"direct": [], "service": []}
            for r in range(a.rounds):
                for name, port in sides if r % 2 == 0 else sides[::-1]:
                    batch = run_batch(port, c, a.tokens, info.name)
                    if len(batch["tokens"]) != c:  # a stream failed (its thread ended)
                        self.check_alive()
                        raise StepFailed(f"{name}, {c} streams: only {len(batch['tokens'])} "
                                         f"finished")
                    if min(batch["tokens"]) < a.tokens and len(warnings) < 10:
                        warnings.append(f"{name}, {c} streams: tokens {batch['tokens']} "
                                        f"(ignore_eos not honoured?)")
                    batches[name].append(batch)
                self.check_alive()
            d, s = summarize(batches["direct"]), summarize(batches["service"])
            level = {"direct": rounded(d), "service": rounded(s),
                     "ratio_ttft": round(s["ttft_ms_median"] / d["ttft_ms_median"], 3),
                     "ratio_decode": round(s["decode_tps_median"] / d["decode_tps_median"], 3),
                     "ratio_aggregate": round(s["aggregate_tps_median"]
                                              / d["aggregate_tps_median"], 3)}
            result["levels"][f"c{c}"] = level
            self.log(f"c={c:<3} direct: TTFT {d['ttft_ms_median']:8.1f} ms, decode "
                     f"{d['decode_tps_median']:7.1f} tok/s/stream, aggregate "
                     f"{d['aggregate_tps_median']:8.1f} tok/s")
            self.log(f"c={c:<3} service: TTFT {s['ttft_ms_median']:8.1f} ms, decode "
                     f"{s['decode_tps_median']:7.1f} tok/s/stream, aggregate "
                     f"{s['aggregate_tps_median']:8.1f} tok/s")
            self.log(f"c={c:<3} service/direct: TTFT x{level['ratio_ttft']}, decode "
                     f"x{level['ratio_decode']}, aggregate x{level['ratio_aggregate']}")
        result["service_ps"] = self.ps(service_port)
        report = LoadReport()
        for line in direct_out.read_text(errors="replace").splitlines():
            report.feed(line)
        result["direct_devices"] = report.devices()
        result["gpu_memory_loaded"] = smi_memory()
        self.log(f"service /api/ps: {json.dumps(result['service_ps'])}")
        self.log(f"direct engine's devices: {json.dumps(result['direct_devices'])}")

    def split(self, result: dict) -> None:
        a = self.args
        worker_port = free_port()
        endpoint = f"127.0.0.1:{worker_port}"
        self.start("rpc-worker", [str(Path(a.engine_dir) / "ggml-rpc-server"), "-H",
                                  "127.0.0.1", "-p", str(worker_port), "-d", "CPU"])
        end = time.monotonic() + 30
        while True:
            self.check_alive()
            try:
                socket.create_connection(("127.0.0.1", worker_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise StepFailed("the RPC worker did not listen in 30s") from None
                time.sleep(0.2)
        settings = {a.model: {"rpc_servers": [endpoint], "tensor_split": "1,1",
                              "gpu_layers": 99}}
        result["model_settings"] = settings
        port = self.start_service("service-split", self.service_env(
            model_settings=json.dumps(settings)))
        result["generate"] = self.generate(port, 32)
        ps = result["ps"] = self.ps(port)
        self.log(f"split: generated {json.dumps(result['generate'])}; /api/ps {json.dumps(ps)}")
        devices = ps.get("devices") or []
        on_worker = [d for d in devices if d.get("endpoint") == endpoint and d["weights_mib"] > 0]
        on_gpu = [d for d in devices if str(d.get("name", "")).startswith("CUDA")
                  and d["weights_mib"] > 0]
        if not on_worker:
            raise StepFailed(f"no weights on the RPC worker {endpoint}: {devices}")
        if not a.dry and not on_gpu:
            raise StepFailed(f"no weights on the GPU: {devices}")

    def fit(self, result: dict) -> None:
        port = self.start_service("service-fit", self.service_env())
        result["generate"] = self.generate(port, 32)
        ps = result["ps"] = self.ps(port)
        self.log(f"fit: generated {json.dumps(result['generate'])}; offload "
                 f"{json.dumps(ps.get('offload'))}; devices {json.dumps(ps.get('devices'))}")
        if not self.args.dry and not any(str(d.get("name", "")).startswith("CUDA")
                                         and d["weights_mib"] > 0 for d in ps["devices"] or []):
            raise StepFailed(f"--fit left the GPU without weights: {ps}")


def request(port: int, method: str, path: str, body: Any = None,
            timeout: float = 30) -> tuple[int, Any]:
    return local_request(port, method, path, body, timeout)


def rounded(summary: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in summary.items()}


def smi_memory() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine-dir", required=True, type=Path,
                    help="the folder holding llama-server and ggml-rpc-server")
    ap.add_argument("--model-dir", default=str(ROOT / "models"))
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--out", required=True, help="folder for gpu-check.json and .log")
    ap.add_argument("--budget", type=float, default=180, help="seconds for the whole run")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ttft-samples", type=int, default=20)
    ap.add_argument("--gpu-layers", type=int, default=999)
    ap.add_argument("--dry", action="store_true",
                    help="a CPU build on a machine without a GPU: GPU placement not required")
    args = ap.parse_args()
    args.engine_dir = args.engine_dir.resolve()
    checker = Checker(args)
    checker.log(f"gpu check: engine {args.engine_dir}, model {args.model} in "
                f"{args.model_dir}, budget {args.budget:.0f}s{' (dry run)' if args.dry else ''}")
    # Rough costs on the GPU machine (seconds needed to start, most a step may take).
    checker.step("info", checker.info, needs=5, limit=60)
    checker.step("throughput", checker.throughput, needs=40, limit=150)
    checker.step("split", checker.split, needs=20, limit=60)
    checker.step("fit", checker.fit, needs=15, limit=45)
    steps = checker.report["steps"]
    checker.report["ok"] = all(s.get("ok") for s in steps.values())
    checker.report["failed"] = [k for k, s in steps.items() if not s.get("ok")]
    checker.save()
    checker.log(f"done: {'all steps passed' if checker.report['ok'] else 'failed or skipped: '}"
                f"{'' if checker.report['ok'] else ', '.join(checker.report['failed'])}")
    shutil.rmtree(checker.tmp, ignore_errors=True)
    return 0 if checker.report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
