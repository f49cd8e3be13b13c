"""Attacks by a registry on ``/api/pull`` and ``/api/push`` (issue 25), against the real service.

The registry is a scripted HTTP server on loopback (``tests/registry.py``, ScriptedServer)
that answers as each test's attack needs; the service's configured registry is that server, so
the service's registry credentials are the ones an attacker would like to get. Hosts:

- ``evil`` (127.0.0.1): the configured registry (``registry``, with ``registry_auth``);
- ``elsewhere`` (127.0.0.2): another host, named in ``registry_insecure`` so that the service
  may reach it: the token service, redirect target or upload host an attacker names;
- ``inside`` (127.0.0.1, another port): a host inside the network that no configuration names,
  the target of server-side request forgery; no request may ever reach it.

``registry_allow_private`` is off (the default). Traffic stays on loopback: the addresses of
the other private ranges are only checked by the policy itself, with no connection.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import uuid
import zlib
from pathlib import Path
from typing import Any

import ollama
import pytest

from ollama_server.models.registry import RegistryError, RegistrySettings, push_model
from ollama_server.models.store import MEDIA_PREFIX, ModelName, OllamaStore
from tests.helpers import ServiceProcess
from tests.registry import Answer, ScriptedServer, json_answer, link_model_store

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
USER, PASSWORD = "fleet", "s3cret-registry-password"
BASIC = "Basic ZmxlZXQ6czNjcmV0LXJlZ2lzdHJ5LXBhc3N3b3Jk"  # base64 of USER:PASSWORD
RSS_GROWTH_LIMIT_KB = 100 * 1024  # the bound on the service's memory growth
BOMB_MIB = 512  # what a bomb or an endless answer would put in memory if read whole
MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"


# --- servers, service, client ----------------------------------------------------------------

@pytest.fixture(scope="module")
def evil():
    server = ScriptedServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def elsewhere():
    server = ScriptedServer("127.0.0.2")
    yield server
    server.close()


@pytest.fixture(scope="module")
def inside():
    server = ScriptedServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture(autouse=True)
def fresh_servers(evil, elsewhere, inside):
    for server in (evil, elsewhere, inside):
        server.reset()
    yield


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    return link_model_store(tmp_path_factory.mktemp("attacked") / "models")


@pytest.fixture(scope="module")
def svc(tmp_path_factory, store_root, evil, elsewhere, engine_binary):
    """The service, its registry the scripted one, with credentials for it only."""
    service = ServiceProcess(tmp_path_factory.mktemp("registry-attacks"), store_root, extra_env={
        "OLLAMA_SERVER_REGISTRY": evil.address,
        "OLLAMA_SERVER_REGISTRY_AUTH": f"{evil.address}={USER}:{PASSWORD}",
        "OLLAMA_SERVER_REGISTRY_INSECURE": f"{evil.address},{elsewhere.address}",
        "OLLAMA_SERVER_REGISTRY_ALLOW_PRIVATE": "false",
        "OLLAMA_SERVER_REGISTRY_TIMEOUT": "30"})
    service.ready_or_stopped()
    yield service
    assert service.stop() == 0, service.log()


@pytest.fixture(scope="module")
def client(svc):
    return ollama.Client(host=svc.base_url, timeout=120)


def _pull_error(client, name: str) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as failed:
        client.pull(name, insecure=True)
    assert failed.value.status_code == 500
    return failed.value


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- what the scripted registry serves -------------------------------------------------------

def _layer(data: bytes, kind: str = "model") -> dict[str, Any]:
    return {"mediaType": MEDIA_PREFIX + kind, "digest": "sha256:" + hashlib.sha256(data)
            .hexdigest(), "size": len(data)}


CONFIG = b'{"model_format":"gguf"}'


def _manifest(layers: list[dict[str, Any]], config: dict[str, Any] | None = None) -> bytes:
    config = config or _layer(CONFIG, "config")
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA, "config": config,
                       "layers": layers}).encode()


def _manifest_answer(raw: bytes) -> Answer:
    return Answer(200, {"Content-Type": MANIFEST_MEDIA,
                        "Docker-Content-Digest": "sha256:" + hashlib.sha256(raw).hexdigest()},
                  raw)


def _serving(raw: bytes, blob: Answer) -> Any:
    """A registry route: the manifest ``raw``, the right config blob, and ``blob`` for the
    layer."""
    config = _layer(CONFIG, "config")["digest"]

    def route(req: dict[str, Any]) -> Answer:
        if "/manifests/" in req["path"]:
            return _manifest_answer(raw)
        if req["path"].endswith(config):
            return Answer(200, {}, CONFIG)
        return blob

    return route


@functools.lru_cache(maxsize=1)
def _gzip_bomb() -> bytes:
    """BOMB_MIB MiB of zeros, gzipped: about 0.5 MB on the wire."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    return b"".join([comp.compress(chunk) for _ in range(BOMB_MIB)] + [comp.flush()])


