"""Fixtures for the test layers (unit, api, engine, e2e, deploy, security): README, Tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ollama_server.config import load_config
from ollama_server.core.request_tracker import RequestTracker
from ollama_server.models.manager import ModelManager
from ollama_server.models.store import OllamaStore
from tests.helpers import (
    REAL_MODELS,
    FakeExecutor,
    Script,
    ServiceProcess,
    add_store_model,
    pid_alive,
    write_tiny_gguf,
)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A small real GGUF (llama architecture, 4096 context, ChatML template)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def tiny_store(tmp_path, tiny_gguf) -> Path:
    """An Ollama store with ``tiny:latest`` (params: temperature 0.5) and ``ns/other:v1``."""
    root = tmp_path / "models"
    store = OllamaStore(root)
    add_store_model(store, "tiny:latest", tiny_gguf, params={"temperature": 0.5})
    add_store_model(store, "ns/other:v1", tiny_gguf, params={}, system="Be brief.")
    return root


@pytest.fixture
def script() -> Script:
    """What the fake executor will answer (tests change it)."""
    return Script()


@pytest.fixture
def fake_engines() -> list[FakeExecutor]:
    """Every FakeExecutor the manager created, in order."""
    return []


@pytest.fixture
def app(tiny_store, script, fake_engines, tmp_path):
    """The Flask app over the tiny store with a scripted executor (no engine)."""
    from ollama_server.api.app import create_app

    config = load_config(overrides={"models_dir": str(tiny_store),
                                    "log_dir": str(tmp_path / "logs")}, environ={})

    def factory(info, ctx):
        engine = FakeExecutor(info.name, ctx, script)
        fake_engines.append(engine)
        return engine

    manager = ModelManager(config, executor_factory=factory, engine_binary=Path("/bin/true"))
    application = create_app(config, manager=manager, tracker=RequestTracker())
    yield application
    manager.shutdown()


@pytest.fixture
def client(app):
    """Flask test client."""
    return app.test_client()


@pytest.fixture(scope="session")
def real_models() -> Path:
    """The store with the real test models (make models). Missing is a failure, not a skip."""
    manifest = REAL_MODELS / "manifests/registry.ollama.ai/library/smollm2/135m"
    if not manifest.is_file():
        pytest.fail(f"the real test models are missing from {REAL_MODELS}: run `make models`")
    return REAL_MODELS


@pytest.fixture(scope="session")
def engine_binary() -> Path:
    """The real llama-server. Missing is a failure, not a skip."""
    from ollama_server.provision.engine import EngineNotFound, resolve_binary

    try:
        return resolve_binary(None)
    except EngineNotFound as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def service(tmp_path_factory, real_models, engine_binary):
    """The real service on a free port with the real models, shared by the e2e tests.

    At the end it is stopped with SIGTERM, and no llama-server it started may remain.
    """
    svc = ServiceProcess(tmp_path_factory.mktemp("service"), real_models)
    svc.ready_or_stopped()
    yield svc
    code = svc.stop()
    leftovers = [p for p in svc.engine_pids if pid_alive(p)]
    assert not leftovers, f"llama-server processes left after shutdown: {leftovers}"
    assert code == 0, f"service exited with {code}: {svc.log()}"


@pytest.fixture(scope="session")
def base_url(service) -> str:
    """Base URL of the shared real service."""
    return service.base_url


# Issue 12: a service that needs keys, with few slots and a short queue (OLLAMA_MAX_QUEUE).
SERVICE_KEYS = {"alice": "sk-alice-e2e-5f1c0b", "bob": "sk-bob-e2e-93d7aa"}
KEYED_PARALLEL = 2
KEYED_MAX_QUEUE = 4


@pytest.fixture(scope="session")
def keyed_service(tmp_path_factory, real_models, engine_binary):
    """The real service with two named API keys (a key file), 2 slots per model and a queue
    of 4 (set through Ollama's OLLAMA_MAX_QUEUE), shared by the security tests."""
    tmp = tmp_path_factory.mktemp("keyed")
    keyfile = tmp / "api-keys"
    keyfile.write_text("".join(f"{name}: {key}\n" for name, key in SERVICE_KEYS.items()))
    svc = ServiceProcess(tmp, real_models, args=["--parallel", str(KEYED_PARALLEL)],
                         extra_env={"OLLAMA_SERVER_API_KEYS": str(keyfile),
                                    "OLLAMA_MAX_QUEUE": str(KEYED_MAX_QUEUE)})
    svc.ready_or_stopped()
    yield svc
    assert svc.stop() == 0, svc.log()
