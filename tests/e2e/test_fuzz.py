"""Property-based fuzzing of every dialect against the real service and engine (issue 12).

Hypothesis draws request bodies from each API's request schema (``fuzz_bodies``), mostly
well-formed and small, sometimes broken in every way a careless client or an attacker breaks
them, and sends them one by one to a service of its own (a copy of the test store, so that
/api/copy and /api/create cannot touch the real one; generated tokens capped at 8 through
``token_limits``). The properties, for every body:

- never a 5xx;
- an error has the dialect's error shape (OpenAI ``{"error": {message, type, param, code}}``,
  Anthropic ``{"type": "error", "error": {type, message}}``, Ollama ``{"error": "…"}``, TGI
  ``{"error", "error_type"}``);
- a 200 stream carries no error frame (TGI's validation events excepted: TGI streams them);
- the service is healthy after the run and still answers a normal request.

Seeded and bounded: ``FUZZ_SEED`` (default 12), ``FUZZ_EXAMPLES`` bodies (default 200 in
``make test``; ``make fuzz`` runs 20,000), and ``FUZZ_SECONDS`` of wall time after which the
remaining examples are skipped. Every failing body is collected (not only the first) and the
run's counts go to ``FUZZ_REPORT`` (a JSON file) when set.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, seed, settings

from ollama_server.api.validation import parse_json_body
from ollama_server.core.errors import InvalidRequest
from tests.e2e.fuzz_bodies import Case, cases
from tests.helpers import ServiceProcess

pytestmark = pytest.mark.e2e

FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "12"))
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "300"))
# Requests in flight at once: the engine batches them (its parallel slots), so a long run
# goes faster with a few; bodies are still drawn in one seeded sequence.
FUZZ_CONCURRENCY = int(os.environ.get("FUZZ_CONCURRENCY", "1"))
# Generated tokens per request: the bugs looked for are in reading input, not in long answers.
TOKEN_CAP = int(os.environ.get("FUZZ_TOKEN_CAP", "4"))


def clone_store(src: Path, dst: Path) -> Path:
    """A store whose manifests are copies and whose blobs are links to ``src``'s (the store
    writes by temp file and rename, and deletes by unlink: the originals are never touched)."""
    shutil.copytree(src / "manifests", dst / "manifests")
    (dst / "blobs").mkdir(parents=True)
    for blob in (src / "blobs").iterdir():
        (dst / "blobs" / blob.name).symlink_to(blob.resolve())
    return dst


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory, real_models, engine_binary):
    tmp = tmp_path_factory.mktemp("fuzz")
    store = clone_store(real_models, tmp / "models")
    svc = ServiceProcess(tmp, store, extra_env={
        "OLLAMA_SERVER_TOKEN_LIMITS": json.dumps({"*": {"cap": TOKEN_CAP}})})
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


def expected_dialect(case: Case) -> str:
    """The dialect whose error shape the answer must have; /generate and /tokenize are
    shared by TGI and vLLM and told apart by the body, as the service does."""
    if case.path not in ("/generate", "/tokenize"):
        return case.dialect
    try:  # a body the service cannot take is refused before it is dispatched by its keys
        parsed = parse_json_body(case.body, 64)
    except InvalidRequest:
        parsed = None
    if not isinstance(parsed, dict):
        return "tgi" if case.path == "/generate" else "openai"
    if case.path == "/generate":
        return "openai" if "inputs" not in parsed and "prompt" in parsed else "tgi"
    return "tgi" if "inputs" in parsed else "openai"


def error_shape_problem(dialect: str, body: object) -> str | None:
    """Why ``body`` is not an error of ``dialect`` (None when it is)."""
    if dialect == "openai":
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}:
            return None
    elif dialect == "anthropic":
        if (isinstance(body, dict) and body.get("type") == "error"
                and isinstance(body.get("error"), dict)
                and set(body["error"]) == {"type", "message"}):
            return None
    elif dialect == "tgi":
        if isinstance(body, dict) and set(body) == {"error", "error_type"}:
            return None
    elif isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str):
        return None
    return f"not a {dialect} error body"


def stream_problem(dialect: str, text: str) -> str | None:
    """An error frame inside a 200 stream (TGI's validation events are TGI's own way)."""
    for line in text.split("\n"):  # SSE and NDJSON end lines with \n only
        payload = line[5:].strip() if line.startswith("data:") else line.strip()
        if not payload.startswith("{"):
            continue
        try:
            obj = json.loads(payload)
        except ValueError:
            return f"a frame is not JSON: {payload[:200]}"
        if not isinstance(obj, dict):
            continue
        if obj.get("type") == "error" or "error" in obj and obj["error"]:
            if dialect == "tgi" and obj.get("error_type") in ("validation", "overloaded"):
                continue
            return f"error frame in a 200 stream: {payload[:300]}"
    return None


class Run:
    """Counts of one fuzz run and the bodies that broke a property."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.skipped = 0
        self.statuses: collections.Counter[str] = collections.Counter()
        self.by_endpoint: collections.Counter[str] = collections.Counter()
        self.seconds_by_endpoint: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.slowest: list[tuple[float, str]] = []
        self.started = time.monotonic()

    def report(self) -> dict:
        return {"seed": FUZZ_SEED, "bodies_sent": self.sent, "skipped_after_budget": self.skipped,
                "seconds": round(time.monotonic() - self.started, 1),
                "statuses": dict(sorted(self.statuses.items())),
                "by_endpoint": dict(sorted(self.by_endpoint.items())),
                "seconds_by_endpoint": {k: round(v, 1) for k, v in
                                        sorted(self.seconds_by_endpoint.items())},
                "failures": len(self.failures), "first_failures": self.failures[:20],
                "slowest": [f"{t:.1f}s {c[:300]}" for t, c in sorted(self.slowest)[-5:]]}


