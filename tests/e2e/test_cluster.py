"""Three instances behind Debian's HAProxy (issue 21), with the real engine and real clients.

One cluster (``python -m ollama_server.cluster``: three instances on loopback ports, each with
its agent-check, and haproxy in front) serves the whole module, in this order: requests for a
model go to the instance that holds it (two models, two engines in the whole cluster); a
saturated instance spills a model's new requests over to another; every dialect's SDK works
through the balancer; bad input gets the same answer through it as directly; a rolling update
of every instance under a polling client fails no request; ``kill -9`` of an instance under
load fails no request that had not started streaming, ends its streams with an error, and the
cluster is whole again after.

As root (CI, and these machines) each instance runs in its own network namespace behind a veth
pair (``--netns``): a host of its own as far as the network goes, reached by HAProxy over the
veth. Elsewhere the instances listen on loopback ports of this machine.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
import requests
from huggingface_hub import InferenceClient

from ollama_server.cluster import plan, server_states
from ollama_server.config import load_config
from tests.helpers import ROOT, children_of, cluster_port, pid_alive, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MODELS = ("smollm2:135m", "gemma3:270m")
INSTANCES = 3
PARALLEL = 4


class Cluster:
    def __init__(self, tmp: Path, models: Path, instances: int = INSTANCES,
                 extra_config: str = "") -> None:
        if shutil.which("haproxy") is None and not os.access("/usr/sbin/haproxy", os.X_OK):
            subprocess.run(["make", "haproxy"], cwd=ROOT, check=True)  # Debian's package
        self.instances = instances
        self.port = cluster_port(instances)
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = tmp / "logs" / "cluster"
        self.config = tmp / "cluster.yaml"
        self.config.write_text(f"workers: 1\nparallel: {PARALLEL}\nlog_dir: {tmp / 'logs'}\n"
                               f"keep_alive: 600\nshutdown_timeout: 20\n{extra_config}")
        self.out = open(tmp / "cluster.out", "wb")  # noqa: SIM115 - closed in stop()
        self.args = ["--config", str(self.config), "--model-dir", str(models), "--port",
                     str(self.port), "--instances", str(instances)]
        self.netns = os.geteuid() == 0 and shutil.which("ip") is not None
        if self.netns:
            self.args.append("--netns")
        self.plan = plan(load_config(overrides={"port": self.port, "log_dir": str(tmp / "logs")},
                                     environ={}), instances, self.netns)
        self.proc = subprocess.Popen([sys.executable, "-m", "ollama_server.cluster",
                                      *self.args], cwd=ROOT, stdout=self.out,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def instance_url(self, i: int) -> str:
        return self.plan[i - 1].url

    def instance_of(self, name: str) -> int:
        return int(name.removeprefix("inst"))

    def log(self) -> str:
        text = (self.out.name and Path(self.out.name).read_text(errors="replace"))[-3000:]
        return text

    def servers(self) -> dict[str, dict[str, str]]:
        """by_load's servers as HAProxy sees them: operational state (2 = up), admin state,
        the weight the agent set."""
        return server_states(self.dir / "haproxy.sock")

    def all_up(self) -> bool:
        try:
            servers = self.servers()
        except OSError:
            return False
        return len(servers) == self.instances and all(
            s["srv_op_state"] == "2" and s["srv_admin_state"] == "0" for s in servers.values())

    def loaded(self, i: int) -> list[str]:
        return [m["name"] for m in requests.get(self.instance_url(i) + "/api/ps",
                                                timeout=30).json()["models"]]

    def master(self, i: int) -> int:
        pid = requests.get(self.instance_url(i) + "/health/live", timeout=10).json()["pid"]
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def started(c: Cluster) -> Cluster:
    try:
        wait_for(lambda: c.proc.poll() is not None or c.all_up(),
                 "the instances up behind haproxy", 180, every=0.5)
        assert c.proc.poll() is None, c.log()
    except AssertionError as exc:
        try:
            seen = c.servers()
        except OSError as err:
            seen = err
        c.stop()
        raise AssertionError(f"{exc}\nHAProxy's servers: {seen}\n{c.log()}") from None
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, real_models, engine_binary):
    c = started(Cluster(tmp_path_factory.mktemp("cluster"), real_models))
    yield c
    if c.netns:  # the instances were hosts of their own
        assert [i.host for i in c.plan] == [f"10.231.{n}.{4 * ((c.port + n) % 64) + 2}"
                                           for n in range(1, INSTANCES + 1)]
    launcher = c.proc.pid
    descendants = [p for child in children_of(launcher) for p in [child, *children_of(child)]]
    assert c.stop() == 0, c.log()
    assert not [p for p in descendants if pid_alive(p)], "left running after the stop"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [i.netns for i in c.plan if i.netns and i.netns in namespaces], namespaces


def oai(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, **kw)


def chat(base: str, model: str, max_tokens: int = 2) -> tuple[str, str]:
    """(served by, text) of one short chat through the OpenAI SDK."""
    raw = oai(base).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=max_tokens)
    return raw.headers["x-served-by"], raw.parse().choices[0].message.content or ""


# --- routing --------------------------------------------------------------------------------

def test_each_model_goes_to_the_instance_that_holds_it(cluster):
    served: dict[str, collections.Counter] = {m: collections.Counter() for m in MODELS}
    for n in range(60):
        model = MODELS[n % 2]
        by, _ = chat(cluster.url, model)
        served[model][by] += 1
    for model, counter in served.items():
        home, count = counter.most_common(1)[0]
        assert count >= 0.95 * sum(counter.values()), (model, counter)
        assert model in cluster.loaded(cluster.instance_of(home)), (model, home)
    loaded = [m for i in range(1, INSTANCES + 1) for m in cluster.loaded(i)]
    assert sorted(loaded) == sorted(MODELS), loaded  # one engine per model in the cluster


def test_a_saturated_instance_spills_a_model_over_to_another(cluster):
    model = MODELS[0]
    home, _ = chat(cluster.url, model)
    streams, served, stop = [], [], threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        # A long stream that holds a slot until the test ends it.
        raw = oai(cluster.url).chat.completions.with_raw_response.create(
            model=model, stream=True, max_tokens=2000,
            messages=[{"role": "user", "content": "Write a very long story."}])
        served.append(raw.headers["x-served-by"])
        stream = raw.parse()
        streams.append(stream)
        try:
            for n, _chunk in enumerate(stream):
                if n == 0:
                    started.release()
                if stop.is_set():
                    break
        finally:
            stream.close()

    threads = []
    try:
        for _ in range(PARALLEL):
            thread = threading.Thread(target=hold, daemon=True)
            thread.start()
            threads.append(thread)
            assert started.acquire(timeout=120), "a stream did not start"
            if set(served) - {home}:
                break
        busy = requests.get(cluster.instance_url(cluster.instance_of(home)) + "/health/ready",
                            timeout=10).json()["slots_busy"]
        # Bounded-load consistent hashing: the home instance took the first stream; a later
        # one went to another instance once home ran 50 % above the cluster's average load
        # (hash-balance-factor 150: with three instances and one busy model that is the
        # second stream already; HAProxy's bound is relative to the average, not to slots).
        assert served[0] == home and set(served) - {home}, served
        assert busy >= 1, busy
        # The home instance's agent tells HAProxy its weight: its free share of the slots.
        wait_for(lambda: int(cluster.servers()[home]["srv_uweight"]) < 100,
                 "the agent's weight of the busy instance in haproxy", 15)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    # Unloaded again, the model's requests go home.
    wait_for(lambda: requests.get(cluster.instance_url(cluster.instance_of(home))
                                  + "/health/ready", timeout=10).json()["slots_busy"] == 0,
             "the home instance's slots to be free", 60)
    assert chat(cluster.url, model)[0] == home


# --- every dialect --------------------------------------------------------------------------

def test_every_dialect_through_the_balancer(cluster):
    model = MODELS[0]
    by, text = chat(cluster.url, model, max_tokens=8)
    assert by.startswith("inst") and text
    stream = oai(cluster.url).chat.completions.create(
        model=model, stream=True, max_tokens=8,
        messages=[{"role": "user", "content": "Count: one, two,"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert oai(cluster.url).completions.create(model=model, prompt="One, two,",
                                               max_tokens=4).choices[0].text is not None
    reply = ollama.Client(host=cluster.url).chat(
        model=model, messages=[{"role": "user", "content": "Say hi."}],
        options={"num_predict": 8})
    assert reply["message"]["content"] and reply["done"]
    parts = list(ollama.Client(host=cluster.url).generate(
        model=model, prompt="One, two,", stream=True, options={"num_predict": 6}))
    assert parts[-1]["done"]
    raw = anthropic.Anthropic(base_url=cluster.url, api_key="x",
                              max_retries=0).messages.with_raw_response.create(
        model=model, max_tokens=8, messages=[{"role": "user", "content": "Say hi."}])
    assert raw.headers["x-served-by"].startswith("inst")
    message = raw.parse()
    assert message.content[0].text and message.stop_reason in ("end_turn", "max_tokens")
    with anthropic.Anthropic(base_url=cluster.url, api_key="x").messages.stream(
            model=model, max_tokens=8,
            messages=[{"role": "user", "content": "Say hi."}]) as s:
        assert "".join(s.text_stream)
    # TGI names no model: it goes to the least loaded instance, which serves its default.
    tgi = InferenceClient(base_url=cluster.url, timeout=120)
    assert tgi.text_generation("One, two,", max_new_tokens=4)
    assert "".join(tgi.text_generation("One, two,", max_new_tokens=4, stream=True))
    listed = {m.id for m in oai(cluster.url).models.list()}
    assert set(MODELS) <= listed


# --- bad input ------------------------------------------------------------------------------

def _answer(resp: requests.Response) -> tuple[int, object]:
    try:
        body: object = resp.json()
    except ValueError:
        body = resp.text
    text = json.dumps(body)
    for key in ("x-request-id",):
        if resp.headers.get(key):
            text = text.replace(resp.headers[key], "<id>")
    return resp.status_code, json.loads(text)


@pytest.mark.parametrize("path, data, headers", [
    ("/v1/chat/completions", b"{not json", {"Content-Type": "application/json"}),
    ("/api/chat", b"{not json", {"Content-Type": "application/json"}),
    ("/v1/messages", b"[1, 2", {"Content-Type": "application/json",
                                "anthropic-version": "2023-06-01"}),
    ("/v1/chat/completions", json.dumps({"model": "no-such-model:1b", "messages": [
        {"role": "user", "content": "hi"}]}).encode(), {"Content-Type": "application/json"}),
    ("/api/generate", json.dumps({"model": "no-such-model:1b", "prompt": "hi"}).encode(),
     {"Content-Type": "application/json"}),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user",
                                                       "content": "hi"}]}).encode(),
     {"Content-Type": "application/json"}),
])
def test_bad_input_gets_the_same_answer_through_the_balancer(cluster, path, data, headers):
    direct = _answer(requests.post(cluster.instance_url(1) + path, data=data, headers=headers,
                                   timeout=60))
    through = _answer(requests.post(cluster.url + path, data=data, headers=headers,
                                    timeout=60))
    assert direct[0] >= 400
    assert through == direct


@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions", "/generate",
                                  "/v1/messages"])
def test_a_100_mb_body_gets_the_same_413_through_the_balancer(cluster, path):
    body = b'{"model": "smollm2:135m", "prompt": "' + b"x" * (100 * 1024 * 1024) + b'"}'
    answers = []
    for base in (cluster.instance_url(1), cluster.url):
        resp = requests.post(base + path, data=body, timeout=120,
                             headers={"Content-Type": "application/json"})
        status, shaped = _answer(resp)
        if isinstance(shaped, dict):
            shaped.pop("request_id", None)  # Anthropic's: this request's own id
        answers.append((status, shaped))
    assert answers[0][0] == 413, answers[0]
    assert answers[1] == answers[0]


# --- operations -----------------------------------------------------------------------------

class Poller:
    """A client that keeps asking the balancer (chats of both models, streamed and not, and
    model lists) until stopped; counts what failed."""

    def __init__(self, base: str, threads: int = 3) -> None:
        self.base, self.stop_event = base, threading.Event()
        self.ok, self.failures = 0, []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, n: int) -> None:
        client = oai(self.base, timeout=120)
        i = 0
        while not self.stop_event.is_set():
            i += 1
            model = MODELS[(n + i) % 2]
            try:
                if i % 3 == 0:
                    text = "".join(c.choices[0].delta.content or "" for c in
                                   client.chat.completions.create(
                                       model=model, stream=True, max_tokens=6,
                                       messages=[{"role": "user", "content": "Say hi."}])
                                   if c.choices)
                elif i % 3 == 1:
                    text = client.chat.completions.create(
                        model=model, max_tokens=6,
                        messages=[{"role": "user", "content": "Say hi."}]
                    ).choices[0].message.content or ""
                else:
                    text = ",".join(m.id for m in client.models.list())
                assert text
                with self.lock:
                    self.ok += 1
            except Exception as exc:  # noqa: BLE001 - counted
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(180)


def test_a_rolling_update_fails_no_request(cluster):
    masters = {i: cluster.master(i) for i in range(1, INSTANCES + 1)}
    poller = Poller(cluster.url)
    try:
        time.sleep(2)
        update = subprocess.run([sys.executable, "-m", "ollama_server.cluster", "update",
                                 *cluster.args], cwd=ROOT, capture_output=True, text=True,
                                timeout=600)
        time.sleep(2)
    finally:
        poller.stop()
    assert update.returncode == 0, update.stdout + update.stderr
    assert poller.failures == [], poller.failures[:5]
    assert poller.ok >= 20, poller.ok
    for i in range(1, INSTANCES + 1):  # each instance now runs a new master
        assert cluster.master(i) != masters[i]
        assert not pid_alive(masters[i])
    assert "inst3: updated and back in the balancer" in update.stdout
    wait_for(cluster.all_up, "every instance up again", 30)
    status = subprocess.run([sys.executable, "-m", "ollama_server.cluster", "status",
                             *cluster.args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0 and status.stdout.count(": haproxy UP weight") == 3, \
        status.stdout


def test_kill_9_of_an_instance_under_load(cluster):
    model = MODELS[0]
    home = cluster.instance_of(chat(cluster.url, model)[0])
    stream_errors, stream_done, plain_errors, plain_ok = [], [], [], []
    first = threading.Event()

    def stream_on_home() -> None:
        # Streams that have started on the instance that is killed end with an error.
        try:
            raw = oai(cluster.url, timeout=120).chat.completions.with_raw_response.create(
                model=model, stream=True, max_tokens=3000,
                messages=[{"role": "user", "content": "Write a very long story."}])
            served = cluster.instance_of(raw.headers["x-served-by"])
            for _ in raw.parse():
                first.set()
            stream_done.append(served)
        except (openai.APIError, Exception) as exc:  # noqa: BLE001 - what a client sees
            stream_errors.append(type(exc).__name__)

    def plain(n: int) -> None:
        try:
            by, text = chat(cluster.url, MODELS[n % 2], max_tokens=16)
            plain_ok.append(by)
        except Exception as exc:  # noqa: BLE001 - counted
            plain_errors.append(f"{type(exc).__name__}: {exc}")

    streamer = threading.Thread(target=stream_on_home, daemon=True)
    streamer.start()
    assert first.wait(120), "the stream did not start"
    victims = [cluster.master(home)]
    victims += children_of(victims[0])
    victims += [p for v in victims[1:] for p in children_of(v)]  # the engines
    plains = [threading.Thread(target=plain, args=(n,), daemon=True) for n in range(12)]
    for n, thread in enumerate(plains):
        thread.start()
        if n == 5:
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for thread in plains + [streamer]:
        thread.join(300)
    # The stream on the killed instance ended with an error, never as if complete.
    assert stream_errors and not stream_done, (stream_errors, stream_done)
    # Requests that had not started streaming were retried elsewhere or waited: none failed.
    assert plain_errors == [] and len(plain_ok) == 12, plain_errors
    # The launcher started the instance again; HAProxy has all three back.
    wait_for(cluster.all_up, "the killed instance back behind haproxy", 180, every=0.5)
    assert chat(cluster.url, model)[1] is not None


# --- the balancer's queue -------------------------------------------------------------------

def test_a_full_cluster_answers_503_with_retry_after(tmp_path, real_models, engine_binary):
    # One instance serving two requests at once (one worker of two threads): HAProxy lets two
    # in (maxconn 2), queues the rest for cluster_queue_timeout, then answers 503 itself.
    c = started(Cluster(tmp_path, real_models, instances=1,
                        extra_config="threads_http: 2\ncluster_queue_timeout: 1\n"))
    try:
        assert "maxconn 2 agent-check" in (c.dir / "haproxy.cfg").read_text()
        answers, lock = [], threading.Lock()

        def long_chat() -> None:
            resp = requests.post(c.url + "/v1/chat/completions", timeout=120, json={
                "model": MODELS[0], "max_tokens": 200, "stream": False,
                "messages": [{"role": "user", "content": "Write a long story."}]})
            with lock:
                answers.append((resp.status_code, resp.headers.get("Retry-After"),
                                resp.json()))

        threads = [threading.Thread(target=long_chat) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        codes = sorted(a[0] for a in answers)
        assert codes.count(200) >= 2 and 503 in codes, codes
        for status, retry_after, body in answers:
            if status == 503:  # the balancer's own: Retry-After and an OpenAI error body
                assert retry_after == "5" and body["error"]["type"] == "service_unavailable"
    finally:
        assert c.stop() == 0, c.log()
