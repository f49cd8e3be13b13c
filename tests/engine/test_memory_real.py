"""A model that cannot fit: the real engine runs out of memory while loading, and the error says
how much it needed and what is available (Ollama's words), not just that it crashed."""

from __future__ import annotations

import pytest

from ollama_server.core.engine import EngineSettings, EngineState, LLAMAExecutor
from ollama_server.core.errors import InsufficientMemory
from ollama_server.models.store import ModelName, OllamaStore

pytestmark = pytest.mark.engine


def test_a_context_too_big_for_this_machine(engine_binary, real_models):
    store = OllamaStore(real_models)
    manifest = store.read_manifest(ModelName.parse("smollm2:135m").manifest_path(
        store.manifests_dir))
    model = store.blob_path(store.layer(manifest, "model")["digest"])
    # 16M tokens of KV cache for smollm2 is about 350 GiB: more than any CI machine has.
    engine = LLAMAExecutor(model, EngineSettings(binary=engine_binary, parallel=1,
                                                 embeddings=False), 16_000_000,
                           name="smollm2:135m")
    try:
        with pytest.raises(InsufficientMemory) as err:
            engine.ensure_ready()
        assert engine.state == EngineState.FAILED
    finally:
        engine.stop()
    message = err.value.message
    assert message.startswith("model requires more system memory (")
    assert "GiB more for smollm2:135m with a context of 16000000" in message
    assert "than is available (" in message and "smaller context" in message