def check(base_url: str, case: Case, run: Run) -> None:
    """Send one case; record a failure for a 5xx, a wrong error shape or a broken stream."""
    answer = _send(base_url, case)
    with run.lock:
        _check(case, run, *answer)


def _send(base_url: str, case: Case) -> tuple[object, bytes, float]:
    started = time.monotonic()
    try:
        resp = requests.request(case.method, base_url + case.path, data=case.body,
                                headers={"Content-Type": "application/json"},
                                timeout=(10, 300), stream=True)
        content = resp.raw.read(4 << 20, decode_content=True)
        resp.close()
    except requests.RequestException as exc:
        return exc, b"", time.monotonic() - started
    return resp, content, time.monotonic() - started


def _check(case: Case, run: Run, resp: object, content: bytes, took: float) -> None:
    run.sent += 1
    run.by_endpoint[case.label] += 1
    run.seconds_by_endpoint[case.label] += took
    run.slowest = sorted([*run.slowest, (took, repr(case))])[-5:]
    if not isinstance(resp, requests.Response):
        run.failures.append(f"{case!r}: no answer: {resp}")
        return
    run.statuses[str(resp.status_code)] += 1
    run.statuses[f"{case.label} {resp.status_code}"] += 1
    dialect = expected_dialect(case)
    problem = None
    if resp.status_code >= 500:
        problem = f"status {resp.status_code}"
    elif resp.status_code >= 400:
        try:
            problem = error_shape_problem(dialect, json.loads(content))
        except ValueError:
            problem = "the error body is not JSON"
    elif "event-stream" in resp.headers.get("Content-Type", "") or \
            "ndjson" in resp.headers.get("Content-Type", ""):
        problem = stream_problem(dialect, content.decode("utf-8", "replace"))
    if problem:
        run.failures.append(f"{case!r} -> {resp.status_code} {problem}: "
                            f"{content[:400].decode('utf-8', 'replace')}")


def test_fuzz_every_dialect(fuzz_service):
    base_url = fuzz_service.base_url
    run = Run()
    deadline = time.monotonic() + FUZZ_SECONDS
    report_path = Path(os.environ["FUZZ_REPORT"]) if os.environ.get("FUZZ_REPORT") else None

    @seed(FUZZ_SEED)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def fuzz(case: Case) -> None:
        if time.monotonic() > deadline:
            run.skipped += 1
            return
        slots.acquire()  # at most FUZZ_CONCURRENCY requests in flight
        pool.submit(send, case)

    def send(case: Case) -> None:
        try:
            check(base_url, case, run)
            if report_path and run.sent % 500 == 0:  # a long run reports as it goes
                with run.lock:
                    report_path.write_text(json.dumps(run.report(), indent=2))
        finally:
            slots.release()

    slots = threading.Semaphore(FUZZ_CONCURRENCY)
    with ThreadPoolExecutor(FUZZ_CONCURRENCY) as pool:
        fuzz()
    report = run.report()
    print("fuzz run:", json.dumps({k: v for k, v in report.items() if k != "first_failures"}))
    if report_path:
        report_path.write_text(json.dumps(report, indent=2))
    assert not run.failures, "\n".join(run.failures[:20])
    assert run.sent >= min(FUZZ_EXAMPLES, 50), f"only {run.sent} bodies were sent"
    assert len(run.by_endpoint) >= 15, f"endpoints reached: {sorted(run.by_endpoint)}"
    # Healthy after: /health, and a plain request in each of two dialects.
    assert requests.get(base_url + "/health", timeout=30).status_code == 200
    chat = requests.post(base_url + "/v1/chat/completions", timeout=120, json={
        "model": "smollm2:135m", "max_tokens": 4,
        "messages": [{"role": "user", "content": "Say hi."}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    gen = requests.post(base_url + "/api/generate", timeout=120, json={
        "model": "smollm2:135m", "prompt": "Hi", "stream": False,
        "options": {"num_predict": 3}})
    assert gen.status_code == 200 and gen.json()["done"] is True
