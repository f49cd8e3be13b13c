"""``/api/pull`` and ``/api/push`` against a real OCI registry (Debian's docker-registry, the
CNCF distribution registry) on loopback, driven by the official ``ollama`` client.

The service runs on its own store (the real smollm2 model, linked in), with the default
registry pointing at a proxy in front of the plain registry, so that a pull can be cut
mid-transfer by byte count: the registry is killed after 30 MB of the 98 MB model layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import ollama
import pytest
import requests

from ollama_server.models.registry import RegistryError, RegistrySettings, push_model
from ollama_server.models.store import ModelName, OllamaStore
from tests.helpers import REAL_MODELS, ServiceProcess, free_port
from tests.registry import CuttingProxy, RegistryProcess, TokenService

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"
MODEL_BLOB = "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_SIZE = 98362432
CUT_AFTER = 30 << 20
USER, PASSWORD = "fleet", "s3cret"


def _link_store(root: Path) -> Path:
    """A store holding only smollm2:135m, its blobs hard-linked (or copied) from the real one."""
    src = OllamaStore(REAL_MODELS)
    dst = OllamaStore(root)
    name = ModelName.parse(MODEL)
    manifest_path = name.manifest_path(src.manifests_dir)
    manifest = json.loads(manifest_path.read_bytes())
    dst.blobs_dir.mkdir(parents=True)
    for entry in [manifest["config"], *manifest["layers"]]:
        blob = src.blob_path(entry["digest"])
        try:
            os.link(blob, dst.blob_path(entry["digest"]))
        except OSError:
            shutil.copyfile(blob, dst.blob_path(entry["digest"]))
    dst.write_manifest(name, manifest_path.read_bytes())
    return root


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory):
    reg = RegistryProcess(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    service = TokenService(tmp_path_factory.mktemp("tokens"), USER, PASSWORD)
    yield service
    service.close()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory, tokens):
    reg = RegistryProcess(tmp_path_factory.mktemp("token-registry"),
                          auth=tokens.registry_auth()).start()
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def proxy(plain_registry):
    prox = CuttingProxy(plain_registry.port).start()
    yield prox
    prox.close()


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    return _link_store(tmp_path_factory.mktemp("store") / "models")


@pytest.fixture(scope="module")
def svc(tmp_path_factory, store_root, proxy, tokens, token_registry, engine_binary):
    """The service on its own store; names without a host are pulled through the proxy."""
    # The registries of these tests are on loopback (allowed explicitly), and credentials only
    # go to the host they are set for: the token service (another port) has its own entry.
    service = ServiceProcess(tmp_path_factory.mktemp("registry-service"), store_root, extra_env={
        "OLLAMA_SERVER_REGISTRY": proxy.address,
        "OLLAMA_SERVER_REGISTRY_AUTH": f"{token_registry.address}={USER}:{PASSWORD},"
                                       f"127.0.0.1:{tokens.port}={USER}:{PASSWORD}",
        "OLLAMA_SERVER_REGISTRY_ALLOW_PRIVATE": "true",
        "OLLAMA_SERVER_REGISTRY_CONCURRENCY": "4"})
    service.ready_or_stopped()
    yield service
    assert service.stop() == 0, service.log()


@pytest.fixture(scope="module")
def client(svc):
    return ollama.Client(host=svc.base_url, timeout=300)


def _names(client) -> list[str]:
    return [m.model for m in client.list().models]


def _digest_of(client, name: str) -> str:
    return next(m.digest for m in client.list().models if m.model == name)


def _statuses(progress) -> list[str]:
    return [p.status for p in progress]


def test_push_delete_then_pull_resumes_after_the_registry_dies_mid_transfer(
        client, svc, store_root, plain_registry, proxy):
    store = OllamaStore(store_root)
    original_digest = _digest_of(client, MODEL)

    # 1. Push to the registry under its host's name (the way `ollama push` is used).
    remote = f"{plain_registry.address}/library/smollm2:135m"
    client.copy(MODEL, remote)
    pushed = list(client.push(remote, insecure=True, stream=True))
    statuses = _statuses(pushed)
    assert statuses[0] == "retrieving manifest"
    assert statuses[-2:] == ["pushing manifest", "success"]
    last = {p.digest: p for p in pushed if p.digest}
    assert last[MODEL_BLOB].status == f"pushing {MODEL_BLOB[7:19]}"
    assert last[MODEL_BLOB].total == last[MODEL_BLOB].completed == MODEL_SIZE
    assert len(last) == 3  # model, params, config
    listed = requests.get(f"http://{plain_registry.address}/v2/library/smollm2/tags/list",
                          timeout=10).json()
    assert listed["tags"] == ["135m"]
    assert plain_registry.blob_data(MODEL_BLOB).stat().st_size == MODEL_SIZE

    # 2. Delete it here: the blobs go too (no other model uses them).
    client.delete(remote)
    client.delete(MODEL)
    assert MODEL not in _names(client)
    assert not store.has_blob(MODEL_BLOB)

    # 3. Pull by its short name (the configured registry: the proxy), and kill the registry
    #    after 30 MB of the model layer. The other two blobs must have been asked for by then:
    #    layers download in parallel.
    proxy.clear()
    proxy.arm(MODEL_BLOB.split(":")[1], after=CUT_AFTER, others=2, on_cut=plain_registry.kill)
    seen = []
    with pytest.raises(ollama.ResponseError) as failed:
        for part in client.pull(MODEL, insecure=True, stream=True):
            seen.append(part)
    assert proxy.cut is not None, "the pull never reached the cut"
    cut_blobs = [r["path"] for r in proxy.cut["requests"] if "/blobs/" in r["path"]]
    assert len(cut_blobs) == 3, cut_blobs
    assert seen[0].status == "pulling manifest"
    assert any(p.digest == MODEL_BLOB and 0 < (p.completed or 0) < MODEL_SIZE for p in seen)
    assert "connection refused" in str(failed.value), failed.value
    # Nothing of the model is visible; the partial download is kept for the next pull.
    assert MODEL not in _names(client)
    assert not ModelName.parse(MODEL).manifest_path(store.manifests_dir).exists()
    partial = store.blobs_dir / f"sha256-{MODEL_BLOB[7:]}-partial"
    kept = partial.stat().st_size
    assert 0 < kept <= CUT_AFTER

    # 4. The registry is back: the pull resumes where the first one stopped.
    plain_registry.start()
    proxy.start()
    proxy.clear()
    resumed = list(client.pull(MODEL, insecure=True, stream=True))
    assert _statuses(resumed)[0] == "pulling manifest"
    assert _statuses(resumed)[-3:] == ["verifying sha256 digest", "writing manifest",
                                       "success"]
    model_gets = [r for r in proxy.blob_requests() if r["path"].endswith(MODEL_BLOB)]
    assert [r["range"] for r in model_gets] == [f"bytes={kept}-"]
    first = next(p for p in resumed if p.digest == MODEL_BLOB)
    assert first.completed == kept and first.total == MODEL_SIZE
    assert not partial.exists()
    assert store.has_blob(MODEL_BLOB)
    assert hashlib.sha256(store.blob_path(MODEL_BLOB).read_bytes()).hexdigest() == \
        MODEL_BLOB[7:]
    # The manifest is the registry's bytes, which are the ones pushed: the same digest.
    assert _digest_of(client, MODEL) == original_digest

    # 5. Pulling again downloads nothing: every blob is already here.
    proxy.clear()
    again = list(client.pull(MODEL, insecure=True, stream=True))
    assert proxy.blob_requests() == []
    done = {p.digest: p for p in again if p.digest}
    assert len(done) == 3 and all(p.completed == p.total for p in done.values())
    assert again[-1].status == "success"

    # 6. And the pulled model answers.
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                        options={"num_predict": 8, "temperature": 0})
    assert reply.message.content.strip()


def test_a_blob_whose_bytes_do_not_match_its_digest_is_refused(client, svc, store_root,
                                                                plain_registry):
    store = OllamaStore(store_root)
    remote = f"{plain_registry.address}/test/tampered:v1"
    # A model with a params layer of its own, pushed, then deleted here.
    list(client.create(model=remote, from_=MODEL, parameters={"temperature": 0.123},
                       stream=True))
    manifest = json.loads(ModelName.parse(remote).manifest_path(store.manifests_dir)
                          .read_bytes())
    params = next(layer for layer in manifest["layers"]
                  if layer["mediaType"].endswith(".params"))
    assert client.push(remote, insecure=True).status == "success"
    client.delete(remote)
    assert not store.has_blob(params["digest"])
    # Same size, other bytes, on the registry's disk: it serves them under the old digest.
    data = plain_registry.blob_data(params["digest"])
    data.write_bytes(data.read_bytes().replace(b"0.123", b"0.999"))

    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.pull(remote, insecure=True, stream=True))
    want = f"digest mismatch, file must be downloaded again: want {params['digest']}, got sha256:"
    assert want in str(streamed.value)
    with pytest.raises(ollama.ResponseError) as whole:
        client.pull(remote, insecure=True, stream=False)
    assert whole.value.status_code == 500 and want in whole.value.error
    assert remote not in _names(client)
    assert not store.has_blob(params["digest"])
    assert not list(store.blobs_dir.glob(f"sha256-{params['digest'][7:]}*"))


def test_errors_are_in_ollamas_words(client, svc, plain_registry):
    host = plain_registry.address
    with pytest.raises(ollama.ResponseError) as missing:
        client.pull(f"{host}/library/nothing-here:v9", insecure=True)
    assert missing.value.error == "pull model manifest: file does not exist"
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(ollama.ResponseError) as down:
        client.pull(f"{closed}/library/x", insecure=True)
    assert down.value.error == (f'pull model manifest: Get "http://{closed}/v2/library/x/'
                                f'manifests/latest": dial tcp {closed}: connect: connection '
                                f'refused')
    with pytest.raises(ollama.ResponseError) as tls:
        client.pull(f"{host}/library/smollm2:135m")  # HTTPS to a plain-HTTP registry
    assert "tls:" in tls.value.error and '"insecure": true' in tls.value.error
    with pytest.raises(ollama.ResponseError) as unknown:
        client.push(f"{host}/library/not-here-either")
    assert unknown.value.status_code == 404
    assert "not found" in unknown.value.error
    bad = requests.post(svc.base_url + "/api/pull", json={"model": "a/b/c/d"}, timeout=10)
    assert bad.status_code == 400 and "invalid model name" in bad.json()["error"]


def test_bearer_token_flow_with_the_registrys_token_authentication(
        client, svc, token_registry, tokens, tmp_path):
    host = token_registry.address
    # The registry really wants a token: its challenge names the token service.
    challenge = requests.get(f"http://{host}/v2/", timeout=10)
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"].startswith(f'Bearer realm="{tokens.realm}"')

    remote = f"{host}/fleet/smollm2:135m"
    client.copy(MODEL, remote)
    assert client.push(remote, insecure=True).status == "success"
    assert any("repository:fleet/smollm2:pull,push" in t["scopes"] for t in tokens.issued)
    assert all(t["service"] == TokenService.SERVICE for t in tokens.issued)
    client.delete(remote)
    assert client.pull(remote, insecure=True).status == "success"
    assert remote in _names(client)
    assert any(t["scopes"] == ["repository:fleet/smollm2:pull"] for t in tokens.issued)

    # Without credentials the token service refuses, and the error says what to set.
    store = OllamaStore(tmp_path / "models")
    _link_store(tmp_path / "models")
    name = ModelName.parse(MODEL)
    store.copy(name, ModelName.parse(remote))
    refused = tokens.refused
    with pytest.raises(RegistryError) as denied:
        list(push_model(store, ModelName.parse(remote), RegistrySettings(allow_private=True),
                        insecure=True))
    assert denied.value.message.startswith("401: ")
    assert f"set registry_auth for {host} in the service configuration" in denied.value.message
    assert tokens.refused > refused
