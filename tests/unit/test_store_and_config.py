"""Pure tests of model names, the Ollama store's atomic writes, and configuration."""

from __future__ import annotations

import io

import pytest

from ollama_server.config import ConfigError, load_config
from ollama_server.core.errors import InvalidRequest
from ollama_server.models.store import ModelName, OllamaStore


@pytest.mark.parametrize("name,short,parts", [
    ("smollm2:135m", "smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m")),
    ("llama3.2", "llama3.2:latest", ("registry.ollama.ai", "library", "llama3.2", "latest")),
    ("user/model:q4", "user/model:q4", ("registry.ollama.ai", "user", "model", "q4")),
    ("hf.co/bartowski/Qwen2.5-0.5B-GGUF:Q4_K_M", "hf.co/bartowski/Qwen2.5-0.5B-GGUF:Q4_K_M",
     ("hf.co", "bartowski", "Qwen2.5-0.5B-GGUF", "Q4_K_M")),
    ("localhost:5000/ns/m:1", "localhost:5000/ns/m:1", ("localhost:5000", "ns", "m", "1")),
])
def test_names_resolve_like_ollama(name, short, parts):
    parsed = ModelName.parse(name)
    assert (parsed.host, parsed.namespace, parsed.model, parsed.tag) == parts
    assert parsed.short == short


@pytest.mark.parametrize("bad", ["", "   ", "../etc/passwd", "/abs/path", "a/../../b",
                                 "a/b/c/d", "..:latest", "x:../y", "m\\x", "a/b/..", "ns/..",
                                 "-x", "a:b:c/d"])
def test_names_that_leave_the_store_are_rejected(bad):
    with pytest.raises(InvalidRequest):
        ModelName.parse(bad)


def test_manifest_path_stays_inside_store(tmp_path):
    path = ModelName.parse("hf.co/u/r:t").manifest_path(tmp_path / "manifests")
    assert path == tmp_path / "manifests/hf.co/u/r/t"


def test_blob_write_is_atomic_and_verified(tmp_path):
    store = OllamaStore(tmp_path)
    digest, size = store.write_blob(io.BytesIO(b"hello"))
    assert size == 5 and (tmp_path / f"blobs/sha256-{digest}").read_bytes() == b"hello"
    with pytest.raises(InvalidRequest, match="digest mismatch"):
        store.write_blob(io.BytesIO(b"other"), expected_hex="0" * 64)
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [f"sha256-{digest}"]


def test_interrupted_upload_leaves_nothing(tmp_path):
    class Broken(io.RawIOBase):
        def __init__(self):
            self.calls = 0

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 2:
                raise ConnectionResetError("client went away")
            return b"x" * 10

    store = OllamaStore(tmp_path)
    with pytest.raises(ConnectionResetError):
        store.write_blob(Broken())
    assert list((tmp_path / "blobs").iterdir()) == []


def test_delete_keeps_blobs_other_manifests_use(tmp_path):
    store = OllamaStore(tmp_path)
    shared, _ = store.write_bytes_blob(b"weights")
    own, _ = store.write_bytes_blob(b"params-a")
    layers_a = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{shared}",
                 "size": 7},
                {"mediaType": "application/vnd.ollama.image.params", "digest": f"sha256:{own}",
                 "size": 8}]
    layers_b = layers_a[:1]
    store.write_manifest(ModelName.parse("a:1"), store.build_manifest(layers_a, {"x": 1}))
    store.write_manifest(ModelName.parse("b:1"), store.build_manifest(layers_b, {"x": 1}))
    assert store.delete(ModelName.parse("a:1"))
    assert (tmp_path / f"blobs/sha256-{shared}").exists()
    assert not (tmp_path / f"blobs/sha256-{own}").exists()
    assert not store.delete(ModelName.parse("a:1"))


def test_config_layers_yaml_env_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9000\nthreads: 2\ntensor_split: '3,1'\n")
    c = load_config(cfg, environ={"OLLAMA_SERVER_THREADS": "4"})
    assert (c.port, c.threads, c.tensor_split) == (9000, 4, [3.0, 1.0])
    c = load_config(cfg, overrides={"port": 9100}, environ={})
    assert c.port == 9100
    c = load_config(cfg, environ={"OLLAMA_MODELS": "/srv/ollama"})
    assert c.models_dir == "/srv/ollama"


@pytest.mark.parametrize("text,key", [
    ("port: lots\n", "port"),
    ("port: 0\n", "port"),
    ("parallel: -1\n", "parallel"),
    ("log_level: LOUD\n", "log_level"),
    ("tensor_split: 'a,b'\n", "tensor_split"),
    ("preserve_think_tags: maybe\n", "preserve_think_tags"),
    ("no_such_key: 1\n", "no_such_key"),
    ("max_loaded_models: 1\npreload: [a, b]\n", "preload names 2 models"),
])
def test_bad_config_values_name_the_key(tmp_path, text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_config(cfg, environ={})


def test_preload_is_a_list_in_yaml_or_the_environment(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preload:\n  - smollm2:135m\n")
    assert load_config(cfg, environ={}).preload == ["smollm2:135m"]
    c = load_config(environ={"OLLAMA_SERVER_PRELOAD": "smollm2:135m, gemma3:270m"})
    assert c.preload == ["smollm2:135m", "gemma3:270m"]
    assert load_config(environ={}).preload == []


def test_bad_env_value_names_the_key():
    with pytest.raises(ConfigError, match="request_timeout"):
        load_config(environ={"OLLAMA_SERVER_REQUEST_TIMEOUT": "soon"})


def test_main_exits_nonzero_on_bad_flag_value(capsys):
    from ollama_server.main import main

    assert main(["--port", "0"]) == 2
    assert "port" in capsys.readouterr().err


def test_debug_key_raises_the_log_level():
    assert load_config(overrides={"debug": True}, environ={}).log_level == "DEBUG"
    assert load_config(environ={"OLLAMA_SERVER_DEBUG": "1"}).log_level == "DEBUG"


def test_quantization_names_match_the_gguf_package():
    """Our table of llama.cpp file types is gguf's LlamaFileType (kept out of the service)."""
    from gguf import LlamaFileType

    from ollama_server.models.gguf_meta import quantization_name

    for member in LlamaFileType:
        assert quantization_name(member.value) == member.name.removeprefix(
            "MOSTLY_").removeprefix("ALL_")
    assert quantization_name(None) == "" and quantization_name(999) == "999"