def _endless(fill: bytes = b" ") -> Any:
    """A chunked body that goes on (up to BOMB_MIB MiB, so that a test against a client that
    reads it all still ends) until the client hangs up."""
    piece = fill * (64 << 10)
    return (piece for _ in range(BOMB_MIB * 16))


# --- memory of the service's worker ----------------------------------------------------------

def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {key}")


class PeakRss:
    """The growth of the service's workers' peak RSS over a block: the peak (VmHWM) is reset
    to the current RSS first (``clear_refs`` 5), so a short spike counts too."""

    def __init__(self, svc: ServiceProcess) -> None:
        self.pids = svc.worker_pids()
        assert self.pids, "the service has no worker"

    def __enter__(self) -> "PeakRss":
        self.before = {}
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.before[pid] = _status_kb(pid, "VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.growth_kb = max(_status_kb(pid, "VmHWM") - self.before[pid] for pid in self.pids)


# --- 1. digests that name paths (CVE-2024-37032, "Probllama") --------------------------------

ESCAPE = f"probllama-{uuid.uuid4().hex[:8]}"
BAD_DIGESTS = {
    "traversal": f"sha256:../../../../../../../../../../tmp/{ESCAPE}",
    "traversal-in-hex": "sha256:" + "a" * 32 + "/../../../../../../tmp/" + ESCAPE,
    "short": "sha256:" + "a" * 63,
    "long": "sha256:" + "a" * 65,
    "uppercase": "sha256:" + "A" * 64,
    "newline": "sha256:" + "a" * 64 + "\n",
    "dash": "sha256-" + "a" * 64,
    "md5": "md5:" + "a" * 32,
    "not-a-string": ["sha256:" + "a" * 64],
}


@pytest.mark.parametrize("where", ["layer", "config"])
@pytest.mark.parametrize("kind", sorted(BAD_DIGESTS))
def test_a_manifest_digest_that_is_not_sha256_hex_writes_nothing(client, evil, store_root,
                                                                  kind, where):
    bad = BAD_DIGESTS[kind]
    model = _layer(b"GGUF model bytes")
    if where == "layer":
        raw = _manifest([{**model, "digest": bad}])
    else:
        raw = _manifest([model], {"mediaType": MEDIA_PREFIX + "config", "digest": bad,
                                  "size": 10})
    evil.route = lambda req: _manifest_answer(raw) if "/manifests/" in req["path"] else \
        Answer(200, {}, b"x" * 10)
    before = _tree(store_root.parent)
    error = _pull_error(client, f"probe/{kind}:{where}")
    assert not [r for r in evil.requests if "/blobs/" in r["path"]], evil.requests
    assert _tree(store_root.parent) == before  # not even an empty partial file
    assert not Path("/tmp", ESCAPE).exists()
    assert error.error.startswith("pull model manifest: unsupported digest"), error.error
    assert "only sha256" in error.error


def test_a_push_of_a_manifest_with_a_traversal_digest_sends_and_reads_nothing(
        client, evil, store_root):
    """Ollama's push read the file a digest named and uploaded it; here the digest is refused
    before the first request."""
    name = ModelName.parse("probe/exfiltrate:v1")
    path = name.manifest_path(OllamaStore(store_root).manifests_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_manifest([{"mediaType": MEDIA_PREFIX + "model",
                                 "digest": "sha256:../../../../../../../../etc/passwd",
                                 "size": 1000}]))
    evil.route = lambda req: Answer(202, {"Location": "/v2/probe/exfiltrate/blobs/uploads/1"}) \
        if req["method"] == "POST" else Answer(404)
    try:
        with pytest.raises(ollama.ResponseError) as failed:
            client.push("probe/exfiltrate:v1", insecure=True)
        assert "damaged" in failed.value.error and "etc/passwd" in failed.value.error
        assert evil.requests == []
        # The service refuses the damaged model before the push starts; the push itself
        # refuses it too, whoever calls it.
        settings = RegistrySettings(default_registry=evil.address, allow_private=True,
                                    credentials={evil.address: f"{USER}:{PASSWORD}"})
        with pytest.raises(RegistryError, match="unsupported digest") as refused:
            list(push_model(OllamaStore(store_root), name, settings, insecure=True))
        assert "nothing was sent" in refused.value.message
        assert evil.requests == []
    finally:
        path.unlink()


# --- 2 and 5. credentials go to their own origin only ----------------------------------------

def _wants_basic(then: Any) -> Any:
    """A registry route that asks for Basic credentials, then answers ``then(request)``."""

    def route(req: dict[str, Any]) -> Answer:
        if req["headers"].get("authorization") != BASIC:
            return json_answer({"errors": [{"code": "UNAUTHORIZED"}]}, 401,
                               {"WWW-Authenticate": 'Basic realm="registry"'})
        return then(req)

    return route


def test_a_token_realm_on_another_host_never_gets_the_registrys_credentials(
        client, evil, elsewhere):
    realm = elsewhere.url("/token")

    def registry(req: dict[str, Any]) -> Answer:
        if req["headers"].get("authorization") == "Bearer stolen-nothing":
            return json_answer({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, 404)
        return json_answer({"errors": [{"code": "UNAUTHORIZED"}]}, 401, {
            "WWW-Authenticate": f'Bearer realm="{realm}",service="evil",'
                                f'scope="repository:probe/realm:pull"'})

    evil.route = registry
    elsewhere.route = lambda req: json_answer({"token": "stolen-nothing"})
    error = _pull_error(client, "probe/realm:v1")
    assert error.error == "pull model manifest: file does not exist"
    assert [r["path"].split("?")[0] for r in elsewhere.requests] == ["/token"]
    assert elsewhere.authorizations() == []  # the registry's password stayed here
    # The token the realm gave went to the registry (its own origin), and only there.
    assert "Bearer stolen-nothing" in evil.authorizations()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_to_another_host_carries_no_credentials(client, evil, elsewhere, status):
    evil.route = _wants_basic(lambda req: Answer(status, {
        "Location": elsewhere.url(req["path"])}))
    elsewhere.route = lambda req: json_answer({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, 404)
    error = _pull_error(client, "probe/redirected:v1")
    assert error.error == "pull model manifest: file does not exist"
    assert BASIC in evil.authorizations()  # the registry got them: they exist
    assert len(elsewhere.requests) == 1
    assert elsewhere.authorizations() == []


def test_redirects_are_few_and_http_only(client, evil):
    evil.route = lambda req: Answer(302, {"Location": f"/hop/{len(evil.requests)}"})
    error = _pull_error(client, "probe/loop:v1")
    assert error.error.endswith("stopped after 5 redirects"), error.error
    assert len(evil.requests) == 6  # the request and five redirects, no more
    for target in ("file:///etc/passwd", "gopher://127.0.0.1:70/x", "ftp://127.0.0.1/x"):
        evil.reset()
        evil.route = lambda req, target=target: Answer(307, {"Location": target})
        error = _pull_error(client, "probe/scheme:v1")
        scheme = target.split(":")[0]
        assert f'unsupported protocol scheme "{scheme}"' in error.error, error.error


def test_an_upload_location_on_another_host_gets_no_credentials(client, evil, elsewhere,
                                                                store_root):
    """A push: the registry (Basic auth) says it has the big model blob and sends the upload
    of the small ones to another host, which must not see the credentials."""
    client.copy(MODEL, "probe/upload:v1")
    manifest = json.loads(ModelName.parse("probe/upload:v1").manifest_path(
        OllamaStore(store_root).manifests_dir).read_bytes())
    model_blob = next(layer["digest"] for layer in manifest["layers"]
                      if layer["mediaType"] == MEDIA_PREFIX + "model")

    def registry(req: dict[str, Any]) -> Answer:
        if req["method"] == "HEAD":
            return Answer(200 if req["path"].endswith(model_blob) else 404)
        if req["method"] == "POST":
            return Answer(202, {"Location": elsewhere.url(f"/uploads/{uuid.uuid4().hex}")})
        if req["method"] == "PUT" and "/manifests/" in req["path"]:
            return Answer(201)
        return Answer(400)

    evil.route = _wants_basic(registry)
    elsewhere.route = lambda req: Answer(201 if req["method"] == "PUT" else 405)
    try:
        assert client.push("probe/upload:v1", insecure=True).status == "success"
    finally:
        client.delete("probe/upload:v1")
    uploads = [r for r in elsewhere.requests if r["method"] == "PUT"]
    assert len(uploads) == 2 and all(r["size"] > 0 for r in uploads)  # params and config
    assert elsewhere.authorizations() == []
    assert BASIC in evil.authorizations()


# --- 3. server-side request forgery (CVE-2026-5530) ------------------------------------------

def test_a_model_name_on_an_internal_host_is_refused_before_any_request(client, inside):
    for host in (inside.address, f"localhost:{inside.port}"):
        error = _pull_error(client, f"{host}/probe/ssrf:v1")
        assert inside.requests == []
        assert "loopback, private or link-local address: refused" in error.error, error.error
        assert "registry_allow_private: true" in error.error
    client.copy(MODEL, f"{inside.address}/probe/ssrf:v1")
    try:
        with pytest.raises(ollama.ResponseError) as pushed:
            client.push(f"{inside.address}/probe/ssrf:v1", insecure=True)
        assert "loopback, private or link-local address: refused" in pushed.value.error
    finally:
        client.delete(f"{inside.address}/probe/ssrf:v1")
    assert inside.requests == []


def test_a_redirect_to_an_internal_host_is_refused(client, evil, inside):
    evil.route = lambda req: Answer(307, {"Location": inside.url("/latest/meta-data/")})
    error = _pull_error(client, "probe/metadata:v1")
    assert inside.requests == []
    assert "loopback, private or link-local address: refused" in error.error, error.error


def test_a_token_realm_on_an_internal_host_is_refused(client, evil, inside):
    evil.route = lambda req: json_answer({}, 401, {
        "WWW-Authenticate": f'Bearer realm="{inside.url("/admin/token")}",service="x"'})
    error = _pull_error(client, "probe/realm-inside:v1")
    assert inside.requests == []
    assert "loopback, private or link-local address: refused" in error.error, error.error


INTERNAL = ["169.254.169.254", "10.0.0.1", "172.16.0.1", "192.168.1.1", "127.0.0.1",
            "100.64.0.1", "0.0.0.0", "[::1]", "[fc00::1]", "[fe80::1]", "[::]",
            "[::ffff:169.254.169.254]", "[64:ff9b::a9fe:a9fe]", "224.0.0.1"]


@pytest.mark.parametrize("host", INTERNAL)
def test_the_policy_refuses_every_internal_address_without_connecting(host):
    """The ranges loopback cannot stand for: checked by the policy alone (address literals,
    so no lookup and no connection)."""
    from ollama_server.models.registry import HostPolicy, RegistryError, RegistrySettings

    url = f"http://{host}:5000/v2/library/m/manifests/latest"
    with pytest.raises(RegistryError, match="registry_allow_private: true"):
        HostPolicy(RegistrySettings()).check("GET", url)
    HostPolicy(RegistrySettings(allow_private=True)).check("GET", url)
    # A host the configuration names is trusted wherever it is.
    HostPolicy(RegistrySettings(insecure_hosts=[f"{host}:5000"])).check("GET", url)
    HostPolicy(RegistrySettings()).check("GET", "https://93.184.216.34/v2/")  # public


def test_the_address_actually_connected_is_checked_too(inside):
    """A name that resolves to a public address when checked and to an internal one when
    connected (DNS rebinding) meets the check on the connected socket: here a session of the
    registry client connects to loopback without the policy's first look."""
    from ollama_server.models.registry import (
        HostPolicy,
        RegistryError,
        RegistrySettings,
        _guarded_session,
    )

    session = _guarded_session(HostPolicy(RegistrySettings()))
    with pytest.raises(RegistryError, match="loopback, private or link-local address"):
        session.get(inside.url("/v2/"), timeout=10)
    session.close()
    assert inside.requests == []
    allowed = _guarded_session(HostPolicy(RegistrySettings(allow_private=True)))
    assert allowed.get(inside.url("/v2/"), timeout=10).status_code == 404
    allowed.close()
    assert len(inside.requests) == 1


def test_registry_allow_private_is_a_configuration_key_off_by_default():
    from ollama_server.config import load_config
    from ollama_server.models.registry import RegistrySettings

    assert load_config(environ={}).registry_allow_private is False
    on = load_config(environ={"OLLAMA_SERVER_REGISTRY_ALLOW_PRIVATE": "true"})
    assert RegistrySettings.from_config(on).allow_private is True


# --- 4. bombs, endless answers, blobs of the wrong size --------------------------------------

def _challenge_to(realm: str) -> Answer:
    return json_answer({}, 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="e"'})


SMALL = b"a small model layer " * 200


def _attack(where: str, answer: Answer, evil, elsewhere) -> str:
    """Route ``answer`` to ``where`` (manifest, token, blob or error); the blob's digest."""
    layer = _layer(SMALL)
    raw = _manifest([layer])
    if where == "manifest":
        evil.route = lambda req: answer
    elif where == "error":
        answer.status = 500
        evil.route = lambda req: answer
    elif where == "token":
        evil.route = lambda req: _challenge_to(elsewhere.url("/token"))
        elsewhere.route = lambda req: answer
    else:
        evil.route = _serving(raw, answer)
    return layer["digest"]


def _nothing_of(store_root: Path, digest: str) -> list[str]:
    return [p.name for p in (store_root / "blobs").glob(f"sha256-{digest[7:]}*")]


@pytest.mark.parametrize("where", ["manifest", "token", "blob", "error"])
def test_a_gzip_bomb_is_refused_and_memory_stays_flat(client, svc, evil, elsewhere, store_root,
                                                      where):
    bomb = Answer(200, {"Content-Encoding": "gzip", "Content-Type": "application/json"},
                  _gzip_bomb())
    digest = _attack(where, bomb, evil, elsewhere)
    with PeakRss(svc) as rss:
        error = _pull_error(client, f"probe/bomb-{where}:v1")
    assert rss.growth_kb < RSS_GROWTH_LIMIT_KB, (rss.growth_kb, error.error)
    assert _nothing_of(store_root, digest) == []
    words = {"manifest": "pull model manifest: the registry's answer is larger than 4 MiB",
             "token": "answered with more than 64 KiB",
             "blob": f"blob {digest}: the registry sent more where the manifest says "
                     f"{len(SMALL)} bytes: refused, and the partial download removed",
             "error": "pull model manifest: 500"}[where]
    assert words in error.error, error.error
    assert _nothing_of(store_root, digest) == []


@pytest.mark.parametrize("where", ["manifest", "token", "blob", "error"])
def test_an_endless_answer_is_refused_and_memory_stays_flat(client, svc, evil, elsewhere,
                                                            store_root, where):
    server = elsewhere if where == "token" else evil
    digest = _attack(where, Answer(200, {"Content-Type": "application/json"}, _endless()),
                     evil, elsewhere)
    with PeakRss(svc) as rss:
        error = _pull_error(client, f"probe/endless-{where}:v1")
    assert rss.growth_kb < RSS_GROWTH_LIMIT_KB, (rss.growth_kb, error.error)
    assert server.sent < 64 << 20, server.sent  # the service hung up early
    assert _nothing_of(store_root, digest) == []


@pytest.mark.parametrize("shape", ["larger", "smaller", "smaller-chunked", "range-total"])
def test_a_blob_of_another_size_than_its_manifest_says_is_refused_and_removed(
        client, evil, store_root, shape):
    layer = _layer(SMALL)
    raw = _manifest([layer])
    body = {"larger": SMALL + b"more bytes than the manifest says",
            "smaller": SMALL[:-1000], "smaller-chunked": iter([SMALL[:-1000]]),
            "range-total": SMALL}[shape]
    headers = {"Content-Type": "application/octet-stream"}
    status = 200
    if shape == "range-total":  # a partial answer naming another total size
        status = 206
        headers["Content-Range"] = f"bytes 0-{len(SMALL) - 1}/{len(SMALL) * 2}"
    evil.route = _serving(raw, Answer(status, headers, body))
    error = _pull_error(client, f"probe/size-{shape}:v1")
    gets = [r for r in evil.requests if r["path"].endswith(layer["digest"])]
    assert len(gets) == 1  # never retried
    assert _nothing_of(store_root, layer["digest"]) == []
    assert f"probe/size-{shape}:v1" not in [m.model for m in client.list().models]
    assert f"blob {layer['digest']}: the registry sent" in error.error, error.error
    assert "refused, and the partial download removed" in error.error


def test_compressed_answers_within_their_caps_still_pull(client, evil, store_root):
    """What the caps must not break: a gzip manifest and gzip and deflate blobs of several
    pieces (READ_CHUNK each) decode to the right bytes."""
    data = bytes(2 << 20) + hashlib.sha256(b"seed").digest() * (40 << 10)  # ~3.3 MiB
    layer = _layer(data)
    raw = _manifest([layer])
    config = _layer(CONFIG, "config")["digest"]

    def route(req: dict[str, Any]) -> Answer:
        if "/manifests/" in req["path"]:
            answer = _manifest_answer(gzip.compress(raw))
            answer.headers["Content-Encoding"] = "gzip"
            return answer
        if req["path"].endswith(config):
            return Answer(200, {"Content-Encoding": "gzip"}, gzip.compress(CONFIG))
        return Answer(200, {"Content-Encoding": "deflate"}, zlib.compress(data))

    evil.route = route
    try:
        assert client.pull("probe/compressed:v1", insecure=True).status == "success"
        store = OllamaStore(store_root)
        assert store.blob_path(layer["digest"]).read_bytes() == data
        assert ModelName.parse("probe/compressed:v1").manifest_path(
            store.manifests_dir).read_bytes() == raw
    finally:
        client.delete("probe/compressed:v1")
