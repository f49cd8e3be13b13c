"""Issue 25: one bad model never breaks the others.

A store holds the two real models and, beside them, models whose files are bad in every way a
crafted or damaged store can be: a manifest that is not JSON or has fields of the wrong type, a
params layer that is not JSON or holds values of the wrong type or out of range, a model (or
projector) blob replaced by garbage or by a crafted GGUF, a blob missing. On the real service:

- every listing (/api/tags, /api/models, /v1/models, /api/ps, /health, the Ollama client's
  list) keeps working and leaves the bad models out, with one log line each (Ollama's own
  behaviour: its list skips a manifest it cannot read, with a warning);
- /api/show and /api/generate of a bad model are a 400 naming the problem, never a 500, and no
  engine is started for it; the good models still generate;
- a blob replaced after the model was listed is noticed (no engine on the new bytes);
- /api/delete removes each bad model, and deleting a good one still works beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import ollama
import pytest
import requests

from ollama_server.models.store import MEDIA_PREFIX, ModelName, OllamaStore
from tests.e2e.test_fuzz import clone_store
from tests.helpers import ServiceProcess, add_store_model, write_tiny_gguf
from tests.security.gguf_craft import ATTACKS, STRING, base_kvs, build

pytestmark = pytest.mark.e2e

GOOD = ("smollm2:135m", "gemma3:270m")


def _blob(store: OllamaStore, data: bytes) -> str:
    hex_digest, _ = store.write_bytes_blob(data)
    return f"sha256:{hex_digest}"


def _manifest(store: OllamaStore, name: str, manifest) -> None:
    path = ModelName.parse(name).manifest_path(store.manifests_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))


def _model(store: OllamaStore, name: str, model_digest: str, size: int = 1,
           extra: list | None = None) -> None:
    layers = [{"mediaType": MEDIA_PREFIX + "model", "digest": model_digest, "size": size},
              *(extra or [])]
    _manifest(store, name, store.build_manifest(layers, {"model_format": "gguf"}))


def _with_params(store: OllamaStore, name: str, good: str, text: str) -> None:
    _model(store, name, good, extra=[{"mediaType": MEDIA_PREFIX + "params",
                                      "digest": _blob(store, text.encode()),
                                      "size": len(text)}])


def write_bad_models(store: OllamaStore, good_model: str) -> dict[str, str]:
    """Bad models beside the good ones; name → words the refusal names."""
    bad: dict[str, str] = {}

    def add(name: str, words: str) -> None:
        bad[name] = words

    _manifest(store, "bad-not-json:latest", "{not json")
    add("bad-not-json:latest", "manifest")
    _manifest(store, "bad-list:latest", [1, 2, 3])
    add("bad-list:latest", "not a JSON object")
    _manifest(store, "bad-layers:latest", {"schemaVersion": 2, "layers": "model"})
    add("bad-layers:latest", "'layers'")
    _manifest(store, "bad-layer-item:latest", {"schemaVersion": 2, "layers": [7]})
    add("bad-layer-item:latest", "layer 0")
    _manifest(store, "bad-digest:latest", {"schemaVersion": 2, "layers": [
        {"mediaType": MEDIA_PREFIX + "model", "digest": 12345, "size": 1}]})
    add("bad-digest:latest", "digest")
    _manifest(store, "bad-size:latest", {"schemaVersion": 2, "layers": [
        {"mediaType": MEDIA_PREFIX + "model", "digest": good_model, "size": "huge"}]})
    add("bad-size:latest", "size")
    _manifest(store, "bad-config:latest", {"schemaVersion": 2, "config": "x", "layers": [
        {"mediaType": MEDIA_PREFIX + "model", "digest": good_model, "size": 1}]})
    add("bad-config:latest", "'config'")
    _manifest(store, "bad-no-model:latest", {"schemaVersion": 2, "layers": []})
    add("bad-no-model:latest", "no model layer")
    _with_params(store, "bad-params-json:latest", good_model, "{temperature: hot")
    add("bad-params-json:latest", "params")
    _with_params(store, "bad-params-list:latest", good_model, "[1, 2]")
    add("bad-params-list:latest", "params")
    _with_params(store, "bad-params-type:latest", good_model, '{"temperature": "hot"}')
    add("bad-params-type:latest", "temperature")
    _with_params(store, "bad-params-stop:latest", good_model, '{"stop": 5}')
    add("bad-params-stop:latest", "stop")
    _with_params(store, "bad-params-ctx:latest", good_model, '{"num_ctx": "many"}')
    add("bad-params-ctx:latest", "num_ctx")
    _with_params(store, "bad-params-range:latest", good_model, '{"num_ctx": 1e30}')
    add("bad-params-range:latest", "num_ctx")
    _with_params(store, "bad-params-nan:latest", good_model, '{"top_p": NaN}')
    add("bad-params-nan:latest", "top_p")
    _model(store, "bad-missing-blob:latest", "sha256:" + "ab" * 32)
    add("bad-missing-blob:latest", "missing")
    _model(store, "bad-garbage-blob:latest", _blob(store, b"\x00garbage" * 512))
    add("bad-garbage-blob:latest", "not a GGUF file")
    overflow, words = ATTACKS["string length past the file"]
    _model(store, "bad-crafted-blob:latest", _blob(store, overflow))
    add("bad-crafted-blob:latest", words)
    nested, words = ATTACKS["deeply nested arrays"]
    _model(store, "bad-nested-blob:latest", _blob(store, nested))
    add("bad-nested-blob:latest", words)
    typed = build(kvs=base_kvs(**{"ARCH.context_length": (STRING, "lots")}))
    _model(store, "bad-typed-blob:latest", _blob(store, typed))
    add("bad-typed-blob:latest", "context_length")
    _model(store, "bad-projector:latest", good_model, extra=[{
        "mediaType": MEDIA_PREFIX + "projector",
        "digest": _blob(store, b"GGUF" + b"\xff" * 60), "size": 64}])
    add("bad-projector:latest", "projector")
    return bad


@pytest.fixture(scope="module")
def bad_store(tmp_path_factory, real_models) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("bad-models")
    root = clone_store(real_models, tmp / "models")
    store = OllamaStore(root)
    manifest = json.loads((root / "manifests/registry.ollama.ai/library/smollm2/135m")
                          .read_text())
    good_model = next(layer["digest"] for layer in manifest["layers"]
                      if layer["mediaType"].endswith(".model"))
    bad = write_bad_models(store, good_model)
    # A model whose blob is its own, to be replaced by garbage once it has been listed.
    add_store_model(store, "swap:latest", write_tiny_gguf(tmp / "swap.gguf"))
    return root, bad


@pytest.fixture(scope="module")
def service(tmp_path_factory, bad_store, engine_binary):
    svc = ServiceProcess(tmp_path_factory.mktemp("bad-models-service"), bad_store[0])
    svc.ready_or_stopped()
    yield svc
    assert svc.stop() == 0, svc.log()


@pytest.fixture(scope="module")
def bad(bad_store) -> dict[str, str]:
    return bad_store[1]


def names(resp: requests.Response, key: str = "models", field: str = "name") -> set[str]:
    assert resp.status_code == 200, resp.text[:500]
    return {m[field] for m in resp.json()[key]}


def test_every_listing_keeps_working_and_leaves_the_bad_models_out(service, bad):
    base = service.base_url
    for _ in range(3):  # each listing reads the store again
        tags = names(requests.get(base + "/api/tags", timeout=30))
        assert set(GOOD) | {"swap:latest"} <= tags and not tags & set(bad), tags
    assert set(GOOD) <= names(requests.get(base + "/api/models", timeout=30))
    v1 = names(requests.get(base + "/v1/models", timeout=30), "data", "id")
    assert set(GOOD) <= v1 and not v1 & set(bad)
    assert requests.get(base + "/api/ps", timeout=30).status_code == 200
    health = requests.get(base + "/health", timeout=30)
    assert health.status_code == 200, health.text
    listed = {m.model for m in ollama.Client(host=base).list().models}
    assert set(GOOD) <= listed and not listed & set(bad)


def test_each_bad_model_is_logged_once(service, bad):
    requests.get(service.base_url + "/api/tags", timeout=30)
    log = service.log_path.read_text()
    for name in bad:
        lines = [line for line in log.splitlines() if f"'{name}'" in line]
        assert len(lines) == 1, (name, lines)
    assert "Traceback" not in log


def test_show_of_a_bad_model_is_a_400_naming_the_problem(service, bad):
    for name, words in bad.items():
        resp = requests.post(service.base_url + "/api/show", json={"model": name}, timeout=30)
        assert resp.status_code == 400, (name, resp.status_code, resp.text[:300])
        error = resp.json()["error"]
        assert name in error and words in error, (name, error)
        assert "delete" in error  # what to do next


def test_generating_with_a_bad_model_is_a_400_and_starts_no_engine(service, bad):
    base = service.base_url
    for name in bad:
        for path, body in (("/api/generate", {"prompt": "Hi"}),
                           ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Hi"}]})):
            resp = requests.post(base + path, json={"model": name, "stream": False, **body},
                                 timeout=30)
            assert resp.status_code == 400, (name, path, resp.status_code, resp.text[:300])
    assert service.engines() == []
    assert requests.get(base + "/api/ps", timeout=30).json()["models"] == []


def test_the_good_models_still_generate(service):
    resp = requests.post(service.base_url + "/api/generate", timeout=300, json={
        "model": "smollm2:135m", "prompt": "Hi", "stream": False,
        "options": {"num_predict": 2}})
    assert resp.status_code == 200 and resp.json()["done"], resp.text
    assert [m["name"] for m in requests.get(service.base_url + "/api/ps",
                                            timeout=30).json()["models"]] == ["smollm2:135m"]


def test_a_blob_replaced_after_listing_is_noticed(service, bad_store):
    base = service.base_url
    assert "swap:latest" in names(requests.get(base + "/api/tags", timeout=30))
    assert requests.post(base + "/api/show", json={"model": "swap"}, timeout=30).ok
    store = OllamaStore(bad_store[0])
    manifest = store.read_manifest(ModelName.parse("swap").manifest_path(store.manifests_dir))
    blob = store.blob_path(store.layer(manifest, "model")["digest"])
    engines_before = set(service.engines())
    blob.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 200)  # replaced in place
    show = requests.post(base + "/api/show", json={"model": "swap"}, timeout=30)
    assert show.status_code == 400 and "swap:latest" in show.json()["error"], show.text
    gen = requests.post(base + "/api/generate", timeout=60, json={
        "model": "swap", "prompt": "Hi", "stream": False})
    assert gen.status_code == 400, gen.text
    assert set(service.engines()) <= engines_before
    assert "swap:latest" not in names(requests.get(base + "/api/tags", timeout=30))


def test_deleting_a_good_model_works_beside_the_bad_ones(service):
    base = service.base_url
    assert requests.post(base + "/api/copy", timeout=30, json={
        "source": "smollm2:135m", "destination": "victim:latest"}).status_code == 200
    resp = requests.delete(base + "/api/delete", json={"model": "victim"}, timeout=30)
    assert resp.status_code == 200, resp.text
    tags = names(requests.get(base + "/api/tags", timeout=30))
    assert "victim:latest" not in tags and "smollm2:135m" in tags


def test_delete_removes_each_bad_model(service, bad, bad_store):
    base = service.base_url
    manifests = bad_store[0] / "manifests"
    for name in bad:
        resp = requests.delete(base + "/api/delete", json={"model": name}, timeout=30)
        assert resp.status_code == 200, (name, resp.status_code, resp.text[:300])
        assert not ModelName.parse(name).manifest_path(manifests).exists()
        gone = requests.post(base + "/api/show", json={"model": name}, timeout=30)
        assert gone.status_code == 404, (name, gone.text)
    assert set(GOOD) <= names(requests.get(base + "/api/tags", timeout=30))
    # The good models' blobs survived every prune.
    gen = requests.post(base + "/api/generate", timeout=300, json={
        "model": "gemma3:270m", "prompt": "Hi", "stream": False,
        "options": {"num_predict": 2}})
    assert gen.status_code == 200, gen.text
