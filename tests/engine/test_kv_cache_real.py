"""KV cache types and flash attention on the real engine: a quantised cache loads, generates,
and takes the memory its number type says (llama.cpp's own line about its KV cache)."""

from __future__ import annotations

import re
import threading

import pytest

from ollama_server.core.engine import EngineSettings, LLAMAExecutor
from ollama_server.core.errors import Overloaded, ServiceError
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


def long_prompt(i: int, sentences: int) -> str:
    """A prompt of about 17 tokens a sentence (115: 1,990 with the chat template), different
    for each conversation ``i``."""
    return " ".join(f"Note {i}.{n}: the quick brown fox jumps over the lazy dog."
                    for n in range(sentences))


def run_together(engine: LLAMAExecutor, prompts: list[str]) -> list[object]:
    """Each prompt's stream at once (one thread each); its events, or the error it raised."""
    out: list[object] = [None] * len(prompts)

    def one(k: int) -> None:
        try:
            out[k] = list(engine.open_stream(InternalRequest(
                model="m", messages=[Message("user", prompts[k])], max_tokens=4,
                temperature=0.0)))
        except Exception as exc:  # noqa: BLE001 - compared below
            out[k] = exc

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return out


def test_a_kv_pool_holds_conversations_that_together_exceed_the_context(engine_binary,
                                                                        smollm_path):
    """Four prompts of about 1,990 tokens at once, the model's context 2,048: without
    kv_pool_size they fill the KV cache the slots share and the engine fails them (busy: 503,
    retry); with a pool of 8,192 cells all are answered, while each slot stays capped at the
    context (a prompt longer than it is still refused)."""
    ctx = 2048
    prompts = [long_prompt(i, 115) for i in range(4)]
    for pool in (0, 8192):
        engine = LLAMAExecutor(smollm_path, EngineSettings(
            binary=engine_binary, parallel=4, embeddings=False, kv_pool_size=pool), ctx,
            name=f"smollm2-pool-{pool}")
        try:
            engine.ensure_ready()
            sizes = [m for line in engine._stderr if (m := _KV_LINE.search(line))]
            assert sizes and f"{max(pool, ctx)} cells" in sizes[-1].group(0), sizes[-1].group(0)
            results = run_together(engine, prompts)
            if not pool:
                failed = [r for r in results if not isinstance(r, list)]
                assert failed and all(isinstance(r, Overloaded) for r in failed), results
                assert "kv_pool_size" in failed[0].message
                continue
            assert "--kv-unified-per-slot" in engine.command(engine.port)
            for r in results:
                assert isinstance(r, list) and isinstance(r[-1], Finish), r
                assert r[-1].usage.prompt_tokens > 1200
            too_long = run_together(engine, [long_prompt(9, 200)])[0]
            assert isinstance(too_long, ServiceError), too_long
        finally:
            engine.stop()
