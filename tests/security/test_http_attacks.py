"""Attacks over HTTP that a web page or a caller without a key can try (issue 25), on the real
service, with real browsers and SDKs where a browser or SDK is the attacker or the victim:

* DNS rebinding (Ollama's CVE-2024-28224): a page whose attacker-owned name now resolves to
  127.0.0.1 calls the service with ``Host: evil.example``; refused unless the name is local or
  configured (``allowed_hosts``).
* Cross-site requests: a page of another site sends a mutation (even a "simple" text/plain POST
  that no CORS preflight guards); refused unless its origin is in ``cors_origins``.
* ``/api/create`` as a file-existence oracle (CVE-2024-39719): a path that exists and one that
  does not get the same answer.
* RPC worker endpoints (host:port of an unauthenticated ggml-rpc-server) are never shown to a
  caller without a key.

Every service here listens on 127.0.0.1 and is reached only there; ``evil.example`` is mapped to
127.0.0.1 inside the browser (conftest.py) or only written in a ``Host`` header.
"""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
import requests
from flask import Response, g

from ollama_server.api.app import create_app
from ollama_server.api.security import hide_worker_endpoints
from ollama_server.config import load_config
from ollama_server.core.request_tracker import RequestTracker
from ollama_server.models.manager import ModelManager
from ollama_server.models.store import ModelName, OllamaStore
from ollama_server.provision.engine import rpc_worker_binary
from tests.e2e.test_split import Worker
from tests.helpers import ServiceProcess, add_store_model, free_port, write_tiny_gguf
from tests.security.conftest import EVIL

MODEL = "smollm2:135m"
KEY = "sk-operator-25-7c1e"


def tags(base: str) -> list[str]:
    """The store's model names, asked the ordinary way."""
    return sorted(m["name"] for m in requests.get(base + "/api/tags", timeout=10).json()
                  ["models"])


def dialect_shape(resp: requests.Response, dialect: str) -> str:
    """The 403's message, after checking that the body has ``dialect``'s error shape."""
    assert resp.status_code == 403, (resp.status_code, resp.text)
    body = resp.json()
    if dialect == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]["message"]
    if dialect == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "permission_error", body
        return body["error"]["message"]
    if dialect == "tgi":
        assert body["error_type"] == "forbidden", body
        return body["error"]
    assert set(body) == {"error"}, body
    return body["error"]


# Every kind of change a page could make, and a read and a generation in each dialect.
MUTATIONS = [
    ("POST", "/api/copy", {"source": "victim", "destination": "stolen"}),
    ("DELETE", "/api/delete", {"model": "victim"}),
    ("POST", "/api/pull", {"model": "127.0.0.1:9/x/y", "insecure": True, "stream": False}),
    ("POST", "/api/create", {"model": "planted", "from": "victim", "stream": False}),
]
PER_DIALECT = [
    ("GET", "/api/tags", None, "ollama"),
    ("POST", "/api/chat", {"model": "victim", "messages": []}, "ollama"),
    ("POST", "/v1/chat/completions", {"model": "victim", "messages": []}, "openai"),
    ("POST", "/v1/messages", {"model": "victim", "max_tokens": 1, "messages": []},
     "anthropic"),
    ("POST", "/generate", {"inputs": "hi"}, "tgi"),
]


@pytest.fixture(scope="module")
def store_service(tmp_path_factory):
    """The real service over a store of its own (its models may be copied and deleted)."""
    tmp = tmp_path_factory.mktemp("attacks")
    svc = ServiceProcess(tmp, tmp / "models")
    svc.gguf = write_tiny_gguf(tmp / "tiny.gguf")
    svc.store = OllamaStore(tmp / "models")
    add_store_model(svc.store, "victim:latest", svc.gguf, params={})
    svc.ready_or_stopped()
    yield svc
    assert svc.stop() == 0, svc.log()


