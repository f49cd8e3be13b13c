"""KV cache types and flash attention on the real engine: a quantised cache loads, generates,
and takes the memory its number type says (llama.cpp's own line about its KV cache)."""

from __future__ import annotations

import re

import pytest

from ollama_server.core.engine import EngineSettings, LLAMAExecutor
from ollama_server.core.schemas import Finish, InternalRequest, Message, TextDelta
from ollama_server.models.store import ModelName, OllamaStore

pytestmark = pytest.mark.engine

CTX = 8192


@pytest.fixture(scope="module")
def smollm_path(real_models):
    store = OllamaStore(real_models)
    manifest = store.read_manifest(ModelName.parse("smollm2:135m").manifest_path(
        store.manifests_dir))
    return store.blob_path(store.layer(manifest, "model")["digest"])


# llama_kv_cache: size =  180.00 MiB (  8192 cells,  30 layers,  1/1 seqs), K (f16):   90.00 MiB,
# V (f16):   90.00 MiB. (The per-device "KV buffer size" lines are not always printed: on a
# loaded machine the engine was seen to leave them out.)
_KV_LINE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB .*K \((\w+)\):.*V \((\w+)\):")


def kv_mib_and_text(binary, model, kv: str, flash: str = "auto") -> tuple[float, str]:
    engine = LLAMAExecutor(model, EngineSettings(binary=binary, parallel=1, embeddings=False,
                                                 kv_cache_type=kv, flash_attention=flash),
                           CTX, name=f"smollm2-{kv}")
    try:
        engine.ensure_ready()
        sizes = [m for line in engine._stderr if (m := _KV_LINE.search(line))]
        assert sizes, "the engine did not say how big its KV cache is"
        assert sizes[-1].group(2) == sizes[-1].group(3) == kv
        kv_mib = float(sizes[-1].group(1))
        stream = engine.open_stream(InternalRequest(
            model="m", messages=[Message("user", "Count to five.")], max_tokens=8,
            temperature=0.0))
        events = list(stream)
    finally:
        engine.stop()
    assert isinstance(events[-1], Finish) and events[-1].usage.completion_tokens == 8
    return kv_mib, "".join(e.text for e in events if isinstance(e, TextDelta))


def test_a_quantised_kv_cache_loads_generates_and_takes_less_memory(engine_binary, smollm_path):
    f16, _ = kv_mib_and_text(engine_binary, smollm_path, "f16")
    q8, text8 = kv_mib_and_text(engine_binary, smollm_path, "q8_0")
    q4, text4 = kv_mib_and_text(engine_binary, smollm_path, "q4_0")
    # 2 bytes an element for f16; q8_0 keeps 34 bytes per 32, q4_0 18 per 32.
    assert f16 == pytest.approx(180.0, rel=0.01)  # 30 layers × 8192 × 2 × 192 dims × 2 bytes
    assert q8 == pytest.approx(f16 * 34 / 64, rel=0.01)
    assert q4 == pytest.approx(f16 * 18 / 64, rel=0.01)
    assert text8.strip() and text4.strip()


def test_flash_attention_off_and_on_both_serve(engine_binary, smollm_path):
    for flash in ("off", "on"):
        kv_mib, text = kv_mib_and_text(engine_binary, smollm_path, "f16", flash)
        assert kv_mib > 0 and text.strip()
