"""Pure tests of the load policy: eviction choice, context sizing, keep-alive, discovery."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ollama_server.config import load_config
from ollama_server.core.errors import InvalidRequest, ModelNotFound, Overloaded
from ollama_server.models.manager import LoadedModel, ModelManager, pick_evictions
from ollama_server.models.schemas import ModelInfo
from tests.helpers import FakeExecutor, Script


def _entry(name: str, last_used: float, in_flight: int = 0) -> LoadedModel:
    info = ModelInfo(name=name, path=Path("/x"), source="ollama")
    return LoadedModel(info=info, engine=FakeExecutor(name, 1, Script()), loaded_at=0,
                       last_used=last_used, expires_at=None, keep_alive=300,
                       in_flight=in_flight)


def test_evicts_least_recently_used_idle_model():
    loaded = {"a": _entry("a", 5), "b": _entry("b", 1), "c": _entry("c", 3)}
    assert pick_evictions(loaded, "d", 3) == ["b"]
    assert pick_evictions(loaded, "a", 3) == []
    assert pick_evictions(loaded, "d", 4) == []
    loaded["b"].in_flight = 1
    assert pick_evictions(loaded, "d", 3) == ["c"]
    assert pick_evictions(loaded, "d", 2) == ["c", "a"]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def manager(tiny_store, tmp_path):
    config = load_config(overrides={"models_dir": str(tiny_store), "max_loaded_models": 2,
                                    "default_context_size": 2048}, environ={})
    engines: list[FakeExecutor] = []

    def factory(info, ctx):
        engines.append(FakeExecutor(info.name, ctx, Script()))
        return engines[-1]

    clock = Clock()
    mgr = ModelManager(config, executor_factory=factory, clock=clock,
                       engine_binary=Path("/bin/true"))
    mgr.engines, mgr.fake_clock = engines, clock
    yield mgr
    mgr.shutdown()


def test_discovery_reads_headers_and_layers(manager):
    names = [m.name for m in manager.list_models()]
    assert names == ["ns/other:v1", "tiny:latest"]
    tiny = manager.resolve("tiny")
    assert tiny.context_length == 4096 and tiny.architecture == "llama"
    assert tiny.embedding_length == 64 and tiny.params == {"temperature": 0.5}
    assert tiny.parameter_count == 128 and tiny.quantization_level
    assert manager.resolve("ns/other:v1").system == "Be brief."
    assert manager.resolve("TINY:LATEST").name == "tiny:latest"
    with pytest.raises(ModelNotFound):
        manager.resolve("tiny:7b")
    with pytest.raises(InvalidRequest):
        manager.resolve("../tiny")


def test_plain_gguf_folder(tmp_path, tiny_gguf):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    (folder / "my-model.gguf").write_bytes(tiny_gguf.read_bytes())
    config = load_config(overrides={"models_dir": str(tmp_path / "none"),
                                    "gguf_dirs": [str(folder)]}, environ={})
    mgr = ModelManager(config, engine_binary=Path("/bin/true"))
    try:
        assert [m.name for m in mgr.list_models()] == ["my-model:latest"]
        assert mgr.resolve("my-model").source == "gguf"
    finally:
        mgr.shutdown()


def test_context_is_capped_then_raised_on_request(manager):
    tiny = manager.resolve("tiny")  # trained 4096, default cap 2048
    assert manager.context_for(tiny) == 2048
    assert manager.context_for(tiny, 3000) == 3000
    assert manager.context_for(tiny, 100000) == 4096
    engine, _ = manager.acquire(tiny)
    assert engine.ctx_size == 2048
    manager.release(tiny.name)
    engine, _ = manager.acquire(tiny, 4096)
    assert engine.ctx_size == 4096  # restarted bigger, never silently truncated
    manager.release(tiny.name)


def test_keep_alive_lru_cap_and_unload(manager):
    tiny, other = manager.resolve("tiny"), manager.resolve("ns/other:v1")
    manager.acquire(tiny)
    manager.release(tiny.name, keep_alive=10)
    entry = manager.loaded_entry(tiny.name)
    assert entry.expires_at == pytest.approx(110.0)
    manager.acquire(other)
    manager.release(other.name, keep_alive=-1)
    assert manager.loaded_entry(other.name).expires_at is None
    # keep_alive 0 unloads as soon as the model is idle
    manager.acquire(tiny)
    manager.release(tiny.name, keep_alive=0)
    assert manager.loaded_entry(tiny.name) is None
    assert manager.engines[0].state.value == "stopped"


def test_cap_evicts_lru(tiny_store, tiny_gguf):
    from ollama_server.models.store import OllamaStore
    from tests.helpers import add_store_model

    add_store_model(OllamaStore(tiny_store), "third:1", tiny_gguf, params={})
    config = load_config(overrides={"models_dir": str(tiny_store), "max_loaded_models": 2},
                         environ={})
    clock = Clock()
    made: list[FakeExecutor] = []
    mgr = ModelManager(config, executor_factory=lambda i, c: made.append(
        FakeExecutor(i.name, c, Script())) or made[-1], clock=clock,
        engine_binary=Path("/bin/true"))
    try:
        for name in ("tiny", "ns/other:v1", "third:1"):
            clock.now += 1
            info = mgr.resolve(name)
            mgr.acquire(info)
            mgr.release(info.name)
        assert sorted(e.info.name for e in mgr.loaded()) == ["ns/other:v1", "third:1"]
        assert made[0].state.value == "stopped"
    finally:
        mgr.shutdown()


def test_admitted_is_called_only_when_the_request_waited_or_a_load_is_ahead(manager):
    """With several workers ``admitted`` is a message to the worker on the way to the first
    token: a request that finds a free slot on a running engine goes without it."""
    info = manager.resolve("tiny")
    calls: list[str] = []
    manager.acquire(info, admitted=lambda: calls.append("first"))  # loads the model
    manager.release(info.name)
    assert calls == ["first"]
    manager.acquire(info, admitted=lambda: calls.append("ready"))  # running, slot free
    manager.release(info.name)
    assert calls == ["first"]
    manager.acquire(info, 4096, admitted=lambda: calls.append("bigger"))  # restarts bigger
    manager.release(info.name)
    assert calls == ["first", "bigger"]
    manager.engines[-1].stop()  # a crashed engine is started again: a load is ahead
    manager.acquire(info, admitted=lambda: calls.append("restart"))
    manager.release(info.name)
    assert calls == ["first", "bigger", "restart"]


def _in_thread(fn):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_larger_context_waits_for_the_requests_in_progress(manager):
    """Restarting the engine for a larger num_ctx would cut off every stream it serves: the
    request waits until they end, and requests arriving meanwhile wait behind the restart."""
    tiny = manager.resolve("tiny")
    engine, _ = manager.acquire(tiny)  # a stream in progress on the 2,048 context
    bigger, big = _in_thread(lambda: manager.acquire(tiny, 4096))
    time.sleep(0.3)
    later, small = _in_thread(lambda: manager.acquire(tiny))
    time.sleep(0.7)
    assert bigger.is_alive() and later.is_alive(), (big, small)
    assert engine.state.value == "ready" and engine.ctx_size == 2048  # not cut off
    manager.release(tiny.name)  # the stream ends
    bigger.join(5)
    later.join(5)
    assert big["value"][0] is engine and small["value"][0] is engine
    assert engine.ctx_size == 4096 and len(manager.engines) == 1
    assert manager.loaded_entry(tiny.name).in_flight == 2
    manager.release(tiny.name)
    manager.release(tiny.name)


def test_a_larger_context_gives_up_after_request_timeout(manager):
    tiny = manager.resolve("tiny")
    manager.acquire(tiny)
    bigger, big = _in_thread(lambda: manager.acquire(tiny, 4096))
    time.sleep(0.3)
    manager.fake_clock.now += manager.config.request_timeout + 1
    bigger.join(5)
    assert isinstance(big["error"], Overloaded) and "num_ctx" in big["error"].message
    entry = manager.loaded_entry(tiny.name)
    assert (entry.in_flight, entry.growers, entry.grow_to, entry.ctx_size) == (1, 0, 0, 2048)
    manager.release(tiny.name)
    engine, _ = manager.acquire(tiny)  # nothing is left waiting on a restart
    manager.release(tiny.name)