@pytest.fixture
def store(store_service):
    """The service's base URL, its store holding ``victim:latest`` alone (whatever an attack
    in an earlier test did to it)."""
    for name, _ in list(store_service.store.iter_manifests()):
        if name.short != "victim:latest":
            store_service.store.delete(name)
    victim = ModelName.parse("victim")
    if not victim.manifest_path(store_service.store.manifests_dir).is_file():
        add_store_model(store_service.store, "victim:latest", store_service.gguf, params={})
    assert tags(store_service.base_url) == ["victim:latest"]
    return store_service.base_url


def assert_untouched(base: str) -> None:
    assert tags(base) == ["victim:latest"], "the store was changed"


# --- DNS rebinding ---------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("host", [EVIL, f"{EVIL}:11434", "localhost.evil.example",
                                  "127.0.0.1.nip.io", "8.8.8.8", "[2606:4700::1111]:80"])
def test_a_foreign_host_changes_nothing(store, host):
    """What the issue reported: mutations with a foreign Host (and its Origin) succeeded."""
    for method, path, body in MUTATIONS:
        resp = requests.request(method, store + path, json=body, timeout=30, headers={
            "Host": host, "Origin": f"http://{host}"})
        message = dialect_shape(resp, "ollama")
        assert "allowed_hosts" in message and "DNS rebinding" in message
    assert_untouched(store)


@pytest.mark.e2e
def test_a_foreign_host_is_refused_in_every_dialect(store):
    for method, path, body, dialect in PER_DIALECT:
        resp = requests.request(method, store + path, json=body, timeout=30,
                                headers={"Host": EVIL})
        assert "allowed_hosts" in dialect_shape(resp, dialect)
    # A CORS preflight through that name gets no permission either.
    pre = requests.options(store + "/api/copy", timeout=10, headers={
        "Host": EVIL, "Origin": f"http://{EVIL}", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403 and "Access-Control-Allow-Origin" not in pre.headers
    assert_untouched(store)


@pytest.mark.e2e
def test_local_names_are_answered(store_service):
    port = store_service.port
    for host in ["localhost", f"localhost:{port}", f"127.0.0.1:{port}", "127.1.2.3",
                 f"[::1]:{port}", "LOCALHOST.", f"app.localhost:{port}", "0.0.0.0",
                 "192.168.1.5", "[fd00::5]", socket.gethostname()]:
        resp = requests.get(store_service.base_url + "/api/tags", headers={"Host": host},
                            timeout=10)
        assert resp.status_code == 200, (host, resp.text)
    # HTTP/1.0 without any Host header at all (curl --http1.0 -H 'Host:').
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/version HTTP/1.0\r\n\r\n")
        assert sock.makefile("rb").readline().split()[1] == b"200"


@pytest.mark.e2e
def test_a_rebound_page_in_a_browser_can_neither_read_nor_change(store, store_service,
                                                                 browser):
    """The attack as a browser makes it: a page loaded from http://evil.example:<port>/ (the
    attacker's server, before the name was rebound) calls its own origin, which now resolves to
    127.0.0.1 and so reaches the service, with ``Host: evil.example:<port>``."""
    origin = f"http://{EVIL}:{store_service.port}"
    page = browser.new_page()
    # The attacker's page: served by Playwright, as the attacker's server would have.
    page.route(origin + "/attack.html", lambda route: route.fulfill(
        status=200, content_type="text/html", body="<!doctype html><title>cats</title>"))
    page.goto(origin + "/attack.html")
    result = page.evaluate("""async () => {
        const tags = await fetch("/api/tags");
        const copy = await fetch("/api/copy", {method: "POST",
            headers: {"Content-Type": "application/json"},
            body: JSON.stringify({source: "victim", destination: "stolen"})});
        return {tags: tags.status, body: await tags.text(), copy: copy.status};
    }""")
    page.close()
    assert result["tags"] == 403 and "victim" not in result["body"], result
    assert result["copy"] == 403, result
    assert_untouched(store)


@pytest.mark.e2e
def test_reverse_proxy_names_are_configurable(tmp_path):
    """``allowed_hosts`` adds the names a proxy passes on (globs); the rest stays refused."""
    (tmp_path / "models").mkdir()
    svc = ServiceProcess(tmp_path, tmp_path / "models", extra_env={
        "OLLAMA_SERVER_ALLOWED_HOSTS": "llm.example.com, *.corp.example"})
    try:
        svc.ready_or_stopped()
        for host, status in [("llm.example.com", 200), ("LLM.example.com:443", 200),
                             ("gpu.corp.example", 200), ("localhost", 200),
                             ("corp.example", 403), (EVIL, 403)]:
            resp = requests.get(svc.base_url + "/api/tags", headers={"Host": host}, timeout=10)
            assert resp.status_code == status, (host, resp.text)
    finally:
        assert svc.stop() == 0, svc.log()


def flask_app(tmp_path: Path, **settings):
    """The app (no engine) over an empty store with ``settings``."""
    (tmp_path / "models").mkdir(exist_ok=True)
    config = load_config(overrides={"models_dir": str(tmp_path / "models"),
                                    "log_dir": str(tmp_path / "logs"), **settings}, environ={})
    manager = ModelManager(config, executor_factory=lambda info, ctx: None,
                           engine_binary=Path("/bin/true"))
    return create_app(config, manager=manager, tracker=RequestTracker()), manager


@pytest.mark.parametrize("settings, status", [
    ({"host": "0.0.0.0"}, 200),  # as Ollama: a non-loopback bind answers any name
    ({"host": "::"}, 200),
    ({"host": "0.0.0.0", "allowed_hosts": "llm.example.com"}, 403),  # unless names are set
    ({"host": "127.0.0.1", "allowed_hosts": "*"}, 200),  # "*": no check at all
    ({"host": "localhost"}, 403),
])
def test_the_host_check_follows_the_bind(tmp_path, settings, status):
    app, manager = flask_app(tmp_path, **settings)
    try:
        resp = app.test_client().get("/api/tags", headers={"Host": EVIL})
        assert resp.status_code == status, resp.get_data(as_text=True)
    finally:
        manager.shutdown()


# --- cross-site requests ----------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("origin", [f"http://{EVIL}", f"https://{EVIL}:8443", "null",
                                    "http://localhost.evil.example"])
