"""Configuration reload over the Flask client with scripted engines: new settings take effect
for the next request, engines restart only when their command line changes (when idle), a bad
file is refused with one log line naming the key, and /health says when and from where."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ollama_server.config import ConfigSource
from ollama_server.core.request_tracker import RequestTracker
from ollama_server.models.manager import ModelManager
from tests.helpers import FakeExecutor

MODEL = "tiny:latest"


class CommandFake(FakeExecutor):
    """A scripted engine that, like LLAMAExecutor, has settings and a command line."""

    def __init__(self, name, ctx_size, script, settings):
        super().__init__(name, ctx_size, script)
        self.settings = settings
        self.stopped = False

    def command(self, port):
        s = self.settings
        return ["llama-server", "-c", str(self.ctx_size), "--threads", str(s.threads),
                "--parallel", str(s.parallel), "--port", str(port)]

    def stop(self):
        super().stop()
        self.stopped = True


@pytest.fixture
def live(tiny_store, script, tmp_path):
    """(app, config file, engines made) for an app built from a config file it can reload."""
    from ollama_server.api.app import create_app

    cfg_file = tmp_path / "service.yaml"
    base = f"models_dir: {tiny_store}\nlog_dir: {tmp_path / 'logs'}\nkeep_alive: -1\n"
    cfg_file.write_text(base)
    source = ConfigSource(str(cfg_file), {})
    config = source.load({})
    engines: list[CommandFake] = []
    manager = None

    def factory(info, ctx):
        engine = CommandFake(info.name, ctx, script, manager.engine_settings())
        engines.append(engine)
        return engine

    manager = ModelManager(config, executor_factory=factory, engine_binary=Path("/bin/true"))
    app = create_app(config, manager=manager, tracker=RequestTracker(), source=source)
    yield app, cfg_file, base, engines
    manager.shutdown()


def chat(client, headers=None, stream=False):
    return client.post("/v1/chat/completions", headers=headers or {}, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream})


def reload(app) -> bool:
    return app.extensions["ollama_server_reloader"].reload()


def test_per_request_settings_take_effect_at_once(live, monkeypatch):
    monkeypatch.delenv("OLLAMA_SERVER_API_KEY", raising=False)
    app, cfg_file, base, _ = live
    client = app.test_client()
    assert chat(client).status_code == 200
    cfg_file.write_text(base + "api_key: k1\ncors_origins: ['https://chat.example']\n"
                        "default_model: ns/other:v1\nmax_body_mb: 0.001\n")
    assert reload(app)
    assert chat(client).status_code == 401
    assert chat(client, {"Authorization": "Bearer k1"}).status_code == 200
    resp = client.get("/health", headers={"Origin": "https://chat.example"})
    assert resp.headers.get("Access-Control-Allow-Origin") == "https://chat.example"
    assert resp.get_json()["default_model"] == "ns/other:v1"
    big = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k1"},
                      data="x" * 5000, content_type="application/json")
    assert big.status_code == 413


def test_only_changed_engines_restart_and_only_when_idle(live):
    app, cfg_file, base, engines = live
    client = app.test_client()
    manager = app.extensions["ollama_server"].manager
    assert chat(client).status_code == 200
    first = engines[-1]
    # A setting that is not on the command line: the engine keeps running, settings updated.
    cfg_file.write_text(base + "request_timeout: 77\n")
    assert reload(app)
    entry = manager.loaded_entry(MODEL)
    assert entry.engine is first and not first.stopped
    assert first.settings.request_timeout == 77
    # A command-line setting while a stream is open: the restart waits for it to end.
    stream = chat(client, stream=True)
    iterator = stream.response
    next(iter(iterator))  # the stream has started and holds the engine
    cfg_file.write_text(base + "threads: 3\n")
    assert reload(app)
    assert manager.loaded_entry(MODEL).engine is first and not first.stopped
    assert manager.loaded_entry(MODEL).pending is not None
    b"".join(iterator)
    stream.close()
    new = manager.loaded_entry(MODEL).engine
    assert first.stopped and new is not first and "3" in new.command(0)
    assert chat(client).status_code == 200 and new.requests


def test_idle_engine_restarts_at_once_and_cap_is_applied(live):
    app, cfg_file, base, engines = live
    client = app.test_client()
    manager = app.extensions["ollama_server"].manager
    other = client.post("/api/generate", json={"model": "ns/other:v1", "prompt": "hi",
                                               "stream": False})
    assert other.status_code == 200
    older = engines[-1]
    assert chat(client).status_code == 200
    first = engines[-1]
    cfg_file.write_text(base + "parallel: 2\nmax_loaded_models: 1\n")
    assert reload(app)
    # The least recently used idle model goes; the other restarts with --parallel 2.
    assert older.stopped and manager.loaded_entry("ns/other:v1") is None
    assert first.stopped
    command = manager.loaded_entry(MODEL).engine.command(0)
    assert command[command.index("--parallel") + 1] == "2"


def test_bad_file_is_refused_with_one_line_naming_the_key(live, caplog):
    app, cfg_file, base, engines = live
    client = app.test_client()
    assert chat(client).status_code == 200
    before = app.extensions["ollama_server"].config.keep_alive
    cfg_file.write_text(base + "port: lots\n")
    with caplog.at_level(logging.ERROR, logger="ollama_server.reload"):
        assert not reload(app)
    lines = [r.getMessage() for r in caplog.records if r.name == "ollama_server.reload"]
    assert len(lines) == 1 and "port" in lines[0] and "\n" not in lines[0]
    assert app.extensions["ollama_server"].config.keep_alive == before
    status = client.get("/health").get_json()["config"]
    assert "port" in status["last_error"] and status["reloads"] == 0
    assert not engines[-1].stopped
    cfg_file.write_text(base + f"models_dir: {cfg_file.parent / 'missing'}\n")
    assert not reload(app)
    assert "models_dir" in client.get("/health").get_json()["config"]["last_error"]


def test_keys_bound_at_start_keep_their_values(live, caplog):
    app, cfg_file, base, _ = live
    config = app.extensions["ollama_server"].config
    cfg_file.write_text(base + "port: 9999\nkeep_alive: 42\n")
    with caplog.at_level(logging.WARNING, logger="ollama_server.reload"):
        assert reload(app)
    assert (config.port, config.keep_alive) == (11435, 42)
    assert any("port changed" in r.getMessage() and "restart" in r.getMessage()
               for r in caplog.records)


def test_health_says_when_and_from_where(live):
    app, cfg_file, base, _ = live
    client = app.test_client()
    first = client.get("/health").get_json()["config"]
    assert first["file"] == str(cfg_file.resolve()) and first["reloads"] == 0
    assert first["loaded_at"].endswith("Z")
    assert reload(app)
    assert client.get("/health").get_json()["config"]["reloads"] == 1


def test_app_without_source_cannot_reload(client, app):
    assert not app.extensions["ollama_server_reloader"].reload()
    assert client.get("/health").get_json()["config"]["file"] is None


def test_model_folders_change_live(live, tmp_path, tiny_gguf):
    from ollama_server.models.store import OllamaStore
    from tests.helpers import add_store_model

    app, cfg_file, base, _ = live
    client = app.test_client()
    other = tmp_path / "other-store"
    add_store_model(OllamaStore(other), "fresh:1b", tiny_gguf)
    assert [m["name"] for m in client.get("/api/tags").get_json()["models"]] == [
        "ns/other:v1", "tiny:latest"]
    cfg_file.write_text(base.replace(str(cfg_file.parent / "models"), str(other)))
    assert reload(app)
    assert [m["name"] for m in client.get("/api/tags").get_json()["models"]] == ["fresh:1b"]


def test_log_level_changes_live(live):
    app, cfg_file, base, _ = live
    root = logging.getLogger()
    before = root.level
    try:
        cfg_file.write_text(base + "log_level: WARNING\n")
        assert reload(app)
        assert root.level == logging.WARNING
        cfg_file.write_text(base + "log_level: DEBUG\n")
        assert reload(app)
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)
