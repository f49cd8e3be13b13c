"""Several worker processes in front of one engine pool (issue 22), with the real engine.

Two workers serve concurrent streams of every dialect from one llama-server; the requests of
both are seen through either; a worker killed with ``kill -9`` mid-stream costs its own
requests only (the other worker's streams complete, the engine does not restart, its slots come
back); the pool and the workers reload on SIGHUP.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid

import anthropic
import ollama
import openai
import pytest
import requests

from tests.helpers import ServiceProcess, children_of, llama_children, pid_alive, wait_for

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
PARALLEL = 4
MSGS = [{"role": "user", "content": "Count from one to twenty in words."}]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, real_models, engine_binary):
    svc = ServiceProcess(tmp_path_factory.mktemp("workers"), real_models,
                         args=["--parallel", str(PARALLEL)],
                         extra_env={"OLLAMA_SERVER_WORKERS": "2", "OLLAMA_MAX_QUEUE": "64"})
    svc.ready_or_stopped()
    yield svc
    pool = roles(svc)[0]
    engines = llama_children(pool)
    code = svc.stop()
    assert not [p for p in engines + [pool] if pid_alive(p)], "left running after the stop"
    assert code == 0, svc.log()


def roles(svc: ServiceProcess) -> tuple[int, list[int]]:
    """(the engine pool's pid, the workers' pids)."""
    pool = requests.get(svc.base_url + "/health", timeout=30).json()["engine_pool"]["pid"]
    assert pool, "no engine pool process"
    workers = sorted(p for p in svc.worker_pids() if p != pool)
    # The pool knows its workers once each has built its app (and connected).
    wait_for(lambda: requests.get(svc.base_url + "/health", timeout=30).json()[
        "engine_pool"]["workers"] == sorted(p for p in svc.worker_pids() if p != pool),
        "the pool to list the workers gunicorn runs", 60)
    return pool, workers


def requests_view(base: str) -> dict:
    return requests.get(base + "/api/requests", timeout=30,
                        headers={"Connection": "close"}).json()


def status_of(base: str, rid: str) -> dict | None:
    view = requests_view(base)
    return next((s for s in view["active"] + view["recent"] if s["id"] == rid), None)


def stream_dialect(base: str, dialect: str, rid: str, max_tokens: int = 24) -> str:
    """One stream in ``dialect`` through its official client (requests for TGI); its text."""
    headers = {"X-Request-Id": rid}
    if dialect == "openai":
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", default_headers=headers)
        chunks = client.chat.completions.create(model=MODEL, messages=MSGS, stream=True,
                                                max_tokens=max_tokens)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if dialect == "anthropic":
        client = anthropic.Anthropic(base_url=base, api_key="x", default_headers=headers)
        with client.messages.stream(model=MODEL, max_tokens=max_tokens,
                                    messages=MSGS) as stream:
            return "".join(stream.text_stream)
    if dialect == "ollama":
        client = ollama.Client(host=base, headers=headers)
        return "".join(part["message"]["content"] for part in client.chat(
            model=MODEL, messages=MSGS, stream=True, options={"num_predict": max_tokens}))
    if dialect == "vllm":
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", default_headers=headers)
        chunks = client.completions.create(model=MODEL, prompt="One, two, three,",
                                           stream=True, max_tokens=max_tokens)
        return "".join(c.choices[0].text for c in chunks if c.choices)
    with requests.post(base + "/generate_stream", headers=headers, stream=True, timeout=300,
                       json={"inputs": "One, two, three,",
                             "parameters": {"max_new_tokens": max_tokens}}) as resp:
        events = [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith(b"data:")]
    assert events and "generated_text" in events[-1], events[-1:]
    return "".join(e["token"]["text"] for e in events if "token" in e)


def test_two_workers_serve_every_dialect_from_one_engine(two_workers):
    base = two_workers.base_url
    pool, workers = roles(two_workers)
    assert len(workers) == 2
    dialects = ["openai", "anthropic", "ollama", "vllm", "tgi"]
    jobs = [(d, f"w-{d}-{i}-{uuid.uuid4().hex[:6]}") for i in range(3) for d in dialects]
    texts: dict[str, str] = {}
    errors: list[str] = []

    def run(dialect: str, rid: str) -> None:
        try:
            texts[rid] = stream_dialect(base, dialect, rid)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{dialect}: {exc!r}")

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert all(texts[rid].strip() for _, rid in jobs), texts
    # One engine for the model, the pool's child; none in the workers.
    assert len(llama_children(pool)) == 1
    assert not [p for w in workers for p in llama_children(w)]
    # Every request is seen (completed) through whichever worker answers, with who served it.
    served = {}
    for _, rid in jobs:
        status = status_of(base, rid)
        assert status is not None and status["state"] == "completed", (rid, status)
        assert status["tokens_generated"] > 0 and status["ttft_ms"] is not None
        served[rid] = status["worker"]
    assert set(served.values()) <= set(workers)
    assert len(set(served.values())) == 2, f"all {len(jobs)} streams went to one worker"


class LongStream(threading.Thread):
    """An OpenAI stream of ``tokens`` tokens under a known request id."""

    def __init__(self, base: str, tokens: int = 300) -> None:
        super().__init__(daemon=True)
        self.base, self.tokens = base, tokens
        self.rid = f"long-{uuid.uuid4().hex[:10]}"
        self.chunks = 0
        self.completion_tokens = 0  # from the usage chunk at the end
        self.done = False
        self.error: str | None = None
        self.last = b""  # the last chunk, for the failure message
        self._resp: requests.Response | None = None

    def cancel(self) -> None:
        """Hang up (the service frees its slot); the thread ends soon after."""
        if self._resp is not None:
            self._resp.close()
        self.join(60)

    def run(self) -> None:
        try:
            with requests.post(self.base + "/v1/chat/completions", stream=True, timeout=600,
                               headers={"X-Request-Id": self.rid},
                               json={"model": MODEL, "messages": MSGS, "stream": True,
                                     "max_tokens": self.tokens, "ignore_eos": True,
                                     "stream_options": {"include_usage": True}}) as resp:
                self._resp = resp
                for line in resp.iter_lines():
                    if line.startswith(b"data: {"):
                        if b'"error"' in line:
                            self.error = line.decode()
                        if b'"usage":{' in line:
                            self.completion_tokens = json.loads(line[6:])["usage"][
                                "completion_tokens"]
                        self.chunks += 1
                        self.last = line
                    elif line == b"data: [DONE]":
                        self.done = True
        except Exception as exc:  # noqa: BLE001 - the killed worker's streams break
            self.error = repr(exc)


def start_streams_on_both(base: str, workers: list[int]) -> dict[int, list[LongStream]]:
    """Long streams until each worker runs at least one; by worker. Which worker accepts a
    connection is the kernel's choice: a batch that all went to one is hung up on (freeing
    the slots at once, not after 300 tokens on a loaded machine) and another one tried."""
    for _ in range(8):
        by_worker: dict[int, list[LongStream]] = {w: [] for w in workers}
        batch = [LongStream(base) for _ in range(PARALLEL)]
        for s in batch:
            s.start()
        for s in batch:
            wait_for(lambda s=s: s.chunks > 0 or s.error, "a long stream to start", 300)
            status = status_of(base, s.rid)
            by_worker.setdefault(status["worker"], []).append(s)
        if all(by_worker[w] for w in workers):
            return by_worker
        for s in batch:
            s.cancel()
    pytest.fail(f"the streams never spread over both workers: {by_worker}")


def test_a_worker_killed_mid_stream_costs_only_its_own_requests(two_workers):
    base = two_workers.base_url
    pool, workers = roles(two_workers)
    requests.post(base + "/api/generate", timeout=300, json={
        "model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 1}})
    engine = llama_children(pool)
    assert len(engine) == 1
    by_worker = start_streams_on_both(base, workers)
    victim, survivor = workers
    os.kill(victim, signal.SIGKILL)
    for streams in by_worker.values():
        for s in streams:
            s.join(600)
    for s in by_worker[survivor]:
        # Tokens, not chunks: a token that ends inside a UTF-8 character, or a control token
        # the model emits once EOS is ignored, comes with no text and so with no chunk.
        assert s.done and s.error is None and s.completion_tokens == 300, \
            (s.rid, s.chunks, s.completion_tokens, s.error, s.last)
    for s in by_worker[victim]:
        assert not s.done, "a stream of the killed worker ended as if complete"
        status = wait_for(lambda s=s: (st := status_of(base, s.rid)) and st["state"] == "failed"
                          and st, "the killed worker's request to be marked failed", 30)
        assert f"worker process {victim}" in status["error"]
    # The engine did not restart, its slots are free again, and gunicorn replaced the worker.
    assert llama_children(pool) == engine
    metrics = requests.get(base + "/metrics", timeout=30).text
    busy = next(line for line in metrics.splitlines()
                if line.startswith("ollama_server_slots_busy") and MODEL in line)
    assert busy.endswith(" 0.0"), busy
    wait_for(lambda: len(roles(two_workers)[1]) == 2, "gunicorn to start a new worker", 120)
    streams = [LongStream(base, tokens=20) for _ in range(PARALLEL)]
    for s in streams:
        s.start()
    for s in streams:
        s.join(600)
        assert s.done and s.error is None


def test_progress_is_read_through_the_other_worker(two_workers):
    base = two_workers.base_url
    _, workers = roles(two_workers)
    stream = LongStream(base, tokens=400)
    stream.start()
    wait_for(lambda: stream.chunks > 0, "the stream to start", 300)
    serving = status_of(base, stream.rid)["worker"]
    # A keep-alive connection stays with the worker that accepted it: find one on the other.
    for _ in range(50):
        session = requests.Session()
        if session.get(base + "/health", timeout=30).json()["pid"] != serving:
            break
        session.close()
    else:
        pytest.fail("no connection reached the other worker")
    seen = []
    while stream.is_alive() and len(seen) < 40:
        body = session.get(f"{base}/api/progress/{stream.rid}", timeout=30).json()
        assert body["worker"] == serving and body["id"] == stream.rid
        seen.append(body["tokens_generated"])
        time.sleep(0.1)
    stream.join(600)
    final = session.get(f"{base}/api/progress/{stream.rid}", timeout=30).json()
    assert final["state"] == "completed" and final["tokens_generated"] == 400
    assert len(set(seen)) > 2 and seen == sorted(seen), seen  # it moved while read from afar


def test_the_pool_and_the_workers_reload_on_sighup(two_workers):
    base = two_workers.base_url
    pool, workers = roles(two_workers)
    before = {w: None for w in workers}
    os.kill(two_workers.proc.pid, signal.SIGHUP)

    def reloaded() -> bool:
        for _ in range(20):
            body = requests.get(base + "/health", headers={"Connection": "close"},
                                timeout=30).json()
            before[body["pid"]] = body["config"]["reloads"]
        return all(before.get(w) == 1 for w in workers)

    wait_for(reloaded, "both workers to reload", 60)
    wait_for(lambda: requests.get(base + "/health", timeout=30).json()["engine_pool"][
        "config"]["reloads"] == 1, "the pool to reload", 60)
    assert roles(two_workers) == (pool, workers), "a reload must not restart anything"


def test_a_killed_pool_takes_its_engines_and_comes_back(tmp_path, real_models, engine_binary):
    """kill -9 of the engine pool: its engines die with it (PR_SET_PDEATHSIG), the master
    starts a new pool and the workers use it; kill -9 of the master: nothing is left."""
    svc = ServiceProcess(tmp_path, real_models, extra_env={"OLLAMA_SERVER_WORKERS": "2"})
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    try:
        svc.wait_ready()
        r = requests.post(svc.base_url + "/v1/completions", timeout=300, json=body)
        assert r.status_code == 200, r.text
        pool, workers = roles(svc)
        (engine,) = llama_children(pool)
        os.kill(pool, signal.SIGKILL)
        wait_for(lambda: not pid_alive(engine), "the pool's llama-server to be killed", 30)
        answers = []

        def new_pool() -> bool:
            r = requests.get(svc.base_url + "/health", timeout=30)
            answers.append(r.status_code)
            # Between the two pools /health answers 503 "unhealthy", never a 500.
            assert r.status_code in (200, 503), r.text
            assert r.status_code == 200 or r.json()["status"] == "unhealthy", r.text
            return r.json()["engine_pool"]["pid"] not in (None, pool)
        wait_for(new_pool, "the master to start a new pool", 60)
        # The workers were not restarted: their next calls reach the new pool.
        for _ in range(4):
            r = requests.post(svc.base_url + "/v1/completions", timeout=300, json=body,
                              headers={"Connection": "close"})
            assert r.status_code == 200, r.text
        new_pool, same_workers = roles(svc)
        assert same_workers == workers and len(llama_children(new_pool)) == 1
        everything = children_of(svc.proc.pid) + llama_children(new_pool)
        os.kill(svc.proc.pid, signal.SIGKILL)
        for pid in everything:
            wait_for(lambda pid=pid: not pid_alive(pid), f"process {pid} to end", 60)
    finally:
        svc.stop()