def test_a_cross_site_mutation_is_refused(store, origin):
    for method, path, body in MUTATIONS:
        resp = requests.request(method, store + path, json=body, timeout=30,
                                headers={"Origin": origin})
        assert "cors_origins" in dialect_shape(resp, "ollama"), (path, origin)
    # The form no preflight guards: text/plain, as a <form> or a no-cors fetch sends it.
    resp = requests.post(store + "/api/copy", data=json.dumps(MUTATIONS[0][2]), timeout=10,
                         headers={"Origin": origin, "Content-Type": "text/plain"})
    assert resp.status_code == 403
    for method, path, body, dialect in PER_DIALECT[1:]:
        resp = requests.request(method, store + path, json=body, timeout=30,
                                headers={"Origin": origin})
        assert "cors_origins" in dialect_shape(resp, dialect)
    assert_untouched(store)


@pytest.mark.e2e
def test_allowed_pages_still_work(store):
    """Local pages, the service's own pages, browser extensions: as before; reads from any
    origin are answered (without CORS headers, so a foreign page cannot read them)."""
    port = store.rsplit(":", 1)[1]
    for origin in ["http://localhost:3000", f"http://127.0.0.1:{port}",
                   "chrome-extension://abcdefghijklmnop", "moz-extension://1234-5678"]:
        made = requests.post(store + "/api/copy", headers={"Origin": origin}, timeout=10,
                             json={"source": "victim", "destination": "mine"})
        assert made.status_code == 200, (origin, made.text)
        gone = requests.delete(store + "/api/delete", headers={"Origin": origin}, timeout=10,
                               json={"model": "mine"})
        assert gone.status_code == 200, (origin, gone.text)
    read = requests.get(store + "/api/tags", headers={"Origin": f"http://{EVIL}"}, timeout=10)
    assert read.status_code == 200 and "Access-Control-Allow-Origin" not in read.headers
    assert_untouched(store)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.e2e
