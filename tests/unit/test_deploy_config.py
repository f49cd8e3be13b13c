"""The original design's configuration as written (a store's blobs folder, a folder inside the
manifests tree, a null default model), the environment file, and ConfigSource (reload)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ollama_server.config import (
    ConfigError,
    ConfigSource,
    load_config,
    manifests_root,
    read_env_file,
)
from ollama_server.models.manager import ModelManager
from tests.helpers import FakeExecutor, Script

SEED_CONFIG = Path(__file__).resolve().parent.parent / "data" / "seed_service_config.yaml"


def seed_config_for(store: Path, engine_dir: Path, dest: Path) -> Path:
    """The seed's example file with its /opt/llm paths pointing at ``store`` and ``engine_dir``."""
    text = SEED_CONFIG.read_text().replace("/opt/llm/models/ollama/models", str(store))
    text = text.replace("/opt/llm/models/ollama-custom-models/llama.cpp", str(engine_dir))
    dest.write_text(text)
    return dest


def manager_for(config) -> ModelManager:
    return ModelManager(config, executor_factory=lambda info, ctx: FakeExecutor(
        info.name, ctx, Script()), engine_binary=Path("/bin/true"))


def test_seed_example_config_finds_the_store_models(tiny_store, tmp_path):
    cfg = load_config(seed_config_for(tiny_store, tmp_path, tmp_path / "c.yaml"), environ={})
    assert cfg.models_path == tiny_store
    assert cfg.manifests_path == tiny_store / "manifests"
    assert (cfg.default_model, cfg.tensor_split, cfg.gpu_layers) == (
        None, [0.25, 0.25, 0.25, 0.25], 999)
    manager = manager_for(cfg)
    try:
        assert [m.name for m in manager.list_models()] == ["ns/other:v1", "tiny:latest"]
        # Names resolve as they do from the store's root.
        assert manager.resolve("tiny").name == "tiny:latest"
        assert manager.resolve("registry.ollama.ai/ns/other:v1").name == "ns/other:v1"
        # default_model: null means the first model available.
        assert manager.default_model_name() == "ns/other:v1"
    finally:
        manager.shutdown()


def test_list_as_tensor_split_and_explicit_default(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tensor_split: [0.5, 0.5]\ndefault_model: tiny\n")
    c = load_config(cfg, environ={})
    assert (c.tensor_split, c.default_model) == ([0.5, 0.5], "tiny")
    assert load_config(cfg, environ={"OLLAMA_SERVER_DEFAULT_MODEL": ""}).default_model is None


def test_manifests_root_from_any_folder_inside(tiny_store, tmp_path):
    root = tiny_store / "manifests"
    for inside in (root, root / "registry.ollama.ai", root / "registry.ollama.ai/library",
                   root / "registry.ollama.ai/library/tiny"):
        assert manifests_root(inside) == root
    # A tree under another name is recognised by how deep its manifests lie.
    other = tmp_path / "elsewhere"
    (root).rename(other)
    assert manifests_root(other / "registry.ollama.ai" / "library") == other
    assert manifests_root(other) == other


def test_env_file_is_read_on_every_load(tmp_path):
    env_file = tmp_path / "environment"
    env_file.write_text("# comment\nOLLAMA_SERVER_KEEP_ALIVE=12\nexport OLLAMA_SERVER_API_KEY="
                        "'s3cret'\n")
    environ = {"OLLAMA_SERVER_ENV_FILE": str(env_file), "OLLAMA_SERVER_KEEP_ALIVE": "5"}
    source = ConfigSource(None, {"port": 9001})
    c = source.load(environ)
    assert (c.keep_alive, c.api_key, c.port) == (12.0, "s3cret", 9001)
    env_file.write_text("OLLAMA_SERVER_PORT=9999\n")  # flags still win over the environment
    c = source.load(environ)
    assert (c.keep_alive, c.api_key, c.port) == (5.0, None, 9001)
    assert read_env_file(env_file) == {"OLLAMA_SERVER_PORT": "9999"}


def test_bad_env_file_line_is_refused(tmp_path):
    env_file = tmp_path / "environment"
    env_file.write_text("just words\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_config(environ={"OLLAMA_SERVER_ENV_FILE": str(env_file)})


def test_source_describes_where_values_come_from(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9000\n")
    where = ConfigSource(str(cfg), {"models_dir": "/m"}).describe({})
    assert where == {"file": str(cfg.resolve()), "env_file": None, "flags": ["models_dir"]}


def test_invalid_yaml_names_the_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9000\nthreads: [1,\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+\)"):
        load_config(cfg, environ={})


def test_shutdown_timeout_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="shutdown_timeout"):
        load_config(environ={"OLLAMA_SERVER_SHUTDOWN_TIMEOUT": "0"})


def test_store_files_are_readable_by_other_users(tmp_path):
    """A service or container running as another user reads the store (as Ollama's)."""
    import io

    from ollama_server.models.store import ModelName, OllamaStore

    store = OllamaStore(tmp_path)
    hex_digest, size = store.write_blob(io.BytesIO(b"weights"))
    layers = [{"mediaType": "application/vnd.ollama.image.model",
               "digest": f"sha256:{hex_digest}", "size": size}]
    path = store.write_manifest(ModelName.parse("m:1"), store.build_manifest(layers, {}))
    blob = store.blob_path(f"sha256:{hex_digest}")
    assert blob.stat().st_mode & 0o777 == 0o644 and path.stat().st_mode & 0o777 == 0o644
    blob.chmod(0o600)
    store.make_readable(path)
    assert blob.stat().st_mode & 0o777 == 0o644


def test_status_helpers_format_durations_and_devices():
    from ollama_server.user_service import human_duration, model_line

    assert [human_duration(s) for s in (12, 250, 7500, 190000)] == [
        "12s", "4m 10s", "2h 5m", "2d 4h"]
    base = {"name": "m:1", "state": "ready", "pid": 7, "context_length": 4096}
    assert model_line(base).endswith("on CPU, 0 in flight")
    assert "on GPU (512 MiB)" in model_line({**base, "gpu_memory_mib": 512.0})
    assert "on CUDA0, RPC0[10.0.0.2:50052]" in model_line(
        {**base, "devices": [{"name": "CUDA0"}, "RPC0[10.0.0.2:50052]"]})
