"""The registry client's pure parts and the store's resumable blob writer (no network)."""

from __future__ import annotations

import hashlib
import json

import pytest
import requests

from ollama_server.config import ConfigError, load_config
from ollama_server.models.registry import (
    RegistryError,
    RegistrySettings,
    Remote,
    Transfer,
    describe_network_error,
    parse_challenge,
    parse_manifest,
)
from ollama_server.models.store import (
    MEDIA_PREFIX,
    DigestMismatch,
    ModelName,
    OllamaStore,
    PartialBlob,
)


def test_challenge_parameters_quoted_unquoted_and_with_commas():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:library/m:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example",
                      "scope": "repository:library/m:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
    assert parse_challenge("Bearer realm=https://a/t,service=s") == (
        "bearer", {"realm": "https://a/t", "service": "s"})
    assert parse_challenge("") == ("", {})


@pytest.mark.parametrize("name, insecure, expect", [
    ("llama3.2", False, "https://reg.corp:5000/v2/library/llama3.2/manifests/latest"),
    ("team/m:v1", True, "http://reg.corp:5000/v2/team/m/manifests/v1"),
    ("other.host/ns/m:t", False, "https://other.host/v2/ns/m/manifests/t"),
    ("plain.host:80/ns/m:t", False, "http://plain.host:80/v2/ns/m/manifests/t"),
])
def test_names_without_a_host_go_to_the_configured_registry(name, insecure, expect):
    settings = RegistrySettings(default_registry="reg.corp:5000",
                                insecure_hosts=["plain.host:80"])
    remote = Remote.of(ModelName.parse(name), settings, insecure)
    assert remote.url("manifests", remote.tag) == expect


def test_network_errors_read_like_ollamas():
    url = "http://127.0.0.1:9/v2/library/x/manifests/latest"
    refused = requests.exceptions.ConnectionError(ConnectionRefusedError(111, "refused"))
    assert describe_network_error("GET", url, refused) == (
        f'Get "{url}": dial tcp 127.0.0.1:9: connect: connection refused')
    assert describe_network_error("GET", url, requests.exceptions.ReadTimeout()) == \
        f'Get "{url}": i/o timeout'
    tls = describe_network_error("GET", url.replace("http", "https"),
                                 requests.exceptions.SSLError("wrong version number"))
    assert "tls: wrong version number" in tls and '"insecure": true' in tls


def _manifest(**over):
    manifest = {"schemaVersion": 2,
                "config": {"digest": "sha256:" + "c" * 64, "size": 10},
                "layers": [{"mediaType": MEDIA_PREFIX + "model",
                            "digest": "sha256:" + "a" * 64, "size": 5}]}
    manifest.update(over)
    return json.dumps(manifest).encode()


def test_manifest_checks():
    _, blobs = parse_manifest(_manifest())
    assert [b["digest"][7] for b in blobs] == ["a", "c"]  # layers, then the config
    for raw, words in [
        (b"<html>", "not JSON"),
        (_manifest(layers=[]), "lists no layers"),
        (_manifest(layers=[{"mediaType": MEDIA_PREFIX + "model", "digest": "md5:x",
                            "size": 1}]), "only sha256"),
        (_manifest(layers=[{"mediaType": MEDIA_PREFIX + "model",
                            "digest": "sha256:" + "a" * 64}]), "has no size"),
        (_manifest(layers=[{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": "sha256:" + "a" * 64, "size": 1}]),
         "not an Ollama model"),
    ]:
        with pytest.raises(RegistryError, match=words) as err:
            parse_manifest(raw)
        assert err.value.message.startswith("pull model manifest: ")


def test_progress_objects_leave_out_zero_values_as_ollama_does():
    t = Transfer("sha256:" + "ab" * 32, 100)
    assert t.progress("pulling") == {"status": "pulling " + "ab" * 6,
                                     "digest": "sha256:" + "ab" * 32, "total": 100}
    t.completed = 40
    assert t.progress("pushing")["completed"] == 40


def test_partial_blob_resumes_and_verifies(tmp_path):
    store = OllamaStore(tmp_path)
    data = bytes(range(256)) * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    first = PartialBlob(store, digest, len(data))
    assert first.open() == 0
    first.write(data[:1000])
    first.close()  # interrupted: the partial file stays
    assert first.path.stat().st_size == 1000 and not store.has_blob(digest)
    second = PartialBlob(store, digest, len(data))
    assert second.open() == 1000  # resumes at its end, with the hash of what is there
    second.write(data[1000:])
    second.commit()
    assert store.has_blob(digest) and not second.path.exists()
    assert store.blob_path(digest).read_bytes() == data


def test_partial_blob_refuses_other_bytes_and_leaves_nothing(tmp_path):
    store = OllamaStore(tmp_path)
    digest = "sha256:" + hashlib.sha256(b"right").hexdigest()
    blob = PartialBlob(store, digest, 5)
    blob.open()
    blob.write(b"wrong")
    with pytest.raises(DigestMismatch, match="digest mismatch, file must be downloaded again: "
                                             f"want {digest}, got sha256:"):
        blob.commit()
    assert list(store.blobs_dir.iterdir()) == []
    longer = PartialBlob(store, digest, 5)
    longer.path.write_bytes(b"too long for it")
    assert longer.open() == 0  # longer than the blob: started afresh
    longer.close()


def test_pinned_blobs_survive_a_prune(tmp_path):
    store = OllamaStore(tmp_path)
    hex_digest, _ = store.write_bytes_blob(b"shared")
    manifest = {"layers": [{"digest": f"sha256:{hex_digest}"}]}
    with store.pinned([f"sha256:{hex_digest}"]):
        assert store.prune(manifest) == 0
        assert store.has_blob(f"sha256:{hex_digest}")
    assert store.prune(manifest) == 1
    assert not store.has_blob(f"sha256:{hex_digest}")


def test_registry_configuration_keys():
    config = load_config(environ={"OLLAMA_SERVER_REGISTRY": "reg.corp:5000",
                                  "OLLAMA_SERVER_REGISTRY_INSECURE": "reg.corp:5000, b:1",
                                  "OLLAMA_SERVER_REGISTRY_AUTH": "reg.corp:5000=u:p:w"})
    settings = RegistrySettings.from_config(config)
    assert settings.default_registry == "reg.corp:5000"
    assert settings.insecure_hosts == ["reg.corp:5000", "b:1"]
    assert settings.credentials == {"reg.corp:5000": "u:p:w"}
    assert settings.concurrency == 4
    for env, key in [({"OLLAMA_SERVER_REGISTRY": "http://reg"}, "registry"),
                     ({"OLLAMA_SERVER_REGISTRY_AUTH": "host=nopassword"}, "registry_auth"),
                     ({"OLLAMA_SERVER_REGISTRY_CONCURRENCY": "0"}, "registry_concurrency")]:
        with pytest.raises(ConfigError, match=key):
            load_config(environ=env)