def test_a_page_of_another_site_cannot_change_the_store(store, browser, tmp_path):
    """A real page of another site (served from this machine as http://evil.example:<port>)
    sends the requests a page can send without any CORS permission: no-cors POSTs, text/plain,
    which the browser sends without asking, and a DELETE, which it asks about first."""
    (tmp_path / "attack.html").write_text("<!doctype html><title>cats</title>")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = browser.new_page()
    try:
        page.goto(f"http://{EVIL}:{server.server_address[1]}/attack.html")
        sent = page.evaluate("""async (base) => {
            const out = [];
            for (const [path, body] of [
                    ["/api/copy", {source: "victim", destination: "stolen"}],
                    ["/api/create", {model: "planted", from: "victim", stream: false}]]) {
                await fetch(base + path, {method: "POST", mode: "no-cors",
                    headers: {"Content-Type": "text/plain"}, body: JSON.stringify(body)});
                out.push(path);
            }
            try {
                await fetch(base + "/api/delete", {method: "DELETE",
                    headers: {"Content-Type": "application/json"},
                    body: JSON.stringify({model: "victim"})});
            } catch (e) { out.push("delete blocked: " + e.message); }
            return out;
        }""", store)
        assert sent[:2] == ["/api/copy", "/api/create"] and len(sent) == 3, sent
        assert_untouched(store)
    finally:
        page.close()
        server.shutdown()
        server.server_close()


# --- /api/create must not tell whether a file exists (CVE-2024-39719) --------------------------

@pytest.mark.e2e
def test_create_answers_alike_for_existing_and_missing_paths(store, tmp_path):
    """Ollama told "no such file" apart from other errors for a path in FROM; here a path that
    exists (a file, a directory, a real GGUF outside the model folders) and one that does not
    get the same status and body, in every form a path can take."""
    real_gguf = write_tiny_gguf(tmp_path / "outside.gguf")
    pairs = [("/etc/passwd", "/etc/no-such-file"), ("/etc", "/no-such-dir"),
             (str(real_gguf), str(tmp_path / "missing.gguf")),
             ("../../../../../../etc/passwd", "../../../../../../etc/no-such-file"),
             ("~/.bashrc", "~/.no-such-file"), ("etc/passwd", "etc/no-such-file"),
             ("/proc/self/environ", "/proc/self/no-such-file")]
    for present, absent in pairs:
        if present.startswith("/"):
            assert Path(present).exists() and not Path(absent).exists()
        for form in (lambda p: {"from": p}, lambda p: {"modelfile": f"FROM {p}\n"},
                     lambda p: {"files": {"model.gguf": p}},
                     lambda p: {"from": "victim", "files": {p: "sha256:" + "0" * 64}}):
            answers = []
            for path in (present, absent):
                resp = requests.post(store + "/api/create", timeout=30,
                                     json={"model": "probe", "stream": False, **form(path)})
                answers.append((resp.status_code, resp.text.replace(path, "<path>")))
            assert answers[0] == answers[1], (present, absent, answers)
            assert answers[0][0] >= 400
    assert_untouched(store)


# --- RPC worker endpoints ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker_service(tmp_path_factory, real_models, engine_binary):
    """The real service with a key, the smollm2 model split over a real ggml-rpc-server on
    loopback, and a second configured worker that is down (its address in error messages)."""
    binary = rpc_worker_binary(engine_binary)
    if binary is None:
        pytest.fail(f"no ggml-rpc-server beside {engine_binary}: run `make engine-rebuild`")
    tmp = tmp_path_factory.mktemp("workers")
    worker = Worker(binary, log=tmp / "worker.log")
    dead = f"127.0.0.1:{free_port()}"
    svc = ServiceProcess(tmp, real_models, extra_env={
        "OLLAMA_SERVER_API_KEY": KEY,
        "OLLAMA_SERVER_MODEL_SETTINGS": json.dumps({
            MODEL: {"rpc_servers": [worker.endpoint], "gpu_layers": 99},
            "elsewhere:latest": {"rpc_servers": [dead]}})})
    try:
        svc.ready_or_stopped()
        chat = requests.post(svc.base_url + "/api/chat", timeout=300, headers={
            "Authorization": f"Bearer {KEY}"}, json={
            "model": MODEL, "stream": False, "options": {"num_predict": 2},
            "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text
        yield svc, [worker.endpoint, dead]
    finally:
        assert svc.stop() == 0, svc.log()
        worker.kill()


@pytest.mark.e2e
def test_worker_endpoints_only_for_callers_with_a_key(worker_service):
    svc, endpoints = worker_service
    keyed = {"Authorization": f"Bearer {KEY}"}
    public = {"/health": requests.get(svc.base_url + "/health", timeout=30),
              "/metrics": requests.get(svc.base_url + "/metrics", timeout=30)}
    for path, resp in public.items():
        assert resp.status_code == 200, (path, resp.text)
        for endpoint in endpoints:
            assert endpoint not in resp.text, (path, endpoint)
        assert "rpc-worker-1" in resp.text and "rpc-worker-2" in resp.text, path
    health = public["/health"].json()
    assert health["status"] == "degraded" and "rpc-worker-2" in health["error"]
    assert [w["endpoint"] for w in health["rpc_workers"]] == ["rpc-worker-1", "rpc-worker-2"]
    # The operator, with the key, sees where they are: health, metrics, /api/ps, dashboard.
    for path in ["/health", "/metrics", "/api/ps", "/dashboard/data"]:
        resp = requests.get(svc.base_url + path, headers=keyed, timeout=30)
        assert resp.status_code == 200 and endpoints[0] in resp.text, path
    # A wrong key is no key.
    wrong = requests.get(svc.base_url + "/health", timeout=30,
                         headers={"Authorization": "Bearer sk-wrong"})
    assert endpoints[0] not in wrong.text and endpoints[1] not in wrong.text
    # ... and a worker is never named in the 401s the guarded routes give.
    for path in ["/api/ps", "/dashboard/data", "/api/requests"]:
        resp = requests.get(svc.base_url + path, timeout=30)
        assert resp.status_code == 401 and endpoints[0] not in resp.text


def test_worker_endpoints_without_keys_only_for_local_callers(tmp_path):
    """No keys (the local default): a caller on this machine is the operator and sees the
    workers; one from another address (a service bound beyond loopback) does not."""
    endpoint = f"127.0.0.1:{free_port()}"
    app, manager = flask_app(tmp_path, host="0.0.0.0", rpc_servers=endpoint)
    try:
        client = app.test_client()
        for path in ["/health", "/metrics"]:
            local = client.get(path, environ_base={"REMOTE_ADDR": "127.0.0.1"})
            assert endpoint in local.get_data(as_text=True), path
            remote = client.get(path, environ_base={"REMOTE_ADDR": "192.168.1.20"})
            text = remote.get_data(as_text=True)
            assert endpoint not in text and "rpc-worker-1" in text, path
    finally:
        manager.shutdown()


def test_a_worker_address_is_hidden_whole_and_only_whole(tmp_path):
    """Aliases replace exactly the configured endpoints, never part of a longer address."""
    app, manager = flask_app(tmp_path, api_key="k")
    try:
        with app.test_request_context("/health"):
            g.caller = None
            resp = Response("10.0.0.1:5005 110.0.0.1:50052 10.0.0.1:50052 RPC0[10.0.0.1:5005]")
            hide_worker_endpoints(resp, manager.config, ["10.0.0.1:5005", "10.0.0.1:50052"])
            assert resp.get_data(as_text=True) == \
                "rpc-worker-1 110.0.0.1:50052 rpc-worker-2 RPC0[rpc-worker-1]"
    finally:
        manager.shutdown()


# --- the service's own clients keep working ----------------------------------------------------

@pytest.mark.e2e
def test_the_official_sdks_still_work(base_url):
    """The SDKs send no Origin and their URL's host: 127.0.0.1 or localhost."""
    local = base_url.replace("127.0.0.1", "localhost")
    for url in (base_url, local):
        chat = openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content is not None
        assert ollama.Client(host=url).chat(model=MODEL, options={"num_predict": 2},
                                            messages=[{"role": "user", "content": "hi"}])
        msg = anthropic.Anthropic(base_url=url, api_key="x").messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert msg.content is not None

